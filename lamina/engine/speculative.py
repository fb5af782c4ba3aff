"""Speculative decoding's pure parts: proposing draft tokens by prompt lookup (an n-gram of the sequence's own
tokens), and accepting a draft against the target model's distributions so that the tokens emitted keep the target's
distribution exactly (the rejection rule of Leviathan et al. 2023 and Chen et al. 2023, as vLLM's rejection sampler
and gpt-fast's `speculative_decode` apply it). Greedy decoding is the rule's special case: a one-hot target accepts
a draft token exactly when it is the argmax, and the token after the last accepted one is the argmax.

Both are functions of plain values (token lists, probability tensors, a generator), for one sequence; the engine core
batches the verification (issue 25)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def propose_ngram(tokens: Sequence[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Up to `k` draft tokens by prompt lookup: for the longest n in max_n..min_n whose last n tokens occur earlier in
    `tokens`, the tokens that followed their latest earlier occurrence (the nearest context: an edit of a passage
    repeats what it just copied). [] when no such n-gram occurs. As vLLM's `prompt_lookup_min` / `prompt_lookup_max`,
    except that vLLM takes the first occurrence."""
    if k < 1 or min_n < 1 or max_n < min_n:
        raise ValueError(f"k >= 1 and 1 <= min_n <= max_n, got k={k}, min_n={min_n}, max_n={max_n}")
    seq = np.asarray(tokens, dtype=np.int64)
    for n in range(min(max_n, len(seq) - 1), min_n - 1, -1):
        # every window of n tokens that ends before the last token (so that at least one token follows it)
        windows = np.lib.stride_tricks.sliding_window_view(seq[:-1], n)
        found = np.flatnonzero((windows == seq[-n:]).all(axis=1))
        if found.size:
            start = int(found[-1]) + n
            return seq[start : start + k].tolist()
    return []


def accept(
    draft: Sequence[int],
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> list[int]:
    """The tokens a speculative step emits for one sequence, 1 to len(draft) + 1 of them.

    draft: the k proposed tokens. target_probs [k + 1, V]: the target's next-token distribution at each draft
    position and after the last (float; rows sum to 1; a greedy request's rows are one-hot on the argmax).
    draft_probs [k, V]: the distributions the draft tokens were drawn from; None for a deterministic proposer
    (prompt lookup), whose distribution is one-hot on its token.

    Draft token i is accepted with probability min(1, p(x) / q(x)); at the first rejection the step emits a draw from
    the residual max(0, p - q) renormalised, and stops; when every draft token is accepted it emits a draw from the
    last row (the bonus token). The emitted tokens are distributed as the target's own draws would be."""
    k = len(draft)
    if target_probs.dim() != 2 or target_probs.shape[0] != k + 1:
        raise ValueError(f"target_probs must be [{k + 1}, V] for {k} draft tokens, got {tuple(target_probs.shape)}")
    if draft_probs is not None and tuple(draft_probs.shape) != (k, target_probs.shape[1]):
        raise ValueError(f"draft_probs must be [{k}, {target_probs.shape[1]}], got {tuple(draft_probs.shape)}")
    p = target_probs.double()
    out: list[int] = []
    for i, token in enumerate(draft):
        q = 1.0 if draft_probs is None else float(draft_probs[i, token])
        u = float(torch.rand((), generator=generator, dtype=torch.float64))
        if u * q < float(p[i, token]):  # u < p / q, without dividing by a q of 0
            out.append(int(token))
            continue
        if draft_probs is None:
            residual = p[i].clone()
            residual[token] = 0.0
        else:
            residual = (p[i] - draft_probs[i].double()).clamp(min=0.0)
        if float(residual.sum()) <= 0.0:  # p == q to rounding: the rejection had probability ~0; draw from p
            residual = p[i]
        out.append(_draw(residual, generator))
        return out
    out.append(_draw(p[k], generator))
    return out


def _draw(weights: torch.Tensor, generator: torch.Generator | None) -> int:
    """One index drawn with probability proportional to `weights` (float64, non-negative, not all zero)."""
    return int(torch.multinomial(weights / weights.sum(), 1, generator=generator))
