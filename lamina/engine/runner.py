"""ModelRunner: turns lists of token ids into forward passes over the model and its KV cache. A sequence's cache is
the list of blocks (its block table) it was given: by `slots` (one whole row per sequence, for `Llama.generate`) or
by the serving engine's block pool."""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch

from lamina.engine.config import EngineConfig
from lamina.engine.kv_cache import KVCache, padded_tables
from lamina.engine.native import NativeDecode, unsupported
from lamina.errors import CapacityError
from lamina.model import Decode, Prefill, Transformer


class ModelRunner:
    """Owns the KV cache of one model: `num_blocks` blocks of `block_size` positions (default: max_batch_size rows of
    max_seq_len). A generation takes rows with `slots(n)`, or a caller manages blocks itself, and runs forwards."""

    def __init__(
        self,
        model: Transformer,
        config: EngineConfig,
        *,
        compile: bool = False,
        native: bool = True,
        num_blocks: int | None = None,
        block_size: int | None = None,
    ):
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
        self.block_size = block_size or config.max_seq_len
        num_blocks = num_blocks or config.max_batch_size
        self.cache = KVCache.allocate(
            model.config, num_blocks, self.block_size, device=config.device, dtype=config.dtype
        )
        # Whole rows to hand out with `slots`, where each block is a row; a paged cache's blocks are its owner's.
        self._free = list(range(num_blocks)) if self.block_size >= config.max_seq_len else []
        self.native = (
            NativeDecode(model, self.cache) if native and not compile and not unsupported(model, self.cache) else None
        )

    @contextlib.contextmanager
    def slots(self, n: int) -> Iterator[list[int]]:
        """Reserve n cache rows (lowest first, so a lone generation gets 0..n-1) for the duration of the block; each
        row is one block of max_seq_len positions (a sequence's block table is [row])."""
        if self.block_size < self.config.max_seq_len:
            raise RuntimeError(
                "slots() hands out whole rows; this runner's cache is paged (its owner allocates blocks)"
            )
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
        self,
        prompts: Sequence[Sequence[int]],
        tables: Sequence[Sequence[int]],
        starts: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Run prompts (or chunks of them) packed into one pass: prompt j from position `starts[j]` (0 when not
        given; a later chunk attends to the positions its blocks already hold), cached in the blocks of `tables[j]`.

        Returns the final hidden states of every token run, packed in order: [sum of lengths, dim]."""
        device, bs = self.config.device, self.block_size
        lens = [len(p) for p in prompts]
        starts = list(starts) if starts is not None else [0] * len(prompts)
        positions = [s + j for s, n in zip(starts, lens) for j in range(n)]
        blocks = [table[p // bs] for table, s, n in zip(tables, starts, lens) for p in range(s, s + n)]
        packed = torch.tensor(
            [[t for p in prompts for t in p], positions, blocks, [p % bs for p in positions]],
            dtype=torch.long,
            device=device,
        )
        later = any(starts)
        batch = Prefill(
            blocks=packed[2],
            offsets=packed[3],
            positions=packed[1],
            seq_lens=tuple(lens),
            starts=tuple(starts) if later else None,
            tables=tuple(torch.tensor(list(t), dtype=torch.long, device=device) for t in tables) if later else None,
        )
        return self.model(packed[0], batch, self.cache.layers)

    def decode(self, tokens: Sequence[int], tables: Sequence[Sequence[int]], positions: Sequence[int]) -> torch.Tensor:
        """One step: token b goes to `positions[b]` of the sequence whose blocks `tables[b]` lists. Returns logits
        [B, vocab] (float32).

        When each sequence is exactly row b (block b, a whole row), attention slices the cache; otherwise it gathers
        the blocks it needs, a copy of the filled part of each."""
        if self.native is not None:
            return self.native(tokens, tables, positions)
        device, bs = self.config.device, self.block_size
        blocks = [t[p // bs] for t, p in zip(tables, positions)]
        packed = torch.tensor(
            [list(tokens), blocks, [p % bs for p in positions], list(positions)], dtype=torch.long, device=device
        )
        batch = Decode(
            blocks=packed[1],
            offsets=packed[2],
            positions=packed[3],
            tables=padded_tables(tables).to(device),
            kv_len=max(positions) + 1,
            contiguous=bs >= max(positions) + 1 and [list(t) for t in tables] == [[b] for b in range(len(tables))],
        )
        return self.model.logits(self._decode_forward(packed[0], batch, self.cache.layers))
