"""Speculative decoding: proposing tokens to follow a decoding request's last one (prompt lookup: an n-gram of the
sequence's own tokens; or a small draft model's greedy choices), so that one forward pass of the target verifies
several positions at once, and choosing each step how many proposals are worth verifying.

The engine core drives it: before each step `Speculator.propose` sets `Request.draft` for decoding requests, the
scheduler gives each draft its positions, the runner computes logits at every one of them, the sampler verifies
them by drawing (lamina.engine.sampler.Sampler: the target's distribution is kept exactly, and a seeded request
draws the tokens it draws without speculation), and `Speculator.verified` learns from what was accepted.

Never a slowdown: a step of R rows costs what it costs on this machine, measured as the engine runs (`StepCosts`:
decode steps' seconds by their number of rows), and each request's draft tokens are worth what its acceptance so far
says, drawn towards what drafts of the same kind (a 1-, 2- or 3-token lookup match; a draft model's) have had in every
request lately (`Speculator.rate`). Each step verifies the proposals that maximise the expected tokens per second: all
of them while a step's time hardly grows with its rows (one stream: bound by reading the weights), none when the step is
compute-bound (many streams) or the drafts keep failing.
"""

from __future__ import annotations

import bisect
import itertools
import json
import time
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from lamina.engine.blocks import BlockPool
from lamina.engine.request import Request, Status
from lamina.errors import ConfigError


@dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM's `speculative_config`: {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": n,
    "prompt_lookup_min": m} (prompt lookup, n-grams of m..n tokens; both 5 when neither is given, one the other
    when only one is), or {"model": PATH, "num_speculative_tokens": k} (a draft model, method "draft_model"; any
    model lamina loads whose tokenizer is the target's). `disable_by_batch_size`: no speculation while this many
    requests or more are decoding (None: decided by the measured cost of a step, see the module's docstring)."""

    num_speculative_tokens: int
    method: str = "ngram"
    prompt_lookup_max: int | None = None
    prompt_lookup_min: int | None = None
    model: str | None = None
    disable_by_batch_size: int | None = None

    def __post_init__(self):
        k = self.num_speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 32:
            raise ConfigError(f"speculative_config: num_speculative_tokens must be an integer in 1..32, got {k!r}")
        if self.method not in ("ngram", "draft_model"):
            raise ConfigError(f"speculative_config: method must be 'ngram' or 'draft_model', got {self.method!r}")
        if self.method == "draft_model" and not self.model:
            raise ConfigError("speculative_config: method 'draft_model' needs a 'model' (a path lamina loads)")
        if self.method == "ngram" and self.model is not None:
            raise ConfigError("speculative_config: method 'ngram' takes no 'model' (leave out 'method' for a draft)")
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        if self.method == "ngram":
            if lo is None and hi is None:
                lo = hi = 5
            lo, hi = (hi if lo is None else lo), (lo if hi is None else hi)
            for name, value in (("prompt_lookup_min", lo), ("prompt_lookup_max", hi)):
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise ConfigError(f"speculative_config: {name} must be an integer >= 1, got {value!r}")
            if lo > hi:
                raise ConfigError(f"speculative_config: prompt_lookup_min {lo} is above prompt_lookup_max {hi}")
            object.__setattr__(self, "prompt_lookup_min", lo)
            object.__setattr__(self, "prompt_lookup_max", hi)
        elif lo is not None or hi is not None:
            raise ConfigError("speculative_config: prompt_lookup_min/max apply to method 'ngram' only")
        b = self.disable_by_batch_size
        if b is not None and (not isinstance(b, int) or isinstance(b, bool) or b < 1):
            raise ConfigError(f"speculative_config: disable_by_batch_size must be an integer >= 1, got {b!r}")

    @classmethod
    def parse(cls, spec: "SpeculativeConfig | Mapping[str, Any] | str") -> "SpeculativeConfig":
        """From a dict in vLLM's shape or its JSON text (the CLI's --speculative-config); ConfigError names what
        is wrong."""
        if isinstance(spec, SpeculativeConfig):
            return spec
        if isinstance(spec, str):
            try:
                spec = json.loads(spec)
            except json.JSONDecodeError as e:
                raise ConfigError(
                    f"speculative_config is not valid JSON ({e.msg} at column {e.colno}): {spec}"
                ) from None
        if not isinstance(spec, Mapping):
            raise ConfigError(f"speculative_config must be a JSON object (a dict), got {type(spec).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ConfigError(
                f"speculative_config has unknown key(s) {', '.join(map(repr, unknown))}; "
                f"known: {', '.join(sorted(known))}"
            )
        if "num_speculative_tokens" not in spec:
            raise ConfigError("speculative_config needs 'num_speculative_tokens' (how many tokens to propose a step)")
        values = dict(spec)
        if values.get("method") is None:
            values["method"] = "draft_model" if values.get("model") is not None else "ngram"
        elif values["method"] == "draft":
            values["method"] = "draft_model"
        if values.get("model") is not None:
            values["model"] = str(values["model"])
        return cls(**values)

    def describe(self) -> str:
        """One line for `lamina info` and the server's start-up log."""
        if self.method == "ngram":
            n = self.prompt_lookup_min, self.prompt_lookup_max
            what = f"prompt lookup of {n[0]}-grams" if n[0] == n[1] else f"prompt lookup of {n[0]}..{n[1]}-grams"
        else:
            what = f"draft model {self.model}"
        off = f", off from {self.disable_by_batch_size} decoding requests" if self.disable_by_batch_size else ""
        return f"{what}, up to {self.num_speculative_tokens} tokens a step{off}"


def ngram_match(tokens: Sequence[int], min_n: int, max_n: int) -> tuple[int, int]:
    """The longest n in max_n..min_n whose last n tokens occur earlier in `tokens` (ending before the last token), and
    where the tokens that followed their latest such occurrence start: (n, start), or (0, -1) when none occurs."""
    seq = np.asarray(tokens, dtype=np.int64)
    if len(seq) < 2:
        return 0, -1
    ends = np.flatnonzero(seq[:-1] == seq[-1])  # where an earlier occurrence of the last token ends
    length = np.ones(len(ends), dtype=np.int64)  # how many of the last tokens match, ending there (up to max_n)
    alive = np.ones(len(ends), dtype=bool)
    for t in range(1, min(max_n, len(seq) - 1)):
        before = ends - t
        alive &= before >= 0
        alive[alive] = seq[before[alive]] == seq[-1 - t]
        length += alive
    n = min(int(length.max(initial=0)), max_n)
    if n < min_n:
        return 0, -1
    return n, int(ends[np.flatnonzero(length >= n)[-1]]) + 1


def propose_ngram(tokens: Sequence[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Up to `k` draft tokens by prompt lookup: for the longest n in max_n..min_n whose last n tokens occur earlier in
    `tokens`, the tokens that followed their latest earlier occurrence (the nearest context: an edit of a passage
    repeats what it just copied). [] when no such n-gram occurs. As vLLM's `prompt_lookup_min` / `prompt_lookup_max`,
    except that vLLM takes the first occurrence."""
    if k < 1 or min_n < 1 or max_n < min_n:
        raise ValueError(f"k >= 1 and 1 <= min_n <= max_n, got k={k}, min_n={min_n}, max_n={max_n}")
    n, start = ngram_match(tokens, min_n, max_n)
    return np.asarray(tokens[start : start + k]).tolist() if n else []


HOPEFUL = 6 / 7  # the acceptance a draft is taken to have before any evidence: first drafts are worth trying


@dataclass
class Acceptance:
    """A record of verified draft tokens, as a per-token acceptance rate: each verified position up to the first
    rejection is a trial. Evidence fades (by `fade` a verification, by IDLE_FADE a step that verified none of the
    drafts offered) towards a prior, so that drafts that failed earlier are tried again later (text that starts
    copying after it did not)."""

    accepted: float = 0.0
    rejected: float = 0.0
    fade: float = 0.8
    WEIGHT = 3.5  # pseudo-trials of the prior
    IDLE_FADE = 0.99

    def rate(self, prior: float = HOPEFUL) -> float:
        return (self.accepted + self.WEIGHT * prior) / (self.accepted + self.rejected + self.WEIGHT)

    def update(self, proposed: int, accepted: int) -> None:
        self.accepted = self.fade * self.accepted + accepted
        self.rejected = self.fade * self.rejected + (1 if accepted < proposed else 0)

    def idle(self) -> None:
        self.accepted *= self.IDLE_FADE
        self.rejected *= self.IDLE_FADE


@dataclass
class Drafting:
    """A decoding request's speculation state (Request.spec): its acceptance by the kind of draft (`source`: the
    length of the n-gram prompt lookup matched, 0 for a draft model's), the source of its current draft, and its
    back-off."""

    records: dict[int, Acceptance] = field(default_factory=dict)
    source: int = 0
    hold: bool = False  # no draft at the next step (a position the last verification left undecided)


@dataclass
class StepCosts:
    """Seconds of a decode step by its number of rows, as measured (a moving average per row count), and estimated
    in between by linear interpolation; beyond the largest count measured, each row past it costing what a row
    cost on average between the smallest and the largest (a step much larger than any measured yet, many streams
    with drafts, was taken as cheap as the largest, and chosen on that, again and again at each new size), or, while
    one count is known, as that one (so that a larger step gets measured once, not assumed costly forever) or in
    proportion (`proportional`)."""

    seconds: dict[int, float] = field(default_factory=dict)
    samples: dict[int, int] = field(default_factory=dict)
    # While one count is known, a larger one is estimated as that one (False: a larger step gets tried and measured)
    # or in proportion to the rows (True: as if compute-bound; for a cost that is paid before anything is measured,
    # a draft model's catch-up of every request's prompt, the cautious guess).
    proportional: bool = False
    WEIGHT = 0.3  # of a new measurement

    _table: tuple[list[int], list[float], list[float]] | None = field(default=None, repr=False, compare=False)

    def record(self, rows: int, seconds: float) -> None:
        old = self.seconds.get(rows)
        self.seconds[rows] = seconds if old is None else (1 - self.WEIGHT) * old + self.WEIGHT * seconds
        self.samples[rows] = self.samples.get(rows, 0) + 1
        self._table = None

    def estimate(self, rows: int) -> float:
        """Never less than a step of fewer rows was measured to cost: a count that measured cheaper than smaller ones
        (noise; a GEMM's speed jumping with its shape) is not chosen for that, again and again. (Called for every
        draft token a plan weighs, 128 a step at 16 streams and k = 8: a sorted table, rebuilt once a record.)"""
        if not self.seconds:
            return 1.0
        if self._table is None:
            keys = sorted(self.seconds)
            values = [self.seconds[k] for k in keys]
            self._table = keys, values, list(itertools.accumulate(values, max))
        keys, values, dearest = self._table
        i = bisect.bisect_left(keys, rows)  # keys[:i] < rows <= keys[i:]
        fewer = dearest[i - 1] if i else 0.0
        if i < len(keys) and keys[i] == rows:
            line = values[i]
        elif i == 0:
            line = values[0]
        elif i < len(keys):  # between two measured counts
            a, b = keys[i - 1], keys[i]
            line = values[i - 1] + (values[i] - values[i - 1]) * (rows - a) / (b - a)
        elif len(keys) == 1:
            line = values[0] * (rows / keys[0] if self.proportional else 1.0)
        else:  # beyond the largest: the average cost a row from the smallest to the largest
            per_row = max(values[-1] - values[0], 0.0) / (keys[-1] - keys[0])
            line = values[-1] + per_row * (rows - keys[-1])
        return max(line, fewer)


@dataclass
class SpecStats:
    """vLLM's spec-decode counters: drafts verified, their tokens, the tokens accepted, and accepted tokens by
    position in the draft."""

    drafts: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)


BASELINE_EVERY = 50  # steps: one in this many runs without drafts, measuring what a plain step costs now
POOLED_FADE = 0.9  # of the acceptance every request's drafts of a kind have had: by a verification
MARGIN = 1.1  # drafts are verified only where they promise 10% more tokens a second than a plain step


class Speculator:
    """Proposes each step's drafts (`propose`), learns from their verification (`verified`) and from the steps'
    times (`timed`). `draft` is the draft model's runner (a ModelRunner over the target's block geometry: the draft's
    keys and values of a position sit in the same block as the target's), None for prompt lookup."""

    def __init__(self, config: SpeculativeConfig, draft=None, *, max_step_tokens: int = 512):
        if (config.method == "draft_model") != (draft is not None):
            raise ValueError("a draft runner goes with method 'draft_model', and only with it")
        self.config, self.draft = config, draft
        self.k = config.num_speculative_tokens
        self.max_step_tokens = max_step_tokens
        self.costs = StepCosts()
        # seconds of one batched draft forward, by its number of requests (more requests than ever drafted together:
        # taken to cost in proportion, so that many streams start drafting only where that still pays)
        self.draft_step = StepCosts(proportional=True)
        # seconds a token of a draft model's catch-up (tokens its cache lacks, beyond the last step's: a prompt, or
        # the tokens a request made while it was not drafting; a moving average, 0 until measured)
        self.catch_up = 0.0
        self.stats = SpecStats(accepted_per_position=[0] * self.k)
        self.pooled: dict[int, Acceptance] = {}  # acceptance by the kind of draft (Drafting.source), every request's
        self._steps = 0
        # What a measured time becomes before the plan uses it: where several processes each run this engine on
        # their shard of the model (offline tensor parallelism), rank 0's time for all, so that all plan one step.
        self.share: Callable[[float], float] = lambda seconds: seconds

    # Choosing

    def propose(self, running: Sequence[Request], pool: BlockPool, max_seq_len: int) -> None:
        """Set `draft` on the decoding requests among `running` worth speculating for this step (others get [])."""
        decoding = [
            r
            for r in running
            if r.status is Status.RUNNING and r.pending == 1 and r.computed > 0 and not r.scoring_behind
        ]
        for r in decoding:
            r.draft = []
        limit = self.config.disable_by_batch_size
        if not decoding or (limit is not None and len(decoding) >= limit):
            return
        caps = {}
        for r in decoding:
            cap = min(self.k, r.max_tokens - len(r.output) - 1, max_seq_len - r.num_tokens - 1)
            if r.spec is not None and r.spec.hold:
                r.spec.hold, cap = False, 0
            if cap > 0:
                caps[id(r)] = cap
                if r.spec is None:
                    r.spec = Drafting()
        candidates = [r for r in decoding if id(r) in caps]
        if not candidates:
            return
        if self.draft is None:
            lo, hi = self.config.prompt_lookup_min, self.config.prompt_lookup_max
            offers = []
            for r in candidates:
                tokens = np.asarray(r.tokens, dtype=np.int64)
                proposal = propose_ngram(tokens, caps[id(r)], lo, hi)
                r.spec.source = ngram_match(tokens, lo, hi)[0] if proposal else 0  # the kind: how long a match
                offers.append((r, proposal))
            plan = self._plan(len(decoding), [(r, len(p)) for r, p in offers], draft_cost=None)
            for r, proposal in offers:
                r.draft = proposal[: plan.get(id(r), 0)]
            return
        plan = self._plan(len(decoding), [(r, caps[id(r)]) for r in candidates], draft_cost=self.draft_step)
        chosen = [(r, plan[id(r)]) for r in candidates if plan.get(id(r), 0) > 0]
        # room for the draft's own positions (last token .. num_tokens + n - 2), leaving a block a running request
        spare = pool.num_free - len(running)
        room = []
        for r, n in chosen:
            need = pool.blocks_for(r.num_tokens + n - 1) - len(r.blocks)
            if need <= spare and pool.grow(r.blocks, r.num_tokens + n - 1):
                spare -= max(need, 0)
                room.append((r, n))
        if room:
            start = time.perf_counter()
            prompts, tokens = self._draft_greedy(room)  # a prompt's catch-up is not what a draft token costs
            seconds = (time.perf_counter() - start - prompts) / max(n for _, n in room)
            self.draft_step.record(len(room), self.share(seconds))
            if tokens:
                rate, w = self.share(prompts / tokens), StepCosts.WEIGHT
                self.catch_up = (1 - w) * self.catch_up + w * rate if self.catch_up else rate

    def _plan(self, n: int, offers: list[tuple[Request, int]], draft_cost: StepCosts | None) -> dict[int, int]:
        """How many draft tokens to verify for each request (by id), to maximise expected tokens per second: the
        next draft token of request r is accepted with probability rate(r)^(position + 1); a step of n + c rows
        costs costs.estimate(n + c) seconds (plus, for a draft model, its forwards, and the share of its catch-up that
        falls to this step: `_catch_up_share`). Now and then none: the cost the drafts are weighed against is
        measured, not assumed (a few steps of each batch size at first, then one in BASELINE_EVERY)."""
        self._steps += 1
        plan: dict[int, int] = {}
        if self.costs.samples.get(n, 0) >= 3 and self._steps % BASELINE_EVERY:
            rates = {id(r): self.rate(r) for r, m in offers if m}
            gains = sorted(((rates[id(r)] ** (j + 1), id(r)) for r, m in offers for j in range(m)), key=lambda g: -g[0])
            upfront = {id(r): self._catch_up_share(r, m) for r, m in offers} if draft_cost is not None else {}
            plain = n / self.costs.estimate(n)
            best, best_c, expected, catch_up = plain, 0, float(n), 0.0
            taken: dict[int, int] = {}
            for c, (gain, rid) in enumerate(gains, 1):
                expected += gain
                if rid not in taken:
                    catch_up += upfront.get(rid, 0.0)
                taken[rid] = taken.get(rid, 0) + 1
                rate = expected / (self._cost(n + c, draft_cost, taken) + catch_up)
                if rate > best:
                    best, best_c = rate, c
            if best >= MARGIN * plain:  # else within the cost model's error: not worth it
                for _, rid in gains[:best_c]:
                    plan[rid] = plan.get(rid, 0) + 1
        declined = {r.spec.source for r, m in offers if m and id(r) not in plan}
        for r, m in offers:
            own = r.spec.records.get(r.spec.source)
            if m and id(r) not in plan and own is not None:
                own.idle()
        for source in declined & self.pooled.keys():  # once a step, however many requests
            self.pooled[source].idle()
        return plan

    def rate(self, request: Request) -> float:
        """The acceptance expected of `request`'s draft: its own record for drafts of this kind, drawn towards what
        such drafts have had in every request lately (a 1-token prompt-lookup match in open-ended writing is rarely
        right, a 3-token match in a passage being copied nearly always is). A request's first draft of a kind is
        taken hopefully, so that a request that copies is found even where others did not."""
        own = request.spec.records.get(request.spec.source)
        if own is None:
            return HOPEFUL
        return own.rate(self._pooled(request.spec.source).rate())

    def _pooled(self, source: int) -> Acceptance:
        """Every request's record for drafts of kind `source`."""
        return self.pooled.setdefault(source, Acceptance(fade=POOLED_FADE))

    def _catch_up_share(self, request: Request, offer: int) -> float:
        """Seconds of the draft model's catch-up of `request` (the tokens its cache lacks, where more than a step
        adds) that a step drafting for it pays: the catch-up spread over the tokens the request has left to make, this
        step charged for the tokens it expects (one, and `offer` drafts at the request's acceptance). Paid once, a
        catch-up serves every later step, so one stream catches up its prompt for a long reply; but at the end of a
        reply, or for a request that many streams kept from drafting until now, it is not worth it."""
        lag = request.num_tokens - min(request.draft_computed, request.computed)
        if lag <= self.k + 1 or not self.catch_up:
            return 0.0
        left = max(request.max_tokens - len(request.output), 1)
        expected = 1 + sum(self.rate(request) ** (j + 1) for j in range(offer))
        return lag * self.catch_up * min(1.0, expected / left)

    def _cost(self, rows: int, draft_cost: StepCosts | None, taken: dict[int, int]) -> float:
        """Seconds of a step of `rows` rows, and of the draft model's forwards for the drafts `taken` (by request)."""
        seconds = self.costs.estimate(rows)
        if draft_cost is not None and draft_cost.seconds:
            seconds += draft_cost.estimate(len(taken)) * max(taken.values())
        return seconds

    @torch.inference_mode()
    def _draft_greedy(self, chosen: list[tuple[Request, int]]) -> tuple[float, int]:
        """Run the draft model over the tokens its cache lacks (at most max_step_tokens of them a step: a request
        whose catch-up does not fit gets part of it and no draft this time), then `n` greedy tokens for each.
        Returns the seconds of that catch-up and its tokens where it was more than a step's worth of tokens (a
        prompt), else (0, 0)."""
        runner, budget = self.draft, self.max_step_tokens
        ready, runs = [], []  # requests that get drafts; (request, catch-up tokens) to run
        for r, n in chosen:
            r.draft_computed = min(r.draft_computed, r.computed)
            need = r.num_tokens - r.draft_computed
            if need <= budget:
                ready.append((r, n))
                runs.append((r, r.tokens[r.draft_computed :]))
                budget -= need
            elif budget > 0:
                runs.append((r, r.tokens[r.draft_computed : r.draft_computed + budget]))
                budget = 0
        if not runs:
            return 0.0, 0
        start = time.perf_counter()
        hidden = runner.prefill([t for _, t in runs], [r.blocks for r, _ in runs], [r.draft_computed for r, _ in runs])
        prompts, tokens = 0.0, 0
        if max(len(t) for _, t in runs) > self.k + 1:
            prompts, tokens = time.perf_counter() - start, sum(len(t) for _, t in runs)
        ends = np.cumsum([len(t) for _, t in runs]) - 1
        for r, t in runs:
            r.draft_computed += len(t)
        if not ready:
            return prompts, tokens
        logits = runner.logits(hidden[torch.as_tensor(ends[: len(ready)])])  # the ready requests come first
        for (r, _), t in zip(ready, logits.argmax(dim=-1).tolist()):
            r.draft = [t]
        live = [(r, n) for r, n in ready if n > 1]
        while live:
            logits = runner.decode(
                [r.draft[-1] for r, _ in live],
                [r.blocks for r, _ in live],
                [r.num_tokens - 1 + len(r.draft) for r, _ in live],
            )
            for (r, _), t in zip(live, logits.argmax(dim=-1).tolist()):
                r.draft_computed += 1
                r.draft.append(t)
            live = [(r, n) for r, n in live if len(r.draft) < n]
        return prompts, tokens

    # Learning

    def timed(self, rows: int, seconds: float) -> None:
        """A decode step of `rows` rows (tokens and draft tokens, no prompt) took `seconds`."""
        self.costs.record(rows, self.share(seconds))

    def verified(self, request: Request, draft: Sequence[int], tokens: Sequence[int], *, settled: bool = True) -> None:
        """A draft was verified: `tokens` are the step's tokens for `request` (accepted draft tokens, then one; fewer
        when a position was left undecided, `settled` False: the next step computes it without a draft)."""
        if not settled and request.spec is not None:
            request.spec.hold = True
        accepted = 0
        while accepted < min(len(draft), len(tokens)) and tokens[accepted] == draft[accepted]:
            accepted += 1
        stats = self.stats
        stats.drafts += 1
        stats.draft_tokens += len(draft)
        stats.accepted_tokens += accepted
        for i in range(accepted):
            stats.accepted_per_position[i] += 1
        if request.spec is not None:
            source = request.spec.source
            request.spec.records.setdefault(source, Acceptance()).update(len(draft), accepted)
            self._pooled(source).update(len(draft), accepted)
