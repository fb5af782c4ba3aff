"""Token sampling as pure functions on batched float32 logits; per-row settings are tensors."""

from __future__ import annotations

import torch


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token per row of logits [B, V]: argmax where temperature is 0, else a draw from softmax(logits / T)
    restricted to the nucleus: the most probable tokens, in order, up to and including the first whose
    cumulative probability reaches top_p (Meta's rule), renormalised. temperature, top_p: [B]. Returns [B] int64."""
    greedy = logits.argmax(dim=-1)
    sampling = temperature > 0
    if not bool(sampling.any()):
        return greedy
    # Shift by the row maximum first (softmax does not change), so that a tiny temperature cannot overflow to inf.
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    scaled = shifted / torch.where(sampling, temperature, 1.0)[:, None]
    probs = torch.softmax(scaled, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before > top_p[:, None], 0.0)
    choice = torch.multinomial(sorted_probs, num_samples=1, generator=generator)  # weights need not sum to 1
    sampled = order.gather(-1, choice).squeeze(-1)
    return torch.where(sampling, sampled, greedy)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] per row: logits [n, V] float32, tokens [n] -> [n]."""
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
