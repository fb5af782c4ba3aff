"""Engine: serves requests, not batches. A request (prompt ids, its own SamplingParams) joins the running batch at
any step and leaves it the step it finishes; the Scheduler decides each step's work (decode tokens of running
requests, chunks of new prompts), the ModelRunner runs it, and the per-request sampling settings are applied to the
batch as tensors (lamina.engine.sampling).

The KV cache is paged: blocks of `block_size` positions from one pool (sized by `kv_cache_memory`, or by default
as much as max_batch_size full-length rows), a block table per request grown as it runs, blocks freed when it
finishes or is aborted, and the newest request preempted (and recomputed later) when the pool runs dry.
"""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass, field
from typing import Hashable, Sequence

import torch

from lamina.engine.blocks import BlockPool
from lamina.engine.generate import Llama
from lamina.engine.kv_cache import KVCache
from lamina.engine.runner import ModelRunner
from lamina.engine.sampling import (
    SamplingBatch,
    SamplingParams,
    apply_logit_bias,
    apply_penalties,
    draw,
    token_logprobs,
    top_logprobs,
    truncate,
)
from lamina.engine.scheduler import Chunk, Scheduler, SchedulerConfig
from lamina.errors import RequestError
from lamina.tokenizer import StreamDecoder


@dataclass(frozen=True)
class RequestOutput:
    """What one step did for one request: a new token and the text it completes (stop strings cut off), or only a
    finish reason ("stop", "length"; "abort" is never reported: the caller aborted). logprob and top_logprobs are
    None unless the request's SamplingParams ask for them."""

    request_id: Hashable
    token: int | None
    text: str
    logprob: float | None
    top_logprobs: tuple[tuple[int, float], ...] | None
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


@dataclass(eq=False)
class _Live:
    """The engine's per-request state beside the scheduler's: sampling settings and state, text so far."""

    params: SamplingParams
    prompt_len: int
    stop_ids: frozenset[int]
    generator: torch.Generator | None
    decoder: StreamDecoder
    counts: torch.Tensor | None = None  # [V] output token counts, for presence/frequency penalties
    seen: torch.Tensor | None = None  # [V] prompt and output tokens, for the repetition penalty
    text: str = ""  # everything decoded so far
    emitted: int = 0  # text[:emitted] has been returned
    completion: list[int] = field(default_factory=list)


class Engine:
    """Continuous batching over one model. Not thread-safe: one thread calls add/abort/step (the server's loop)."""

    def __init__(
        self,
        llama: Llama,
        *,
        max_waiting: int = 256,
        max_step_tokens: int = 512,
        seed: int = 0,
        block_size: int = 16,
        kv_cache_memory: int | None = None,
    ):
        """`kv_cache_memory`: bytes for the KV cache pool (default: room for max_batch_size sequences of
        max_seq_len); `block_size`: positions per block."""
        self.llama = llama
        config = llama.config
        if block_size <= 0:
            raise RequestError(f"block_size must be positive, got {block_size}")
        per_block = block_size * KVCache.bytes_per_token(llama.model.config, config.dtype)
        if kv_cache_memory is None:
            num_blocks = config.max_batch_size * -(-config.max_seq_len // block_size)
        else:
            num_blocks = kv_cache_memory // per_block
            if num_blocks < 1:
                raise RequestError(f"kv_cache_memory {kv_cache_memory} bytes holds no block (one is {per_block} bytes)")
        self.runner = ModelRunner(
            llama.model, config, compile=config.compile, num_blocks=num_blocks, block_size=block_size
        )  # its own KV cache
        self.pool = BlockPool(num_blocks, block_size)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_batch_size, max_waiting, max_step_tokens, config.max_seq_len), self.pool
        )
        self.vocab_size = llama.model.config.vocab_size
        self.generator = torch.Generator(device=config.device).manual_seed(seed)
        self._live: dict[Hashable, _Live] = {}

    def add(
        self, prompt: Sequence[int], params: SamplingParams, *, request_id: Hashable = None, ignore_eos: bool = False
    ) -> Hashable:
        """Queue a request; returns its id (a fresh one unless given). Raises RequestError for a bad prompt or id,
        CapacityError when the queue is full."""
        request_id = uuid.uuid4().hex if request_id is None else request_id
        prompt = [int(t) for t in prompt]
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestError(f"prompt token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        max_tokens = params.max_tokens or self.llama.config.max_seq_len - len(prompt)
        params.check_vocabulary(self.vocab_size)
        self.scheduler.add(request_id, prompt, max_tokens)
        device = self.llama.config.device
        stops = frozenset(params.stop_token_ids) | (frozenset() if ignore_eos else frozenset(self.llama.stop_tokens))
        live = _Live(
            params=params,
            prompt_len=len(prompt),
            stop_ids=stops,
            generator=None if params.seed is None else torch.Generator(device=device).manual_seed(params.seed),
            decoder=StreamDecoder(self.llama.tokenizer),
        )
        if params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1:
            live.counts = torch.zeros(self.vocab_size, dtype=torch.int32, device=device)
            live.seen = torch.zeros(self.vocab_size, dtype=torch.bool, device=device)
            live.seen[torch.tensor(prompt, device=device)] = True
        self._live[request_id] = live
        return request_id

    def abort(self, request_id: Hashable) -> None:
        """Drop a request at once (its cache blocks are free for the next step); unknown ids are ignored."""
        self.scheduler.abort(request_id)
        self._live.pop(request_id, None)

    @property
    def has_work(self) -> bool:
        return not self.scheduler.idle

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one forward pass of the scheduled work; return an output per request that got a token or finished."""
        step = self.scheduler.schedule()
        outputs = [self._finished(seq.request_id, None, "length") for seq in step.finished]
        if not step.chunks:
            return outputs
        sampling = [c for c in step.chunks if c.samples]
        logits = self._forward(step.chunks, sampling)
        tokens, lps, tops = self._sample(logits, sampling)
        length_done = {seq.request_id for seq in self.scheduler.advance(step, dict(zip(self._keys(sampling), tokens)))}
        for chunk, token, lp, top in zip(sampling, tokens, lps, tops):
            outputs.append(self._emit(chunk.seq.request_id, token, lp, top, chunk.seq.request_id in length_done))
        return [o for o in outputs if o is not None]

    # -----------------------------------------------------------------------------------------------------------

    @staticmethod
    def _keys(chunks: Sequence[Chunk]) -> list[Hashable]:
        return [c.seq.request_id for c in chunks]

    def _table(self, chunk: Chunk) -> list[int]:
        return self.pool.table(chunk.seq.request_id)

    def _forward(self, chunks: Sequence[Chunk], sampling: Sequence[Chunk]) -> torch.Tensor:
        """Logits [len(sampling), V] of the sampling chunks' last tokens, in order: decode chunks (one new token of a
        running sequence) in one decode pass, prompt chunks in one packed prefill pass."""
        decode = [c for c in chunks if c.start > 0 and c.length == 1]
        prefill = [c for c in chunks if not (c.start > 0 and c.length == 1)]
        rows: dict[Hashable, torch.Tensor] = {}
        if prefill:
            hidden = self.runner.prefill(
                [c.tokens for c in prefill], [self._table(c) for c in prefill], [c.start for c in prefill]
            )
            ends = list(itertools.accumulate(c.length for c in prefill))
            wanted = [(c, end - 1) for c, end in zip(prefill, ends) if c.samples]
            if wanted:
                logits = self.llama.model.logits(hidden[[i for _, i in wanted]])
                rows.update(zip(self._keys([c for c, _ in wanted]), logits))
        if decode:
            logits = self.runner.decode(
                [c.tokens[0] for c in decode], [self._table(c) for c in decode], [c.start for c in decode]
            )
            rows.update(zip(self._keys(decode), logits))
        return torch.stack([rows[c.seq.request_id] for c in sampling]) if sampling else torch.empty(0)

    def _sample(self, logits: torch.Tensor, chunks: Sequence[Chunk]):
        if not chunks:
            return [], [], []
        lives = [self._live[c.seq.request_id] for c in chunks]
        batch = SamplingBatch.from_params([lv.params for lv in lives], self.vocab_size, logits.device)
        processed = apply_logit_bias(logits, batch)
        if batch.penalties:
            zeros_i = torch.zeros(self.vocab_size, dtype=torch.int32, device=logits.device)
            zeros_b = torch.zeros(self.vocab_size, dtype=torch.bool, device=logits.device)
            counts = torch.stack([lv.counts if lv.counts is not None else zeros_i for lv in lives])
            seen = torch.stack([lv.seen if lv.seen is not None else zeros_b for lv in lives])
            processed = apply_penalties(processed, counts, seen, batch)
        generators = [lv.generator or self.generator for lv in lives]
        tokens = draw(truncate(processed, batch), batch, generators)
        # Log-probabilities of the model's own distribution (as OpenAI reports them), for the requests that ask.
        lps: list = [None] * len(lives)
        if any(lv.params.logprobs for lv in lives):
            every = token_logprobs(logits, tokens).tolist()
            lps = [lp if lv.params.logprobs else None for lp, lv in zip(every, lives)]
        k = max(lv.params.top_logprobs for lv in lives)
        tops: list = [None] * len(lives)
        if k:
            values, ids = top_logprobs(logits, k)
            for i, lv in enumerate(lives):
                n = lv.params.top_logprobs
                if n:
                    tops[i] = tuple(zip(ids[i, :n].tolist(), values[i, :n].tolist()))
        return tokens.tolist(), lps, tops

    def _emit(self, request_id, token: int, lp: float, top, at_limit: bool) -> RequestOutput | None:
        live = self._live.get(request_id)
        if live is None:  # aborted while the step ran
            return None
        if token in live.stop_ids:  # the stop token itself is not part of the completion
            if not at_limit:
                self.scheduler.finish(request_id, "stop")
            return self._finished(request_id, None, "stop")
        live.completion.append(token)
        if live.counts is not None:
            live.counts[token] += 1
            live.seen[token] = True
        live.text += live.decoder.add(token)
        if at_limit:
            return self._finished(request_id, token, "length", lp=lp, top=top)
        if self._stop_string(live) is not None:
            self.scheduler.finish(request_id, "stop")
            return self._finished(request_id, token, "stop", lp=lp, top=top)
        held = self._held(live)
        text = live.text[live.emitted : len(live.text) - held]
        live.emitted = len(live.text) - held
        return RequestOutput(request_id, token, text, lp, top, None, live.prompt_len, len(live.completion))

    def _finished(self, request_id, token, reason, *, lp=None, top=None) -> RequestOutput | None:
        """The last output of a request: the rest of its text, up to a stop string if one appeared."""
        live = self._live.pop(request_id, None)
        if live is None:
            return None
        live.text += live.decoder.flush()
        cut = self._stop_string(live)
        if cut is not None:
            reason = "stop"
        end = len(live.text) if cut is None else max(cut, live.emitted)
        text = live.text[live.emitted : end]
        return RequestOutput(request_id, token, text, lp, top, reason, live.prompt_len, len(live.completion))

    @staticmethod
    def _stop_string(live: _Live) -> int | None:
        """Where the first stop string starts in the text, if one has appeared (searched only where it can be new)."""
        if not live.params.stop:
            return None
        longest = max(len(s) for s in live.params.stop)
        lo = max(0, live.emitted - longest + 1)
        found = [i for i in (live.text.find(s, lo) for s in live.params.stop) if i >= 0]
        return min(found) if found else None

    @staticmethod
    def _held(live: _Live) -> int:
        """How much of the text's end to hold back: the longest tail that could still become a stop string."""
        held = 0
        for s in live.params.stop:
            for n in range(min(len(s) - 1, len(live.text) - live.emitted), held, -1):
                if live.text.endswith(s[:n]):
                    held = n
                    break
        return held
