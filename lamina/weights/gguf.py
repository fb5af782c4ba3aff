"""GGUF files of architecture `llama`: metadata to ModelConfig, tensors kept in their blocks or dequantized
(lamina.quant.ggml) and renamed to lamina's scheme. llama.cpp stores q/k rows in Meta's interleaved RoPE order
already: no permute here."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lamina.errors import ConfigError, WeightsError
from lamina.model import ModelConfig, RopeScaling
from lamina.model.rope import inverse_frequencies
from lamina.kernels.types import FLOAT_TYPES, TYPES, readable
from lamina.quant import Blocks, ggml
from lamina.weights.common import Progress, Select, Span, check_shapes, cut, target_name
from lamina.weights.gguf_file import read_gguf_file

_GLOBAL_NAMES = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
}
_LAYER_NAMES = {
    "attn_norm": "attention_norm",
    "attn_q": "attention.wq",
    "attn_k": "attention.wk",
    "attn_v": "attention.wv",
    "attn_output": "attention.wo",
    "ffn_norm": "ffn_norm",
    "ffn_gate": "feed_forward.w1",
    "ffn_down": "feed_forward.w2",
    "ffn_up": "feed_forward.w3",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
_ROPE_FREQS = "rope_freqs.weight"


def load_gguf(
    path: str | Path,
    progress: Progress | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    keep: bool = False,
    select: Select | None = None,
) -> tuple[ModelConfig, dict[str, torch.Tensor | Blocks], dict]:
    """Read a llama GGUF: (config, state dict in `dtype`, metadata). The GGML types of lamina.kernels.types are read
    (F32, and every format of its table: F16, BF16, Q4_0 to Q8_0, the K-quants, IQ4_NL, IQ4_XS); a tensor of any
    other type is a WeightsError naming it, its type and the types lamina reads, raised before any weight is
    unpacked. With `keep`, matrices in the table's formats (F16 and BF16 ones whose rows are whole blocks of 32: every
    projection, embedding and output matrix of a real model) come back as they are stored, as `Blocks` (for
    lamina.quant), neither dequantized nor widened.

    The configuration is read and every tensor's name and shape checked against it before any weight is unpacked;
    tensors are then dequantized one at a time straight to `dtype`, so a float32 copy of the model never exists
    when a smaller dtype is asked for. With `select`, only the part of each weight it names is read (blocks split
    along columns only in whole blocks)."""
    gf = read_gguf_file(path)
    fields = gf.metadata
    if fields.get("general.architecture") != "llama":
        raise ConfigError(
            f"GGUF architecture {fields.get('general.architecture')!r} is not supported; lamina runs 'llama' models"
        )
    names = {}
    for name in gf.tensors:
        target = _target_name(name)
        if target is None and name != _ROPE_FREQS:
            raise WeightsError(f"{path} holds tensor {name!r}, which a llama model does not have")
        names[name] = target
        qtype = gf.tensors[name].qtype
        if qtype not in TYPES and qtype not in FLOAT_TYPES:
            raise WeightsError(
                f"{path}: tensor {name} has GGML type {qtype}, which lamina does not read; it reads {readable()}"
            )
    scaling = None
    if _ROPE_FREQS in gf.tensors:
        t = gf.tensors[_ROPE_FREQS]
        scaling = _scaling_from_factors(fields, dequantize(t.data, t.qtype, t.shape, t.name))
    config = ModelConfig.from_gguf(fields, has_output="output.weight" in gf.tensors, rope_scaling=scaling)
    check_shapes(
        config, {target: torch.Size(gf.tensors[name].shape) for name, target in names.items() if target}, str(path)
    )

    state: dict[str, torch.Tensor] = {}
    todo = [name for name, target in names.items() if target]
    with open(path, "rb") as f:
        for i, name in enumerate(todo):
            if progress:
                progress(i, len(todo))
            t = gf.tensors[name]
            span = select(config, names[name]) if select else None
            if keep and t.qtype in TYPES and len(t.shape) == 2 and t.shape[1] % TYPES[t.qtype].block == 0:
                state[names[name]] = _read_blocks(f, t, names[name], span)
            elif span is not None and span[0] == 0:  # whole rows: only their bytes are unpacked
                rows = t.data.nbytes // t.shape[0]
                data = t.data[span[1] * rows : span[2] * rows]
                state[names[name]] = dequantize(data, t.qtype, (span[2] - span[1], *t.shape[1:]), name).to(dtype)
            else:
                state[names[name]] = cut(dequantize(t.data, t.qtype, t.shape, name).to(dtype), span)
    if progress:
        progress(len(todo), len(todo))
    return config, state, fields


def _read_blocks(f, t, name: str, span: Span | None) -> Blocks:
    """A block matrix (or the part `span` of it) read from the file into a new buffer, not copied out of the mapping:
    copying would make the mapped file pages resident in this process too. Columns are cut in whole blocks, a few MB
    of rows at a time, so a column slice never holds the whole matrix either."""
    rows, cols = t.shape
    row_bytes = t.data.nbytes // rows
    dim, lo, hi = span if span is not None else (0, 0, rows)
    if dim == 0:
        return Blocks(t.qtype, _read(f, t, lo * row_bytes, (hi - lo) * row_bytes).view(hi - lo, row_bytes), cols)
    kind = TYPES[t.qtype]
    if lo % kind.block or hi % kind.block:
        raise ConfigError(
            f"{name}: {t.qtype} blocks of {kind.block} columns cannot be cut to columns {lo}..{hi - 1} of {cols}: "
            "dimension 1 must divide into whole blocks per rank"
        )
    first, last = kind.row_bytes(lo), kind.row_bytes(hi)
    out = torch.empty(rows, last - first, dtype=torch.uint8)
    step = max((4 << 20) // row_bytes, 1)
    for r in range(0, rows, step):
        n = min(step, rows - r)
        out[r : r + n] = _read(f, t, r * row_bytes, n * row_bytes).view(n, row_bytes)[:, first:last]
    return Blocks(t.qtype, out, hi - lo)


def _read(f, t, start: int = 0, size: int | None = None) -> torch.Tensor:
    """`size` bytes of a tensor from byte `start` (default: all of it), read from the file into a new buffer."""
    size = t.data.nbytes - start if size is None else size
    data = torch.empty(size, dtype=torch.uint8)
    f.seek(t.offset + start)
    if f.readinto(data.numpy()) != size:
        raise WeightsError(f"{f.name}: tensor {t.name} is cut short")
    return data


def dequantize(data: np.ndarray, qtype: str, shape: tuple[int, ...], name: str = "tensor") -> torch.Tensor:
    """A GGML tensor's raw data -> float32 tensor of `shape` (lamina.quant.ggml's dequantizer, in torch)."""
    raw = torch.from_numpy(np.array(data, copy=True)).flatten()
    if qtype == "F32":
        return raw.view(torch.float32).reshape(shape)
    if qtype in ("F16", "BF16"):
        return raw.view(torch.float16 if qtype == "F16" else torch.bfloat16).float().reshape(shape)
    if qtype in TYPES:
        return ggml.dequantize(raw.view(torch.uint8), qtype).reshape(shape)
    raise WeightsError(f"tensor {name} has GGML type {qtype}, which lamina does not read; it reads {readable()}")


def _target_name(name: str) -> str | None:
    return target_name(name, _GLOBAL_NAMES, _LAYER_RE, _LAYER_NAMES)


def _scaling_from_factors(fields: dict[str, Any], factors: torch.Tensor) -> RopeScaling:
    """llama.cpp stores Llama 3.1 RoPE scaling as per-frequency divisors; recover the RopeScaling that makes them
    (the published models use low 1, high 4, original context 8192 and a factor of 8 or 32)."""
    head_dim = int(fields.get("llama.rope.dimension_count") or 0)
    theta = float(fields.get("llama.rope.freq_base", 10000.0))
    factor = float(factors.max())
    candidate = RopeScaling(
        factor=factor,
        low_freq_factor=float(fields.get("llama.rope.scaling.low_freq_factor", 1.0)),
        high_freq_factor=float(fields.get("llama.rope.scaling.high_freq_factor", 4.0)),
        original_max_position_embeddings=int(fields.get("llama.rope.scaling.original_context_length", 8192)),
    )
    if head_dim and factors.numel() == head_dim // 2:
        base = inverse_frequencies(head_dim, theta, None)
        implied = base / inverse_frequencies(head_dim, theta, candidate)
        if torch.allclose(implied, factors, rtol=1e-3):
            return candidate
    raise ConfigError("GGUF rope_freqs factors do not follow Llama 3.1 RoPE scaling; this model is not supported")
