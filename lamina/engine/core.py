"""EngineCore: the one engine under every front end. It knows requests only: `add(request)`, `abort(id)`, `step()`
and `has_work`; `Llama.generate`/`stream`, the CLI and the HTTP server all add requests here and step it.

A step is schedule -> execute -> sample -> update: the Scheduler picks each request's chunk of work under a token
budget (decode tokens of running requests, chunks of prompts, no prefill phase), the ModelRunner runs them over the
one KV cache, the Sampler draws each request's token with its own settings and generator, and the OutputProcessor
turns tokens into text and finish reasons. Outputs go back to the caller of `step` and to each request's sink.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Hashable

import torch

from lamina import parallel
from lamina.engine.blocks import BlockPool
from lamina.engine.config import EngineConfig
from lamina.engine.grammar import Grammars
from lamina.engine.kv_cache import KVCache
from lamina.engine.output import OutputProcessor
from lamina.engine.request import Request, RequestOutput, Status
from lamina.engine.runner import ModelRunner
from lamina.engine.sampler import Sampler
from lamina.engine.scheduler import Scheduler, SchedulerConfig
from lamina.engine.speculative import SpeculativeConfig, Speculator
from lamina.errors import RequestError
from lamina.model import Transformer
from lamina.tokenizer import Tokenizer


class EngineCore:
    """Continuous batching over one model and its one KV cache.

    Not thread-safe by itself: whoever calls add/abort/step holds `lock` (the offline API and the server's engine
    thread may both drive one core; each request's outputs reach it through its own sink)."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        config: EngineConfig,
        *,
        seed: int = 0,
        native: bool = True,
        speculative: SpeculativeConfig | None = None,
        draft_model: Transformer | None = None,
    ):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        # kv_cache_memory sizes the keys and values; with prefix caching each position's final hidden state is kept
        # beside them too (dim values a position: 1/20 of the KV on SmolLM2, 1/16 on Llama 3 8B).
        num_blocks, block_size = config.cache_blocks(KVCache.bytes_per_token(model.config, config.kv_dtype))
        self.runner = ModelRunner(
            model,
            config,
            compile=config.compile,
            native=native,
            num_blocks=num_blocks,
            block_size=block_size,
            keep_hidden=config.prefix_caching,
        )
        self.pool = BlockPool(num_blocks, block_size, caching=config.prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_batch_size, config.max_waiting, config.max_step_tokens, config.max_seq_len),
            self.pool,
        )
        self.grammars = Grammars(tokenizer, model.config.vocab_size)
        self.sampler = Sampler(model.config.vocab_size, config.device, seed, self.grammars)
        self.output = OutputProcessor(tokenizer)
        self.lock = threading.RLock()
        # Speculative decoding: prompt lookup, or a draft model whose keys and values sit in the target's blocks (a
        # cache of its own with the same geometry, so the block pool and the prefix cache serve both).
        self.speculator: Speculator | None = None
        if speculative is not None:
            draft = None
            if draft_model is not None:  # its cache in its own dtype (its blocks are counted by the target's pool)
                own = dataclasses.replace(config, dtype=draft_model.norm.weight.dtype, kv_cache_dtype="auto")
                draft = ModelRunner(draft_model, own, native=native, num_blocks=num_blocks, block_size=block_size)
            self.speculator = Speculator(speculative, draft, max_step_tokens=config.max_step_tokens)
            tp = parallel.group_of(model)
            if tp is not None:  # every rank plans the same steps: from rank 0's step times (none to share when
                # rank 0 drives the others: it alone plans, lamina.parallel.drive)
                self.speculator.share = lambda s: s if self.runner.before_forward else parallel.rank0_value(tp, s)

    @property
    def has_work(self) -> bool:
        return not self.scheduler.idle

    def add(self, request: Request, *, max_waiting: int | None = None) -> None:
        """Queue a request. Raises RequestError for a bad one (token ids outside the vocabulary, a prompt that cannot
        fit, a constraint that does not compile), CapacityError when more than `max_waiting` (default: the config's)
        would wait."""
        vocab = self.model.config.vocab_size
        bad = next((t for t in request.prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError(f"prompt token id {bad} is outside the vocabulary (0..{vocab - 1})")
        request.params.check_vocabulary(vocab)
        self.sampler.constrain(request)
        self.scheduler.add(request, max_waiting=max_waiting)
        self.sampler.attach(request)
        self.output.attach(request)

    def abort(self, request_id: Hashable) -> None:
        """Drop a request at once (its cache blocks are free for the next step); unknown ids are ignored."""
        self.scheduler.abort(request_id)

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one step; return an output for each request that got a token or finished (also sent to its sink)."""
        spec = self.speculator
        if spec is not None:
            spec.propose(self.scheduler.running, self.pool, self.config.max_seq_len)
        step = self.scheduler.schedule()
        outputs = [self._emit(r, self.output.finish(r, "length")) for r in step.finished]
        if not step.chunks:
            return outputs
        self.sampler.prepare([c.request for c in step.chunks if c.samples])  # grammar masks, during the forward
        started = time.perf_counter()
        forward = self.runner.execute(step.chunks)
        for request, positions, hidden in forward.scored:
            self.sampler.score_prompt(request, positions, hidden, self.runner.logits)
        sampled = self.sampler(forward.logits, forward.sampling, forward.drafts, forward.rounding)
        seconds = time.perf_counter() - started
        if spec is not None and not forward.scored and all(c.length == 1 + len(c.draft) for c in step.chunks):
            spec.timed(step.num_tokens, seconds)  # a decode step: what its rows cost
        if self.scheduler.pacer is not None:  # what prompt tokens add (at their depth), a decode step's time
            prompts = [c for c in step.chunks if c.length - len(c.draft) > 1]
            tokens = sum(c.length for c in prompts)
            depth = sum(c.start * c.length for c in prompts) // tokens if tokens else 0
            decoding = any(c.length - len(c.draft) == 1 for c in step.chunks)
            self.scheduler.pacer.record(seconds, tokens, decoding, depth, scored=bool(forward.scored))
        done = self.scheduler.advance(step, {r.request_id: t for r, t in zip(forward.sampling, sampled.tokens)})
        columns = (sampled.tokens, sampled.logprobs, sampled.top_logprobs, sampled.complete, forward.drafts)
        for b, (r, tokens, lps, tops, completes, draft) in enumerate(zip(forward.sampling, *columns)):
            if draft:
                spec.verified(r, draft, tokens, settled=sampled.settled[b])
            if r.finish_reason == "abort":
                continue  # aborted while the step ran (by a sink)
            if r.matcher is not None and r.matcher.is_error():
                self.scheduler.abort(r.request_id)
                error = RequestError(f"structured output failed: {r.matcher.get_error()}")
                outputs.append(self._emit(r, self.output.failed(r, error)))
                continue
            for j, (token, lp, top, complete) in enumerate(zip(tokens, lps, tops, completes)):
                out = self.output.token(r, token, lp, top, complete=complete, after=len(tokens) - 1 - j)
                if out.finish_reason is not None and r.status is not Status.FINISHED:
                    self.scheduler.finish(r, out.finish_reason)
                outputs.append(self._emit(r, out))
                if out.finish_reason is not None or r.finish_reason == "abort":
                    break
        sampling = {id(r) for r in forward.sampling}
        outputs += [self._emit(r, self.output.finish(r, "length")) for r in done if id(r) not in sampling]
        return outputs

    def fail(self, error: BaseException | None) -> None:
        """Give up on every request: each is dropped and its sink gets an output with finish reason "error" (and
        `error`), or "abort" when error is None (shutdown)."""
        for request in list(self.scheduler.requests.values()):
            self.scheduler.abort(request.request_id)
            self._emit(request, self.output.failed(request, error))

    @staticmethod
    def _emit(request: Request, output: RequestOutput) -> RequestOutput:
        if request.sink is not None:
            request.sink(output)
        return output
