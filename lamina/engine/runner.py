"""ModelRunner: turns lists of token ids into forward passes over the model and its KV cache, and hands out the
cache's rows (slots) to the generations that use them."""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch

from lamina.engine.config import EngineConfig
from lamina.engine.kv_cache import KVCache
from lamina.engine.native import NativeDecode, unsupported
from lamina.errors import CapacityError
from lamina.model import Decode, Prefill, Transformer


class ModelRunner:
    """Owns the KV cache of one model. A generation takes rows with `slots(n)` and runs forwards on them."""

    def __init__(self, model: Transformer, config: EngineConfig, *, compile: bool = False, native: bool = True):
        self.model = model
        self.config = config
        # The decode step: on the CPU with GGML-block weights lamina's C step (NativeDecode: ~8 ms a step on SmolLM2,
        # against ~31 eager and ~20 compiled), unless `native` is False or compiling is asked for. Else the PyTorch
        # forward, optionally compiled once with dynamic shapes (batch size and filled cache length vary from step
        # to step; marking them dynamic avoids a recompile per value). Prefill stays in PyTorch, eager: its
        # per-prompt attention loop would specialise on every batch of prompt lengths. Inductor's C++ wrapper calls
        # the kernels without a Python frame each (25 -> 20.5 ms a step, for a longer first compile).
        self._decode_forward = (
            torch.compile(model.forward, dynamic=True, options={"cpp_wrapper": True}) if compile else model.forward
        )
        self.cache = KVCache.allocate(
            model.config, config.max_batch_size, config.max_seq_len, device=config.device, dtype=config.dtype
        )
        self._free = list(range(config.max_batch_size))
        self.native = (
            NativeDecode(model, self.cache) if native and not compile and not unsupported(model, self.cache) else None
        )

    @contextlib.contextmanager
    def slots(self, n: int) -> Iterator[list[int]]:
        """Reserve n cache rows (lowest first, so a lone generation gets 0..n-1) for the duration of the block."""
        if n > len(self._free):
            raise CapacityError(
                f"{n} sequence(s) need cache rows but only {len(self._free)} of {self.config.max_batch_size} are "
                "free: other generations on this model are still running (finish or close them first)"
            )
        self._free.sort()
        taken, self._free = self._free[:n], self._free[n:]
        try:
            yield taken
        finally:
            self._free.extend(taken)

    def prefill(
        self, prompts: Sequence[Sequence[int]], slots: Sequence[int], starts: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Run prompts (or chunks of them) packed into one pass, each into its slot from position `starts[j]` (0 when
        not given; a later chunk attends to the positions its slot already holds).

        Returns the final hidden states of every token run, packed in order: [sum of lengths, dim]."""
        device = self.config.device
        lens = [len(p) for p in prompts]
        starts = list(starts) if starts is not None else [0] * len(prompts)
        tokens = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=device)
        positions = torch.tensor(
            [s + j for s, n in zip(starts, lens) for j in range(n)], dtype=torch.long, device=device
        )
        slot_ids = torch.tensor([s for s, n in zip(slots, lens) for _ in range(n)], dtype=torch.long, device=device)
        batch = Prefill(slot_ids, positions, tuple(lens), tuple(starts) if any(starts) else None)
        return self.model(tokens, batch, self.cache.layers)

    def decode(self, tokens: Sequence[int], slots: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
        """One step: token b goes to `positions[b]` of row `slots[b]`. Returns logits [B, vocab] (float32).

        When the rows are exactly 0..B-1 attention slices the cache; otherwise (some sequences of the batch have
        finished) it gathers the rows it needs, a copy of the filled part of each."""
        if self.native is not None:
            return self.native(tokens, slots, positions)
        device = self.config.device
        packed = torch.tensor([list(tokens), list(slots), list(positions)], dtype=torch.long, device=device)
        batch = Decode(
            slots=packed[1],
            positions=packed[2],
            kv_len=max(positions) + 1,
            contiguous=list(slots) == list(range(len(slots))),
        )
        return self.model.logits(self._decode_forward(packed[0], batch, self.cache.layers))
