"""NativeDecode: the decode step of a block-quantized model on the CPU as one call into lamina's C library.

It computes what `Transformer.forward` computes for a `Decode` batch (same blocks, same int16 activation
quantization, float32 throughout) without PyTorch's per-operation dispatch, which at one token a step costs about as
much as reading the weights. The runner uses it where it applies (see `unsupported`) and the PyTorch forward
everywhere else; prefill always runs in PyTorch. Under tensor parallelism (lamina.parallel) each rank runs it on
its shard, and the C step calls back into torch.distributed for the two sums of each layer.
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
        self, tokens: Sequence[int], tables: Sequence[Sequence[int]], positions: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As the call, returning (final hidden states [B, dim], logits [B, vocab])."""
        if not (len(tokens) == len(tables) == len(positions)):
            raise ValueError(f"{len(tokens)} tokens, {len(tables)} block tables and {len(positions)} positions")
        padded = padded_tables(tables)
        packed = torch.tensor([list(tokens), list(positions), [len(t) for t in tables]], dtype=torch.long)
        # The C step trusts every address: each position within its own blocks, each block within the cache.
        if bool(((packed[1] < 0) | (packed[1] >= packed[2] * self.block_size)).any()) or not (
            0 <= int(padded.min()) and int(padded.max()) < self.num_blocks
        ):
            raise ValueError(
                f"positions {list(positions)} with blocks {[list(t) for t in tables]} are outside the KV cache "
                f"({self.num_blocks} blocks of {self.block_size} positions)"
            )
        h = self.model.tok_embeddings(packed[0]).float().contiguous()
        if not self._logits_in_c:
            self._decode(h, padded, packed[1].contiguous(), None)
            return h, self.model.logits(h)
        logits = torch.empty(len(tokens), self.vocab_size, dtype=torch.float32)
        self._decode(h, padded, packed[1].contiguous(), logits)
        return h, logits
