"""Scheduler: which requests run in the next forward pass, and how many of their tokens (continuous batching with
chunked prefill over a paged KV cache). No tensors here: the engine runs what a `Step` says and reports back.

Each step has a token budget. Running requests come first, oldest first: a decoding one needs one token, one still
prefilling its next chunk. Then waiting requests are admitted, first come first served, their prompts cut into
chunks that fit what is left of the budget, so a long prompt never stalls the running streams for more than one
budget's worth of tokens. When the KV cache has no block for a running request, the most recently admitted request
is preempted: its blocks are freed and it waits at the head of the queue, to be recomputed (prompt and output so
far) when blocks free up. The queue is bounded: beyond it `add` refuses.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Hashable, Mapping

from lamina.engine.blocks import BlockPool
from lamina.errors import CapacityError, RequestError


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


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


@dataclass(eq=False)
class Sequence:
    """The scheduler's view of a request: its tokens, how many are cached, where it stands."""

    request_id: Hashable
    prompt: list[int]
    max_tokens: int
    output: list[int] = field(default_factory=list)
    computed: int = 0  # leading tokens whose keys and values are in the cache
    status: Status = Status.WAITING
    finish_reason: str | None = None
    preemptions: int = 0

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def pending(self) -> int:
        """Tokens to run before the next token can be sampled."""
        return len(self.prompt) + len(self.output) - self.computed


@dataclass(frozen=True)
class Chunk:
    """Run `length` tokens of a sequence from position `start`; `samples`: the chunk ends at the sequence's last token,
    so the forward pass yields its next-token logits."""

    seq: Sequence
    start: int
    length: int

    @property
    def samples(self) -> bool:
        return self.start + self.length == len(self.seq.prompt) + len(self.seq.output)

    @property
    def tokens(self) -> list[int]:
        return self.seq.tokens[self.start : self.start + self.length]


@dataclass(frozen=True)
class Step:
    chunks: tuple[Chunk, ...]
    preempted: tuple[Hashable, ...]  # requests sent back to the queue this step (their cached tokens are gone)
    finished: tuple[Sequence, ...] = ()  # requests that can never grow: longer than the whole cache ("length")

    @property
    def num_tokens(self) -> int:
        return sum(c.length for c in self.chunks)


class Scheduler:
    def __init__(self, config: SchedulerConfig, pool: BlockPool):
        self.config, self.pool = config, pool
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.requests: dict[Hashable, Sequence] = {}

    def add(self, request_id: Hashable, prompt: list[int], max_tokens: int) -> Sequence:
        """Queue a request. Raises RequestError for a prompt that can never run, CapacityError when the queue is
        full (the server answers 429: try again later)."""
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        if not prompt:
            raise RequestError("the prompt is empty: a request needs at least one token")
        if len(prompt) >= self.config.max_seq_len:
            raise RequestError(
                f"prompt has {len(prompt)} tokens; max_seq_len is {self.config.max_seq_len} (prompt and at least one "
                "new token must fit)"
            )
        if self.pool.blocks_for(len(prompt) + 1) > self.pool.num_blocks:
            raise RequestError(
                f"prompt has {len(prompt)} tokens but the KV cache holds {self.pool.num_blocks * self.pool.block_size}"
            )
        if max_tokens <= 0:
            raise RequestError(f"max_tokens must be positive, got {max_tokens}")
        # The bound is on requests beyond the running batch: those that will start at the next step do not count.
        free = max(0, self.config.max_running - len(self.running))
        if len(self.waiting) >= self.config.max_waiting + free:
            raise CapacityError(
                f"the queue is full ({len(self.waiting)} requests waiting, at most {self.config.max_waiting} beyond "
                "the running batch); try again later"
            )
        seq = Sequence(request_id, list(prompt), max_tokens)
        self.waiting.append(seq)
        self.requests[request_id] = seq
        return seq

    def abort(self, request_id: Hashable) -> None:
        """Drop a request wherever it is (a client went away); its blocks are free at once. Unknown ids are ignored."""
        seq = self.requests.get(request_id)
        if seq is not None:
            self._finish(seq, "abort")

    def schedule(self) -> Step:
        budget = self.config.max_step_tokens
        chunks: list[Chunk] = []
        preempted: list[Hashable] = []
        finished: list[Sequence] = []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.pending, budget)
            while not self.pool.reserve(seq.request_id, seq.computed + n):
                victim = self.running[-1]
                if victim is seq and len(self.running) == 1:  # alone and still too long for the whole cache
                    self._finish(seq, "length")
                    finished.append(seq)
                    break
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue  # it was finished or preempted: the list moved up
            chunks.append(Chunk(seq, seq.computed, n))
            budget -= n
            i += 1
        # Admit waiting requests, oldest first, while there is room (none in a step that had to preempt).
        while self.waiting and not preempted and len(self.running) < self.config.max_running and budget > 0:
            seq = self.waiting[0]
            n = min(seq.pending, budget)
            if not self.pool.reserve(seq.request_id, seq.computed + n):
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            chunks.append(Chunk(seq, seq.computed, n))
            budget -= n
        return Step(tuple(chunks), tuple(preempted), tuple(finished))

    def advance(self, step: Step, sampled: Mapping[Hashable, int]) -> list[Sequence]:
        """Record a step the engine ran: each chunk's tokens are now cached, and each sampling chunk's new token
        (`sampled[request_id]`) joins its output. Returns the sequences that reached their token limit (finished,
        reason "length"); the engine finishes others it decides are done (a stop token) with `finish`."""
        done = []
        for chunk in step.chunks:
            seq = chunk.seq
            if seq.status is not Status.RUNNING:
                continue  # aborted while the step ran
            seq.computed = chunk.start + chunk.length
            if chunk.samples:
                seq.output.append(sampled[seq.request_id])
                if len(seq.output) >= seq.max_tokens or len(seq.prompt) + len(seq.output) >= self.config.max_seq_len:
                    self._finish(seq, "length")
                    done.append(seq)
        return done

    def finish(self, request_id: Hashable, reason: str) -> None:
        self._finish(self.requests[request_id], reason)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.pool.release(seq.request_id)
        seq.computed, seq.status = 0, Status.WAITING
        seq.preemptions += 1
        self.waiting.appendleft(seq)

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self.pool.release(seq.request_id)
        seq.status, seq.finish_reason = Status.FINISHED, reason
        self.requests.pop(seq.request_id, None)

    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting
