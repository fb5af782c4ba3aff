"""ModelRunner: the only owner of a model's KV cache; runs a scheduled step's chunks as forward passes (prompt chunks
packed into one prefill, one-token chunks of running requests into one decode step; both in one pass where the
native C step runs them) through the native C step, the compiled or the eager forward. A sequence's cache is the list
of blocks (its block table) the block pool gave it."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from lamina.engine.config import EngineConfig
from lamina.engine.kv_cache import KVCache, lazy_zeros, padded_tables
from lamina.engine.native import NativeDecode, unsupported
from lamina.engine.request import Request
from lamina.engine.scheduler import SCORE_STEP, Chunk
from lamina.model import Decode, Prefill, Transformer
from lamina.quant import QLinear


@dataclass(frozen=True)
class Forward:
    """What a step's forward passes give: next-token logits [S, V] (float32) for the requests `sampling` (the chunks
    that sample: prompt chunks first, then decode tokens), 1 + len(drafts[i]) rows for request i in order (the rows
    after its last token and after each of its draft tokens), and for requests scoring their prompt the hidden
    states [n, dim] of the positions to score. `rounding`: how far (in logits) a decode row may be from what a step
    of that row alone gives (ModelRunner.rounding), which a draft's verification must allow for."""

    logits: torch.Tensor
    sampling: list[Request]
    scored: list[tuple[Request, range, torch.Tensor]]
    drafts: list[tuple[int, ...]]
    rounding: float = 0.0


class ModelRunner:
    """Owns the KV cache of one model: `num_blocks` blocks of `block_size` positions (default: max_batch_size rows of
    max_seq_len, one block a sequence), and runs forwards over it."""

    def __init__(
        self,
        model: Transformer,
        config: EngineConfig,
        *,
        compile: bool = False,
        native: bool = True,
        num_blocks: int | None = None,
        block_size: int | None = None,
        keep_hidden: bool = False,
    ):
        self.model = model
        self.config = config
        # The decode step: on the CPU with GGML-block weights lamina's C step (NativeDecode: ~8 ms a step on SmolLM2,
        # against ~31 eager and ~20 compiled), unless `native` is False or compiling is asked for. Else the PyTorch
        # forward, optionally compiled once with dynamic shapes (batch size and filled cache length vary from step
        # to step; marking them dynamic avoids a recompile per value). Inductor's C++ wrapper calls the kernels
        # without a Python frame each (25 -> 20.5 ms a step, for a longer first compile). Prompts go through the C
        # step too where its int16 products are the prefill's arithmetic (NativeDecode.runs_prefill: 512 tokens of
        # SmolLM2 in ~0.43 s against ~0.58 through PyTorch, Zen 4); else through the PyTorch forward, eager (its
        # per-prompt attention loop would specialise on every batch of prompt lengths).
        self._decode_forward = (
            torch.compile(model.forward, dynamic=True, options={"cpp_wrapper": True}) if compile else model.forward
        )
        self.block_size = block_size or config.max_seq_len
        num_blocks = num_blocks or config.max_batch_size
        self.cache = KVCache.allocate(
            model.config, num_blocks, self.block_size, device=config.device, dtype=config.kv_dtype
        )
        self.native = (
            NativeDecode(model, self.cache) if native and not compile and not unsupported(model, self.cache) else None
        )
        # With prefix caching, every position's final hidden state beside its keys and values ([blocks, block_size,
        # dim]): a request that asks for prompt logprobs and takes cached blocks scores their positions from here.
        self.hidden = (
            lazy_zeros((num_blocks, self.block_size, model.config.dim), device=config.device, dtype=config.dtype)
            if keep_hidden
            else None
        )
        # Called with ("prefill" | "decode" | "logits", the call's arguments) before each forward pass and projection
        # to logits: under tensor parallelism the driving rank hands their inputs to the other ranks first
        # (lamina.parallel.drive).
        self.before_forward: Callable[[str, tuple], None] | None = None
        self.int16_products = any(isinstance(m, QLinear) and m.native for m in model.modules())

    def execute(self, chunks: Sequence[Chunk]) -> Forward:
        """Run a scheduled step: the one-token chunks of running requests (with their draft tokens, if any) in one
        decode step, every other chunk (a prompt's, a recomputation's, or one scoring prompt tokens) packed into one
        prefill pass; on the native C step, both in one pass."""
        scores = [c.request.scored_positions(c.start, c.length, SCORE_STEP if not c.length else None) for c in chunks]
        is_decode = [
            c.length - len(c.draft) == 1 and c.start > 0 and c.samples and not p for c, p in zip(chunks, scores)
        ]
        decode = [c for c, d in zip(chunks, is_decode) if d]
        prefill = [(c, p) for c, p, d in zip(chunks, scores, is_decode) if not d]
        logits, sampling, scored = [], [], []
        for c, positions in prefill:  # chunks of no tokens: positions scored from the prefix cache alone
            if not c.length and positions:
                scored.append(
                    (c.request, positions, self.cached_hidden(c.request.blocks, positions.start, positions.stop))
                )
        prefill = [(c, p) for c, p in prefill if c.length]
        # Prompt chunks and decode rows in one pass where the C step runs both (it takes a prompt chunk's rows as a
        # run of one sequence, as a draft's; a prompt in another arithmetic, `prefill_dtype`, keeps its own pass):
        # the weights are read once a step, not once for each kind of row.
        ends = list(itertools.accumulate(c.length for c, _ in prefill))
        fused = bool(prefill and decode) and self.native is not None and self.native.runs_prefill(ends[-1])
        pass_rows = 0  # the rows of the pass the decode rows ran in
        if prefill:
            wanted = [(c, end - 1) for (c, _), end in zip(prefill, ends) if c.samples]
            if fused:
                together = [c for c, _ in prefill] + decode
                tokens = [t for c in together for t in c.tokens]
                pass_rows = len(tokens)
                hidden, both = self.rows(
                    tokens,
                    [c.request.blocks for c in together for _ in range(c.length)],
                    [c.start + j for c in together for j in range(c.length)],
                    [i for _, i in wanted] + list(range(ends[-1], pass_rows)),
                )
            else:
                hidden = self.prefill(
                    [c.tokens for c, _ in prefill],
                    [c.request.blocks for c, _ in prefill],
                    [c.start for c, _ in prefill],
                )
            for (c, positions), end in zip(prefill, ends):
                if not positions:
                    continue
                run = range(max(positions.start, c.start), positions.stop)  # positions this pass ran
                first = end - c.length + run.start - c.start
                states = hidden[first : first + len(run)]
                if positions.start < c.start:  # positions whose blocks came from the prefix cache
                    states = torch.cat([self.cached_hidden(c.request.blocks, positions.start, c.start), states])
                scored.append((c.request, positions, states))
            if fused:
                logits.append(both)
                sampling += [c.request for c, _ in wanted] + [c.request for c in decode]
            elif wanted:
                logits.append(self.logits(hidden[[i for _, i in wanted]]))
                sampling += [c.request for c, _ in wanted]
        if decode and not fused:
            # a row per token: a chunk with a draft gives rows at consecutive positions of one sequence, which
            # attend causally to each other (every row's keys and values are stored before any row attends)
            pass_rows = sum(c.length for c in decode)
            logits.append(
                self.decode(
                    [t for c in decode for t in c.tokens],
                    [c.request.blocks for c in decode for _ in range(c.length)],
                    [c.start + j for c in decode for j in range(c.length)],
                )
            )
            sampling += [c.request for c in decode]
        drafts = [()] * (len(sampling) - len(decode)) + [c.draft for c in decode]
        if not logits:
            return Forward(torch.empty(0, device=self.config.device), [], scored, [])
        rounding = self.rounding(pass_rows) if decode else 0.0
        return Forward(logits[0] if len(logits) == 1 else torch.cat(logits), sampling, scored, drafts, rounding)

    def rounding(self, rows: int) -> float:
        """How far apart (in logits) a row of a decode step of `rows` rows can be from that row decoded alone: 0 for
        the C step's exact steps (NativeDecode.exact_rows); else products summed in another order, which int16
        activations (GGML blocks through lamina's kernels) can turn into a quantization step: up to ~5e-3 measured
        (SmolLM2, 9 rows against 1, Zen 4), 2e-2 allowed, as for 16-bit float activations; float32 products ~1e-5,
        1e-3 allowed."""
        if self.native is not None and rows <= self.native.exact_rows:
            return 0.0
        coarse = self.int16_products or self.config.dtype in (torch.bfloat16, torch.float16)
        return 2e-2 if coarse else 1e-3

    def cached_hidden(self, table: Sequence[int], start: int, stop: int) -> torch.Tensor:
        """The final hidden states [stop - start, dim] of positions start..stop-1 of the sequence whose blocks
        `table` lists, as the passes that computed them left them (prefix caching only)."""
        if self.hidden is None:
            raise RuntimeError("hidden states are kept only with prefix caching")
        bs = self.block_size
        positions = torch.arange(start, stop)
        blocks = torch.tensor(list(table), dtype=torch.long)[positions // bs]
        return self.hidden[blocks.to(self.hidden.device), (positions % bs).to(self.hidden.device)]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states [n, dim] -> logits [n, vocab] (float32)."""
        if self.before_forward is not None:
            self.before_forward("logits", (hidden,))
        return self.model.logits(hidden)

    def prefill(
        self,
        prompts: Sequence[Sequence[int]],
        tables: Sequence[Sequence[int]],
        starts: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Run prompts (or chunks of them) packed into one pass: prompt j from position `starts[j]` (0 when not
        given; a later chunk attends to the positions its blocks already hold), cached in the blocks of `tables[j]`.

        Returns the final hidden states of every token run, packed in order: [sum of lengths, dim]."""
        if self.before_forward is not None:
            self.before_forward("prefill", (prompts, tables, starts))
        device, bs = self.config.device, self.block_size
        lens = [len(p) for p in prompts]
        starts = list(starts) if starts is not None else [0] * len(prompts)
        positions = [s + j for s, n in zip(starts, lens) for j in range(n)]
        blocks = [table[p // bs] for table, s, n in zip(tables, starts, lens) for p in range(s, s + n)]
        if self.native is not None and self.native.runs_prefill(len(positions)):
            hidden = self.native.prefill(prompts, tables, starts)
            if self.hidden is not None:
                self.hidden[blocks, [p % bs for p in positions]] = hidden
            return hidden
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
        hidden = self.model(packed[0], batch, self.cache.layers)
        if self.hidden is not None:
            self.hidden[packed[2], packed[3]] = hidden
        return hidden

    def rows(
        self,
        tokens: Sequence[int],
        tables: Sequence[Sequence[int]],
        positions: Sequence[int],
        logits_of: Sequence[int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of every kind in one pass of the C step (the native runner only): token b at `positions[b]` of the
        sequence whose blocks `tables[b]` lists, rows of one sequence at consecutive positions attending causally to
        each other (a prompt's chunk, a decode token and its draft). Returns (final hidden states [B, dim], logits of
        the rows `logits_of` lists, in that order)."""
        if self.native is None:
            raise RuntimeError("rows() runs on the native C step only; this runner has none")
        if self.before_forward is not None:
            self.before_forward("rows", (tokens, tables, positions, logits_of))
        hidden, logits = self.native.step(tokens, tables, positions, logits_of)
        if self.hidden is not None:
            bs = self.block_size
            self.hidden[[t[p // bs] for t, p in zip(tables, positions)], [p % bs for p in positions]] = hidden
        return hidden, logits

    def decode(self, tokens: Sequence[int], tables: Sequence[Sequence[int]], positions: Sequence[int]) -> torch.Tensor:
        """One step: token b goes to `positions[b]` of the sequence whose blocks `tables[b]` lists. Returns logits
        [B, vocab] (float32).

        When each sequence is exactly row b (block b, a whole row), attention slices the cache; otherwise it gathers
        the blocks it needs, a copy of the filled part of each."""
        if self.before_forward is not None:
            self.before_forward("decode", (tokens, tables, positions))
        device, bs = self.config.device, self.block_size
        blocks, offsets = [t[p // bs] for t, p in zip(tables, positions)], [p % bs for p in positions]
        if self.native is not None:
            hidden, logits = self.native.step(tokens, tables, positions)
            if self.hidden is not None:
                self.hidden[blocks, offsets] = hidden
            return logits
        packed = torch.tensor([list(tokens), blocks, offsets, list(positions)], dtype=torch.long, device=device)
        batch = Decode(
            blocks=packed[1],
            offsets=packed[2],
            positions=packed[3],
            tables=padded_tables(tables).to(device),
            kv_len=max(positions) + 1,
            contiguous=bs >= max(positions) + 1 and [list(t) for t in tables] == [[b] for b in range(len(tables))],
        )
        hidden = self._decode_forward(packed[0], batch, self.cache.layers)
        if self.hidden is not None:
            self.hidden[packed[1], packed[2]] = hidden
        return self.model.logits(hidden)
