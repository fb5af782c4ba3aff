"""Sampler: the one sampling pipeline every request goes through, whichever front end sent it: grammar mask ->
logit bias -> penalties -> temperature -> top-k / top-p / min-p -> draw -> log-probabilities, for a step's rows at
once (the stages are the pure functions of lamina.engine.sampling; the masks come from lamina.engine.grammar). Also
scores prompt tokens (prompt logprobs)."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from lamina.engine.grammar import Grammars
from lamina.engine.request import Request, TopLogprobs
from lamina.engine.sampling import (
    SamplingBatch,
    apply_logit_bias,
    apply_penalties,
    apply_token_mask,
    decided,
    race,
    token_logprobs,
    top_logprobs,
    truncate,
    unpack_token_mask,
)

# Rows of logits materialised at once when scoring a prompt: bounds memory at rows * vocab.
SCORE_ROWS = 256


@dataclass(frozen=True)
class Sampled:
    """A step's draws, entry b for request b: its new tokens (one, or with a draft the accepted draft tokens and the
    token after them), and for each, where asked for, its log-probability and alternatives."""

    tokens: list[list[int]]
    logprobs: list[list[float | None]]
    top_logprobs: list[list[TopLogprobs | None]]
    complete: list[list[bool]]  # the request's constraint is complete with this token: nothing may follow it
    settled: list[bool] | None = None  # with drafts: False where a position was left undecided (Sampler.__call__)


class Sampler:
    """Draws each request's next token with its own settings and its own generator, so that a request's tokens
    depend on its seed, prompt and settings only, never on what else shares the batch.

    Seeds: a request with `params.seed` draws from a generator seeded with it; one without draws from a generator
    seeded from the sampler's own stream (seeded once, at construction), so a session is reproducible too.

    Structured output: a request with a constraint carries a matcher (`constrain`); its row draws only among the
    tokens the matcher allows (the model's own log-probabilities are still reported), and the matcher takes each
    token drawn. `prepare` starts a step's masks before the forward pass, so that on an accelerator they are computed
    meanwhile."""

    def __init__(self, vocab_size: int, device: torch.device, seed: int, grammars: Grammars):
        self.vocab_size, self.device, self.grammars = vocab_size, device, grammars
        self._seeds = torch.Generator().manual_seed(seed)  # hands out seeds: on the CPU whatever the device
        self._pending: tuple[tuple[int, ...], Future] | None = None  # masks being filled, for these requests
        self.overlap = device.type != "cpu"  # fill masks during the forward pass (see `prepare`)

    def constrain(self, request: Request) -> None:
        """Give a request with structured_outputs its matcher; RequestError when the constraint does not compile."""
        spec = request.params.structured_outputs
        if spec is not None and request.matcher is None:
            request.matcher = self.grammars.matcher(spec)

    def attach(self, request: Request) -> None:
        """Give a new request its generator and, when it asks for penalties, its token counts."""
        params = request.params
        seed = params.seed
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=self._seeds))
        request.generator = torch.Generator(device=self.device).manual_seed(seed)
        if params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1:
            request.counts = torch.zeros(self.vocab_size, dtype=torch.int32, device=self.device)
            request.seen = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
            request.seen[torch.tensor(request.prompt, device=self.device)] = True

    def prepare(self, requests: Sequence[Request]) -> None:
        """Start filling the masks of the constrained requests among those that sample next, to overlap the forward
        pass, when that runs on an accelerator. On the CPU the forward pass has every core, and a mask filled beside
        it slows it more than the mask costs after it (docs/benchmarks.md, "Structured output":
        `bench_structured.py --overlap`)."""
        self._pending = None
        constrained = [r for r in requests if r.matcher is not None] if self.overlap else []
        if constrained:
            self._pending = (tuple(id(r) for r in constrained), self.grammars.start([r.matcher for r in constrained]))

    def __call__(
        self,
        logits: torch.Tensor,
        requests: Sequence[Request],
        drafts: Sequence[Sequence[int]] | None = None,
        rounding: float = 0.0,
    ) -> Sampled:
        """The next token of each request from its row of raw logits [B, V] (float32); or, with `drafts`, request b's
        tokens from its 1 + len(drafts[b]) rows (speculative decoding: the rows after its last token and after each
        draft token).

        A draft is verified by drawing: at each of its positions the request draws its token exactly as it would
        without a draft (same stages, same generator, the grammar and the penalties advanced by the tokens drawn so
        far); a draft token is accepted when the draw equals it, and the first draw that differs is the last token.
        That is the rejection rule of speculative sampling for a proposer whose distribution is one-hot on its
        token (prompt lookup, a draft model's greedy choice): a draft token x is accepted with probability p(x), and
        a rejected position's token is drawn from p without x. So the tokens keep the target's distribution, and a
        seeded request draws the very tokens it draws without speculation.

        Up to float rounding: on the C step a step of up to 4 rows gives each row what it gets alone (bitwise);
        larger steps and the PyTorch forward sum products in another order than one row's, `rounding` apart in the
        logits at most (Forward.rounding). A position whose winner leads by no more than that is left undecided
        (nothing drawn there, the generator as it was; `settled` False) for the next step to compute on its own."""
        if drafts is None or not any(drafts):
            flat, _ = self._rows(logits, requests)
            return Sampled(
                [[t] for t in flat.tokens],
                [[lp] for lp in flat.logprobs],
                [[top] for top in flat.top_logprobs],
                [[c] for c in flat.complete],
            )
        tokens, lps, tops, complete = ([[] for _ in requests] for _ in range(4))
        settled = [True] * len(requests)
        first = [0]  # request b's rows start at first[b]
        for d in drafts:
            first.append(first[-1] + 1 + len(d))
        live = list(range(len(requests)))  # requests whose draft is accepted so far
        for i in range(max(len(d) for d in drafts) + 1):
            live = [b for b in live if i <= len(drafts[b])]
            guarded = [bool(drafts[b]) and rounding > 0 for b in live]
            rows = logits[[first[b] + i for b in live]]
            flat, sure = self._rows(rows, [requests[b] for b in live], guarded, rounding)
            still = []
            for j, b in enumerate(live):
                if not sure[j]:
                    settled[b] = False
                    continue
                token = flat.tokens[j]
                tokens[b].append(token)
                lps[b].append(flat.logprobs[j])
                tops[b].append(flat.top_logprobs[j])
                complete[b].append(flat.complete[j])
                accepted = i < len(drafts[b]) and token == drafts[b][i]
                if accepted and not flat.complete[j] and token not in requests[b].stop_ids:
                    still.append(b)
            live = still
        return Sampled(tokens, lps, tops, complete, settled)

    def _rows(
        self,
        logits: torch.Tensor,
        requests: Sequence[Request],
        guarded: Sequence[bool] | None = None,
        margin: float = 0.0,
    ) -> tuple[Sampled, list[bool]]:
        """One token for each request from its row of raw logits [B, V]: a Sampled of flat lists, and whether each
        row's token is decided (always, unless `guarded[b]`: see __call__). An undecided row changes nothing: its
        request's generator, grammar and counts are as they were."""
        if not requests:
            return Sampled([], [], [], []), []
        guarded = [False] * len(requests) if guarded is None else list(guarded)
        states = {b: r.generator.get_state() for b, r in enumerate(requests) if guarded[b] and not r.params.greedy}
        masked = self._constrain(logits, requests)
        if all(r.params.greedy and not r.params.logit_bias and r.counts is None for r in requests):
            scores, batch = masked, None  # every stage would leave the argmax as it is
        else:
            scores, batch = self._scores(masked, requests)
        tokens = scores.argmax(dim=-1)
        sure = [True] * len(requests)
        if any(guarded):
            if batch is None:
                batch = SamplingBatch.from_params([r.params for r in requests], self.vocab_size, logits.device)
            sure = [s or not g for s, g in zip(decided(scores, batch, margin).tolist(), guarded)]
            for b, state in states.items():
                if not sure[b]:
                    requests[b].generator.set_state(state)
        # Log-probabilities of the model's own distribution (raw logits, as Meta and OpenAI report them), only for the
        # requests that ask; one host transfer for the tokens and their log-probabilities.
        want = [r.params.logprobs for r in requests]
        if any(want):
            columns = torch.stack([tokens.double(), token_logprobs(logits, tokens).double()], dim=1).tolist()
            ids = [int(t) for t, _ in columns]
            lps = [lp if w else None for (_, lp), w in zip(columns, want)]
        else:
            ids, lps = tokens.tolist(), [None] * len(requests)
        k = max(r.params.top_logprobs for r in requests)
        tops: list[TopLogprobs | None] = [None] * len(requests)
        if k:
            values, alternatives = top_logprobs(logits, k)
            for i, r in enumerate(requests):
                n = r.params.top_logprobs
                if n:
                    tops[i] = tuple(zip(alternatives[i, :n].tolist(), values[i, :n].tolist()))
        complete = [False] * len(requests)
        for i, (r, token) in enumerate(zip(requests, ids)):
            if not sure[i]:
                continue
            if r.counts is not None:
                r.counts[token] += 1
                r.seen[token] = True
            if r.matcher is not None and token not in r.stop_ids:
                r.matcher.consume_token(token)
                complete[i] = r.matcher.is_stopped()
        return Sampled(ids, lps, tops, complete), sure

    def _constrain(self, logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
        """The logits with each constrained row's forbidden tokens at -inf. Where a grammar may end, the choice to
        end goes to the request's own stop tokens (llguidance allows the tokenizer's). A matcher in an error state
        (a limit of the grammar engine reached) leaves its row free; the core then ends the request with the error."""
        rows = [i for i, r in enumerate(requests) if r.matcher is not None]
        if not rows:
            return logits
        constrained = [requests[i] for i in rows]
        key = tuple(id(r) for r in constrained)
        pending, self._pending = self._pending, None
        bitmask = (
            pending[1].result()
            if pending is not None and pending[0] == key
            else self.grammars.fill([r.matcher for r in constrained])
        )
        allowed = unpack_token_mask(bitmask, self.vocab_size).to(logits.device)  # [n, V]
        eos = self.grammars.eos_ids.to(logits.device)
        can_end = allowed[:, eos].any(dim=-1).tolist()
        allowed[:, eos] = False
        ends = [(j, t) for j, r in enumerate(constrained) if can_end[j] for t in r.stop_ids]
        if ends:
            allowed[tuple(torch.tensor(ends, device=logits.device).T)] = True
        for j, r in enumerate(constrained):
            if r.matcher.is_error():  # it allows nothing: the row is left free, and the core ends the request
                allowed[j] = True
        return apply_token_mask(logits, torch.tensor(rows, device=logits.device), allowed)

    def _scores(self, logits: torch.Tensor, requests: Sequence[Request]) -> tuple[torch.Tensor, SamplingBatch]:
        """The stages after the grammar mask, up to the draw's scores (sampling.race: the token is their argmax)."""
        batch = SamplingBatch.from_params([r.params for r in requests], self.vocab_size, logits.device)
        processed = apply_logit_bias(logits, batch)
        if batch.penalties:
            zeros_i = torch.zeros(self.vocab_size, dtype=torch.int32, device=logits.device)
            zeros_b = torch.zeros(self.vocab_size, dtype=torch.bool, device=logits.device)
            counts = torch.stack([r.counts if r.counts is not None else zeros_i for r in requests])
            seen = torch.stack([r.seen if r.seen is not None else zeros_b for r in requests])
            processed = apply_penalties(processed, counts, seen, batch)
        return race(truncate(processed, batch), batch, [r.generator for r in requests]), batch

    @staticmethod
    def score_prompt(
        request: Request, positions: range, hidden: torch.Tensor, logits: Callable[[torch.Tensor], torch.Tensor]
    ) -> None:
        """Append to `request.prompt_logprobs` the log-probability of prompt token p + 1 for each position p of
        `positions` (hidden states [len(positions), dim]), with `params.prompt_logprobs` alternatives; `logits`
        projects hidden states to logits, a few hundred rows at a time."""
        k = request.params.prompt_logprobs or 0
        for lo in range(0, len(positions), SCORE_ROWS):
            rows = logits(hidden[lo : lo + SCORE_ROWS])
            first = positions.start + lo
            targets = torch.tensor(request.prompt[first + 1 : first + 1 + rows.shape[0]], device=rows.device)
            lps = token_logprobs(rows, targets).tolist()
            if k:
                values, ids = top_logprobs(rows, k)
                alts = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
            else:
                alts = [()] * len(lps)
            request.prompt_logprobs.extend(zip(lps, alts))
