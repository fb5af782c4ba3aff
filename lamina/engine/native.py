"""NativeDecode: the decode step of a block-quantized model on the CPU as one call into lamina's C library.

It computes what `Transformer.forward` computes for a `Decode` batch (same blocks, same int16 activation
quantization, float32 throughout) without PyTorch's per-operation dispatch, which at one token a step costs about as
much as reading the weights. A row is a token at a position of a sequence, so the same step takes a prompt's tokens
as rows of one sequence (`prefill`): each attends causally to the rows before it, through tiles of keys, with its
norms, rotations and activation function fused in C. The runner uses it where it applies (see `unsupported`, and
`runs_prefill` for prompts) and the PyTorch forward everywhere else. Under tensor parallelism (lamina.parallel) each
rank runs it on its shard, and the C step calls back into torch.distributed for the two sums of each layer.
"""

from __future__ import annotations

import ctypes
from typing import Sequence

import torch

from lamina import kernels
from lamina.engine.kv_cache import KV_TYPE_CODES, KVCache, Q8Cache, padded_tables
from lamina.model import Transformer
from lamina.parallel import AllReduce
from lamina.quant import QLinear
from lamina.quant.linear import NATIVE_MAX_ROWS


def _inner(p):
    """A projection without its tensor-parallel sum (the C step sums itself)."""
    return p.inner if isinstance(p, AllReduce) else p


def _matrices(layer) -> list[tuple[str, QLinear, int]]:
    """A layer's seven matrices for the C step's table, as (name, the projection holding it, its first row there):
    a fused q/k/v or gate/up projection holds several, one after the other."""
    attention, ffn, D = layer.attention, layer.feed_forward, layer.attention.head_dim
    H, KVH = layer.attention.n_heads, layer.attention.n_kv_heads
    out = []
    if attention.wqkv is not None:
        out += [("wq", attention.wqkv, 0), ("wk", attention.wqkv, H * D), ("wv", attention.wqkv, (H + KVH) * D)]
    else:
        out += [("wq", attention.wq, 0), ("wk", attention.wk, 0), ("wv", attention.wv, 0)]
    out.append(("wo", _inner(attention.wo), 0))
    if ffn.w13 is not None:
        out += [("w1", ffn.w13, 0), ("w3", ffn.w13, ffn.w13.out_features // 2)]
    else:
        out += [("w1", ffn.w1, 0), ("w3", ffn.w3, 0)]
    out.append(("w2", _inner(ffn.w2), 0))
    return out


def unsupported(model: Transformer, cache: KVCache) -> str | None:
    """Why the native step cannot run this model and cache, or None when it can."""
    if not kernels.available():
        return f"lamina's native kernels are unavailable: {kernels.unavailable_reason()}"
    first = model.layers[0]
    if model.inv_freq.device.type != "cpu":
        return "the model is not on the CPU"
    if first.attention_norm.weight.dtype != torch.float32:
        return "the model is not float32"
    paths = set()
    for i, layer in enumerate(model.layers):
        projections = [p for _, p, _ in _matrices(layer)]
        if not all(isinstance(p, QLinear) and p.native for p in projections):
            return f"layer {i}'s projections are not all GGML blocks (quantize='gguf', 'int8', 'int4' or a format)"
        paths |= {p.kernels.path for p in projections}
        if len(paths) > 1:
            return f"layer {i}'s projections are on different kernel paths (see lamina.quant.use_kernels)"
    return None


class NativeDecode:
    """Holds the addresses of a model's weights and of a KV cache (and the tensors, so they stay alive) in the C
    step's tables. The model and the cache must not be replaced or moved while it is in use."""

    def __init__(self, model: Transformer, cache: KVCache):
        reason = unsupported(model, cache)
        if reason is not None:
            raise ValueError(f"the native decode step cannot run this model: {reason}")
        c = model.config
        self.model = model
        self.kernels = _matrices(model.layers[0])[0][1].kernels  # the path every projection is on (checked above)
        self.num_blocks, self.block_size = cache.num_blocks, cache.block_size
        self._tensors = [model.inv_freq, model.norm.weight]  # every tensor whose address the tables hold
        layers = (kernels.DecodeLayer * c.n_layers)()
        for table, layer, (k_cache, v_cache) in zip(layers, model.layers, cache.layers, strict=True):
            for name, p, row in _matrices(layer):
                setattr(table, name, p.blocks.data_ptr() + row * p.blocks.stride(0))
                setattr(table, f"{name}_type", kernels.QTYPES[p.qtype])
                self._tensors.append(p.blocks)
            for name, t in (
                ("attention_norm", layer.attention_norm.weight),
                ("ffn_norm", layer.ffn_norm.weight),
                *(
                    (f"{kind}_cache", c.data if isinstance(c, Q8Cache) else c)
                    for kind, c in (("k", k_cache), ("v", v_cache))
                ),
                *(
                    (f"{kind}_scale", c.scales)
                    for kind, c in (("k", k_cache), ("v", v_cache))
                    if isinstance(c, Q8Cache)
                ),
            ):
                assert t.is_contiguous()
                setattr(table, name, t.data_ptr())
                self._tensors.append(t)
        self._layers = layers
        self._projections = [p for layer in model.layers for _, p, _ in _matrices(layer)]
        # The logits too, where the output projection is blocks the kernel reads (else model.logits after the step).
        output = model.output if isinstance(model.output, QLinear) and model.output.native else None
        if output is not None and output.kernels.path != self.kernels.path:
            output = None
        if output is not None:
            self._tensors.append(output.blocks)
        self.vocab_size = c.vocab_size
        self._table = kernels.DecodeModel(
            n_layers=c.n_layers,
            dim=c.dim,
            hidden_dim=c.hidden_dim,
            n_heads=c.n_heads,
            n_kv_heads=c.n_kv_heads,
            head_dim=c.head_dim,
            num_blocks=self.num_blocks,
            block_size=self.block_size,
            norm_eps=c.norm_eps,
            inv_freq=model.inv_freq.data_ptr(),
            norm=model.norm.weight.data_ptr(),
            layers=layers,
            output=output.blocks.data_ptr() if output is not None else None,
            vocab_size=c.vocab_size,
            output_type=kernels.QTYPES[output.qtype] if output is not None else 0,
            reduce=self._reduce_callback(model.layers[0].attention.wo),
            kv_type=KV_TYPE_CODES[cache.dtype],
        )
        self._logits_in_c = output is not None
        # Steps of up to this many rows give each row bitwise what a step of that row alone gives (every product
        # on the kernels' few-rows path, rows of one sequence attending one by one, the logits in C too): 1 where
        # some product is not a block format's (16-bit floats) or the logits are computed after the step.
        block_formats = all(p.qtype not in ("F16", "BF16") for p in self._projections)
        self.exact_rows = int(self.kernels.lib.lamina_exact_rows()) if block_formats and self._logits_in_c else 1

    def runs_prefill(self, rows: int) -> bool:
        """Whether a prefill of `rows` tokens runs here: its products are the step's (int16 activations over the
        blocks) when every projection's `prefill_dtype` is int16 (the default on AVX-512), and for any projection
        up to lamina.quant.NATIVE_MAX_ROWS rows (those go to the same kernels in PyTorch too)."""
        return rows <= NATIVE_MAX_ROWS or all(p.prefill_dtype == torch.int16 for p in self._projections)

    def _reduce_callback(self, wo):
        """The C step's sum over the ranks (a null pointer outside tensor parallelism). An exception in it (a rank
        gone, a timeout) is kept and raised once the C step has stopped."""
        self._failure: BaseException | None = None
        if not isinstance(wo, AllReduce):
            return kernels.REDUCE()

        def reduce(address: int, n: int) -> int:
            try:
                wo.reduce(torch.frombuffer((ctypes.c_float * n).from_address(address), dtype=torch.float32))
                return 0
            except BaseException as e:  # noqa: BLE001 - it must not unwind through C; raised after the step
                self._failure = e
                return 1

        self._reduce = kernels.REDUCE(reduce)  # kept alive as long as the table that points to it
        return self._reduce

    def _decode(self, *args) -> None:
        try:
            self.kernels.decode(self._table, *args)
        except RuntimeError:
            if self._failure is not None:
                failure, self._failure = self._failure, None
                raise failure from None
            raise

    def __call__(
        self, tokens: Sequence[int], tables: Sequence[Sequence[int]], positions: Sequence[int]
    ) -> torch.Tensor:
        """Token b goes to `positions[b]` of the sequence whose cache blocks `tables[b]` lists; returns the logits
        [B, vocab] (float32), as `Transformer.logits(Transformer.forward(...))` would."""
        return self.step(tokens, tables, positions)[1]

    def step(
        self,
        tokens: Sequence[int],
        tables: Sequence[Sequence[int]],
        positions: Sequence[int],
        logits_of: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As the call, returning (final hidden states [B, dim], logits [B, vocab]); with `logits_of`, the logits of
        those rows only ([len(logits_of), vocab], in that order)."""
        if not (len(tokens) == len(tables) == len(positions)):
            raise ValueError(f"{len(tokens)} tokens, {len(tables)} block tables and {len(positions)} positions")
        packed = torch.tensor([list(tokens), list(positions), [len(t) for t in tables]], dtype=torch.long)
        picked = None if logits_of is None else torch.tensor(list(logits_of), dtype=torch.long)
        if picked is not None and len(picked) and not bool(((picked >= 0) & (picked < len(tokens))).all()):
            raise ValueError(f"logits asked of rows {list(logits_of)} of a step of {len(tokens)} rows")
        return self._run(packed[0], padded_tables(tables), packed[1], packed[2], logits=True, picked=picked)

    def prefill(
        self, prompts: Sequence[Sequence[int]], tables: Sequence[Sequence[int]], starts: Sequence[int]
    ) -> torch.Tensor:
        """Prompts (or later chunks of them) packed as rows of one step, prompt j's tokens at positions starts[j]..
        of the sequence whose blocks `tables[j]` lists: the rows of one prompt attend causally to each other and to
        what its blocks hold before starts[j], as `Transformer.forward` with a `Prefill` batch. Returns the final
        hidden states [sum of lengths, dim] (no logits: the caller projects the rows it samples from)."""
        lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
        positions = torch.cat([torch.arange(s, s + len(p), dtype=torch.long) for s, p in zip(starts, prompts)])
        tokens = torch.tensor([t for p in prompts for t in p], dtype=torch.long)
        blocks = torch.tensor([len(t) for t in tables], dtype=torch.long).repeat_interleave(lengths)
        padded = padded_tables(tables).repeat_interleave(lengths, 0)
        return self._run(tokens, padded, positions, blocks, logits=False)[0]

    def _run(
        self,
        tokens: torch.Tensor,
        padded: torch.Tensor,
        positions: torch.Tensor,
        blocks: torch.Tensor,
        logits: bool,
        picked: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rows (token, its sequence's padded block table, position, how many blocks the table has) through the C
        step: (final hidden states, logits when asked for: of every row, or of the rows `picked` lists)."""
        # The C step trusts every address: each position within its own blocks, each block within the cache.
        outside = (positions < 0) | (positions >= blocks * self.block_size)
        outside |= ((padded < 0) | (padded >= self.num_blocks)).any(1)
        if bool(outside.any()):
            row = int(outside.nonzero()[0])
            raise ValueError(
                f"position {int(positions[row])} with blocks {padded[row, : int(blocks[row])].tolist()} is outside "
                f"the KV cache ({self.num_blocks} blocks of {self.block_size} positions)"
            )
        h = self.model.tok_embeddings(tokens).float().contiguous()
        padded, positions = padded.contiguous(), positions.contiguous()
        if not (logits and self._logits_in_c):
            self._decode(h, padded, positions, None)
            return h, (self.model.logits(h if picked is None else h[picked]) if logits else None)
        out = torch.empty(len(tokens) if picked is None else len(picked), self.vocab_size, dtype=torch.float32)
        self._decode(h, padded, positions, out, picked)
        return h, out
