"""Scheduler: which requests run in the next forward pass, and how many of their tokens (continuous batching with
chunked prefill over a paged KV cache). No tensors here: the engine runs what a `Step` says and reports back.

Each step has a token budget. Running requests come first, oldest first: a decoding one needs one token, one still
prefilling its next chunk. Then waiting requests are admitted, first come first served, their prompts cut into
chunks that fit what is left of the budget, so a long prompt never stalls the running streams for more than one
budget's worth of tokens. When the KV cache has no block for a running request, the most recently admitted request
is preempted: its blocks are freed and it waits at the head of the queue, to be recomputed (prompt and output so
far) when blocks free up. The queue is bounded: beyond it `add` refuses.

With prefix caching (the pool's `caching`), a request admitted with nothing computed first takes the cached blocks
that begin its tokens and computes only the rest; each block it fills is published for later requests. A request
whose next block is being computed by a running request's prompt waits a step or more and then takes it, so prompts
sharing a prefix that arrive together (a batch with one system prompt) compute it once.

Speculative decoding: a decoding request may carry a draft (`Request.draft`, proposed by the engine core); its chunk
then runs its last token and the draft's tokens, within the budget and the request's limits, in blocks taken for
them. `advance` keeps the accepted draft tokens and gives back the blocks only rejected ones filled.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Hashable, Mapping

from lamina.engine.blocks import BlockPool, block_keys
from lamina.engine.request import Request, Status
from lamina.errors import CapacityError, RequestError


@dataclass(frozen=True)
class SchedulerConfig:
    max_running: int  # sequences in one forward pass at most
    max_waiting: int  # requests queued beyond the running batch at most; add() refuses more
    max_step_tokens: int  # tokens in one forward pass at most: decode tokens plus prefill chunks
    max_seq_len: int  # prompt plus output, per request

    def __post_init__(self):
        for name in ("max_running", "max_step_tokens", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {self.max_waiting}")


@dataclass(frozen=True)
class Chunk:
    """Run `length` tokens of a request from position `start`; `samples`: the chunk ends at the request's last token
    and the request wants a new one, so the forward pass yields its next-token logits. A decode chunk may carry
    `draft`: tokens proposed to follow the last one (speculative decoding), run after it (they are the chunk's last
    len(draft) tokens) so that one pass gives the logits that verify each of them."""

    request: Request
    start: int
    length: int
    draft: tuple[int, ...] = ()

    @property
    def samples(self) -> bool:
        return self.start + self.length - len(self.draft) == self.request.num_tokens and self.request.max_tokens > 0

    @property
    def tokens(self) -> list[int]:
        # Sliced from the prompt and the output without joining them (a decode step would copy each whole sequence).
        r, start, end = self.request, self.start, self.start + self.length - len(self.draft)
        n = len(r.prompt)
        if end <= n:
            own = r.prompt[start:end]
        elif start >= n:
            own = r.output[start - n : end - n]
        else:
            own = r.prompt[start:] + r.output[: end - n]
        return own + list(self.draft) if self.draft else own


@dataclass(frozen=True)
class Step:
    chunks: tuple[Chunk, ...]
    preempted: tuple[Hashable, ...]  # requests sent back to the queue this step (their cached tokens are gone)
    finished: tuple[Request, ...] = ()  # requests that can never grow: longer than the whole cache ("length")

    @property
    def num_tokens(self) -> int:
        return sum(c.length for c in self.chunks)


# Prompt positions scored a step from the prefix cache's hidden states (lm-eval sending a context again for each
# choice): a backlog beyond this is scored by chunks of no tokens, a step at a time, before the request runs on,
# instead of all at once (2,000 positions' log-probabilities took one 0.9 s step of every stream, SmolLM2, 2 cores).
SCORE_STEP = 256


@dataclass
class PrefillPacer:
    """Stall-free steps (Sarathi-Serve's idea, with a budget in time instead of tokens): while requests decode, a
    step's prompt tokens are limited so that the step takes about `target` seconds, and a long prompt is spread over
    steps instead of pausing every stream for its whole chunk. Both are learned from this machine's steps: the target
    is FACTOR times the typical decode-only step (a slow average, at least FLOOR), the prompt tokens get what the
    recent decode-only steps leave of it, and what prompt tokens add to a step is fitted to the recent
    steps that ran them, as a line (a step's fixed cost of running a prompt chunk, then a cost per token), one line
    for each depth of the prompt (a token 2,000 positions in attends to 2,000 keys: on 2 cores it costs twice what
    one near the start does) and for chunks whose positions are scored (their logits are computed too). Until both
    are measured, max_step_tokens applies."""

    decode_s: float = 0.0  # seconds of a decode-only step (a slow moving average: the target's base)
    recent_s: float = 0.0  # the same, a fast moving average (what this step's decode rows will cost)
    # (depth bucket, scored) -> the recent (prompt tokens, seconds they added) of chunks starting at that depth
    samples: dict = field(default_factory=dict)
    FACTOR, FLOOR = 2.5, 0.025
    # of a new decode-only step in decode_s: slow (a time constant of ~50 steps), so that the target follows the
    # typical step, not a burst of streams (a target 3x a burst's slower steps put the inter-token tail at 3.9x p50)
    WEIGHT = 0.02
    FAST = 0.3  # of a new decode-only step in recent_s
    MIN_TOKENS = 8  # a prompt always advances
    KEEP = 16  # samples kept a bucket

    @staticmethod
    def bucket(depth: int) -> int:
        """Depths 0-127, 128-255, 256-511, 512-1023, ...: 0, 1, 2, 3, ..."""
        return (max(depth, 0) // 128).bit_length()

    @property
    def target(self) -> float:
        return max(self.FLOOR, self.FACTOR * self.decode_s)

    def record(self, seconds: float, prompt_tokens: int, decoding: bool, depth: int = 0, scored: bool = False) -> None:
        """A step took `seconds`, with `prompt_tokens` prompt tokens (from position `depth` on; `scored`: their
        positions' log-probabilities computed) and (`decoding`) decode rows."""
        if prompt_tokens == 0:
            if decoding and not scored:
                w, fast = (self.WEIGHT, self.FAST) if self.decode_s else (1.0, 1.0)
                self.decode_s = (1 - w) * self.decode_s + w * seconds
                self.recent_s = (1 - fast) * self.recent_s + fast * seconds
        elif self.decode_s or not decoding:
            kept = self.samples.setdefault((self.bucket(depth), scored), deque(maxlen=self.KEEP))
            kept.append((prompt_tokens, max(seconds - (self.recent_s if decoding else 0.0), 0.0)))

    def budget(self, depth: int = 0, scored: bool = False) -> int | None:
        """Prompt tokens for a step that also decodes, of a chunk from position `depth` (`scored`: with its
        positions' log-probabilities); None while unmeasured. The line of that depth and kind, or while it has no
        sample, of all the kind's depths (else of every chunk)."""
        if not self.decode_s or not self.samples:
            return None
        samples = self.samples.get((self.bucket(depth), scored))
        if not samples:
            samples = [x for (_, kind), kept in self.samples.items() if kind == scored for x in kept]
        if not samples:
            samples = [x for kept in self.samples.values() for x in kept]
        fixed, per_token = self._line(samples)
        room = self.target - self.recent_s - fixed
        return max(self.MIN_TOKENS, int(room / per_token)) if per_token > 0 else None

    @staticmethod
    def _line(samples) -> tuple[float, float]:
        """Least squares of seconds on tokens over `samples`: (fixed seconds >= 0, seconds a token)."""
        n = len(samples)
        mx = sum(t for t, _ in samples) / n
        my = sum(s for _, s in samples) / n
        var = sum((t - mx) ** 2 for t, _ in samples)
        slope = sum((t - mx) * (s - my) for t, s in samples) / var if var else 0.0
        if slope <= 0:  # one chunk size so far (or noise): all of it per token
            return 0.0, my / mx
        fixed = my - slope * mx
        return (fixed, slope) if fixed >= 0 else (0.0, my / mx)


class Scheduler:
    def __init__(self, config: SchedulerConfig, pool: BlockPool):
        self.config, self.pool = config, pool
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[Hashable, Request] = {}  # by id: the same objects, for abort
        # Stall-free steps while others decode (the server sets one: offline, whole batches prefill at full speed)
        self.pacer: PrefillPacer | None = None

    def add(self, request: Request, *, max_waiting: int | None = None) -> None:
        """Queue a request, resolving its budget (`max_tokens` None: the params', else what the context leaves).
        Raises RequestError for a request that can never run, CapacityError when more than `max_waiting` (default:
        the config's) would wait beyond the running batch (the server answers 429: try again later)."""
        prompt, limit = request.prompt, self.config.max_seq_len
        if request.request_id in self.requests:
            raise RequestError(f"request id {request.request_id!r} is already in use")
        if not prompt:
            raise RequestError("the prompt is empty: a request needs at least one token")
        budget = request.max_tokens
        if budget is None:
            budget = request.params.max_tokens or max(limit - len(prompt), 1)
        if budget < 0:
            raise RequestError(f"max_tokens must be >= 0, got {budget}")
        needed = len(prompt) + (1 if budget else 0)
        if needed > limit:
            raise RequestError(
                f"prompt has {len(prompt)} tokens; max_seq_len is {limit} (prompt and at least one new token must fit)"
            )
        if self.pool.blocks_for(needed) > self.pool.num_blocks:
            raise RequestError(
                f"prompt has {len(prompt)} tokens but the KV cache holds {self.pool.num_blocks * self.pool.block_size}"
            )
        bound = self.config.max_waiting if max_waiting is None else max_waiting
        # The bound is on requests beyond the running batch: those that will start at the next step do not count.
        free = max(0, self.config.max_running - len(self.running))
        if len(self.waiting) >= bound + free:
            raise CapacityError(
                f"the queue is full ({len(self.waiting)} requests waiting, at most {bound} beyond "
                "the running batch); try again later"
            )
        request.max_tokens = budget
        self.waiting.append(request)
        self.requests[request.request_id] = request

    def abort(self, request_id: Hashable) -> None:
        """Drop a request wherever it is (a client went away); its blocks are free at once. Unknown ids are ignored."""
        request = self.requests.get(request_id)
        if request is not None:
            self._finish(request, "abort")

    def schedule(self) -> Step:
        budget = self.config.max_step_tokens
        # prompt tokens this step may run besides the decodes: where requests decode, the pacer's for the step's
        # first prompt chunk (None until then: its depth and kind size it)
        paced = self.pacer is not None and any(r.pending <= 1 for r in self.running)
        prompts = None if paced else budget
        chunks: list[Chunk] = []
        preempted: list[Hashable] = []
        finished: list[Request] = []
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if req.scoring_behind > SCORE_STEP:  # scores from the cache first (a chunk of no tokens)
                chunks.append(Chunk(req, req.computed, 0))
                i += 1
                continue
            n = min(req.pending, budget)
            if n > 1:  # a prompt (or, after preemption, tokens to recompute): within the prompts' share
                if prompts is None:
                    prompts = self._paced(req, budget)
                if prompts <= 0:
                    i += 1
                    continue
                n = min(n, prompts)
                prompts -= n
            draft = self._draft(req, budget)
            # room for the draft's positions, leaving the blocks the running requests after this one need now:
            # decode as usual otherwise (no request is ever preempted for a draft)
            extra = self.pool.blocks_for(req.computed + n + len(draft)) - len(req.blocks)
            if draft and extra > 0 and extra > self.pool.num_free - self._needed(self.running[i + 1 :]):
                draft = ()
            if draft and not self.pool.grow(req.blocks, req.computed + n + len(draft)):
                draft = ()
            n += len(draft)
            while not self.pool.grow(req.blocks, req.computed + n):
                victim = self.running[-1]
                if victim is req and len(self.running) == 1:  # alone and still too long for the whole cache
                    self._finish(req, "length")
                    finished.append(req)
                    break
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is req:
                    break
            if req.status is not Status.RUNNING:
                continue  # it was finished or preempted: the list moved up
            chunks.append(Chunk(req, req.computed, n, draft))
            budget -= n
            i += 1
        # Admit waiting requests, oldest first, while there is room (none in a step that had to preempt).
        in_flight = self._in_flight()
        deferred: list[Request] = []
        while (
            self.waiting
            and not preempted
            and len(self.running) < self.config.max_running
            and budget > 0
            and (prompts is None or prompts > 0)
        ):
            req = self.waiting.popleft()
            hit = self._take_cached(req)
            if in_flight and self._waits_for(req, in_flight):
                self._release(req)  # its next block is being computed: take it from the cache next time
                deferred.append(req)
                continue
            if prompts is None:
                prompts = self._paced(req, budget)
            n = min(req.pending, budget, prompts) if req.scoring_behind <= SCORE_STEP else 0
            if not self.pool.grow(req.blocks, req.computed + n):
                self._release(req)
                self.waiting.appendleft(req)
                break
            if hit is not None:
                self.pool.count_query(req.num_tokens, hit)
                if req.cached_tokens is None:
                    req.cached_tokens = hit
            req.status = Status.RUNNING
            self.running.append(req)
            chunks.append(Chunk(req, req.computed, n))
            budget -= n
            prompts -= n
            if self.pool.caching:
                in_flight.update(self._prompt_keys(req)[req.computed // self.pool.block_size :])
        self.waiting.extendleft(reversed(deferred))
        return Step(tuple(chunks), tuple(preempted), tuple(finished))

    def _paced(self, req: Request, budget: int) -> int:
        """The pacer's prompt tokens for a step whose first prompt chunk is `req`'s (at most `budget`)."""
        return min(budget, self.pacer.budget(req.computed, req.params.prompt_logprobs is not None) or budget)

    def advance(self, step: Step, sampled: Mapping[Hashable, int | list[int]]) -> list[Request]:
        """Record a step the engine ran: each chunk's tokens are now cached, and each sampling chunk's new tokens
        (`sampled[request_id]`: one, or for a chunk with a draft the accepted draft tokens and the one after them)
        join its output. Returns the requests that reached their token limit (finished,
        reason "length"; a request with no token to make, once its prompt is cached); the engine finishes others it
        decides are done (a stop token) with `finish`."""
        done = []
        for chunk in step.chunks:
            req = chunk.request
            if req.status is not Status.RUNNING:
                continue  # aborted while the step ran
            samples = chunk.samples  # (before the output grows)
            req.computed = chunk.start + chunk.length - len(chunk.draft)
            if samples:
                tokens = sampled[req.request_id]
                tokens = [tokens] if isinstance(tokens, int) else tokens
                req.output.extend(tokens)
                if chunk.draft:
                    # The accepted draft tokens' keys and values are cached; those of the rejected ones are not
                    # counted, and the blocks that only they filled go back to the pool.
                    req.computed += len(tokens) - 1
                    keep = self.pool.blocks_for(req.computed)
                    rejected = req.blocks[keep:]
                    del req.blocks[keep:]
                    self.pool.free(rejected)
            if self.pool.caching:
                self._publish(req)
            if not samples and (req.max_tokens or req.computed < req.num_tokens or req.scoring_behind):
                continue
            if len(req.output) >= req.max_tokens or req.num_tokens >= self.config.max_seq_len:
                self._finish(req, "length")
                done.append(req)
        return done

    def _needed(self, requests) -> int:
        """Blocks the running `requests` need for their next chunk at least (one token each)."""
        return sum(max(0, self.pool.blocks_for(r.computed + 1) - len(r.blocks)) for r in requests)

    def _draft(self, req: Request, budget: int) -> tuple[int, ...]:
        """The part of a decoding request's proposed tokens (speculative decoding) that this step can verify: within
        the step's token budget, the request's max_tokens and max_seq_len (each accepted token is an output token).
        The proposal is used once."""
        draft, req.draft = req.draft, []
        if not draft or req.pending != 1 or req.scoring_behind:  # (a prompt still being scored: no draft)
            return ()
        room = min(budget - 1, req.max_tokens - len(req.output) - 1, self.config.max_seq_len - req.num_tokens - 1)
        return tuple(draft[: max(room, 0)])

    def finish(self, request: Request, reason: str) -> None:
        self._finish(request, reason)

    # Prefix caching

    def _prompt_keys(self, req: Request) -> list[int]:
        """The keys of the full blocks of `req`'s prompt (computed once; its output's blocks follow as published)."""
        bs = self.pool.block_size
        if len(req.block_keys) < len(req.prompt) // bs:
            block_keys(req.prompt, bs, req.block_keys)
        return req.block_keys[: len(req.prompt) // bs]

    def _take_cached(self, req: Request) -> int | None:
        """Give a request with nothing computed the cached blocks that begin its tokens (never all of them: its last
        token runs, for its logits); returns how many tokens they hold (None: prefix caching is off, or the request
        already holds blocks)."""
        if not self.pool.caching or req.blocks or req.computed:
            return None
        bs = self.pool.block_size
        tokens = req.prompt + req.output if req.output else req.prompt
        if len(req.block_keys) < len(tokens) // bs:
            block_keys(tokens, bs, req.block_keys)
        req.blocks = self.pool.match(req.block_keys, tokens, (req.num_tokens - 1) // bs)
        req.computed = len(req.blocks) * bs
        req.published = len(req.blocks)
        return req.computed

    def _release(self, req: Request) -> None:
        """Undo _take_cached for a request that is not admitted after all."""
        self.pool.free(req.blocks)
        req.computed = req.published = 0

    def _in_flight(self) -> set[int]:
        """Keys of the prompt blocks running requests have yet to compute."""
        if not self.pool.caching:
            return set()
        bs = self.pool.block_size
        return {key for r in self.running for key in self._prompt_keys(r)[r.computed // bs :]}

    def _waits_for(self, req: Request, in_flight: set[int]) -> bool:
        """Whether the first block `req` has to compute is one a running request is computing now."""
        i = req.computed // self.pool.block_size
        keys = self._prompt_keys(req)
        return i < len(keys) and keys[i] in in_flight

    def _publish(self, req: Request) -> None:
        """Publish the blocks `req` has filled since the last call."""
        bs = self.pool.block_size
        full = min(req.computed // bs, len(req.blocks))
        if full <= req.published:
            return
        tokens = req.prompt + req.output if req.computed > len(req.prompt) else req.prompt
        block_keys(tokens[: full * bs], bs, req.block_keys)
        for i in range(req.published, full):
            self.pool.publish(req.blocks[i], req.block_keys[i], tokens[i * bs : (i + 1) * bs])
        req.published = full

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.pool.free(req.blocks)
        req.computed, req.published, req.status, req.draft_computed, req.draft = 0, 0, Status.WAITING, 0, []
        req.preemptions += 1
        self.waiting.appendleft(req)

    def _finish(self, req: Request, reason: str) -> None:
        if req.status is Status.RUNNING:
            self.running.remove(req)
        elif req.status is Status.WAITING:
            self.waiting.remove(req)
        self.pool.free(req.blocks)
        req.status, req.finish_reason = Status.FINISHED, reason
        self.requests.pop(req.request_id, None)

    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting
