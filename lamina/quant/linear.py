"""Layers over GGML-block weights: a linear projection and an embedding table (which a tied output projection shares).

On the CPU a product with few rows (decode: one row per running sequence) goes to lamina's native kernel, which reads
each block once and multiplies in integers (lamina.kernels). A product with many rows (prefill) of a float32 model
takes the layer's `prefill_dtype` (PREFILL_DTYPES below): on AVX-512 the same int16 kernels (the panels, near the
CPU's bfloat16 GEMM rate, no float copy of the weights), elsewhere the weight dequantized once for the call and
PyTorch's float32 GEMM, or its bfloat16 GEMM when asked for. A float32 model's residual stream stays float32 either
way; only the product's inputs and output are rounded (tests bound the cost). A bfloat16 model's many-row products are
a bfloat16 GEMM. Without the native kernel (no compiler, or CUDA) every product dequantizes: correct, and slower.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lamina import kernels
from lamina.kernels.types import type_of
from lamina.quant import ggml

# Rows up to which the native kernel runs a product whatever the prefill's arithmetic (decode: a row a sequence); more
# go where the layer's `prefill_dtype` says. On SmolLM2 shapes, 2 cores of an AVX2 EPYC (Zen 3), the register-tiled
# int16 kernel beats dequantize + float32 GEMM per product up to ~128 rows and a whole prefill up to ~64 tokens (64:
# 248 against 227 tok/s; 128: 277 against 310); on AVX-512 the panels beat it at every row count (512 rows of a 1B
# model's products: ~300 G operations/s against float32's ~170, benchmarks/profile_prefill.py).
NATIVE_MAX_ROWS = 32

# The arithmetic of a float32 model's many-row products (prefill):
#   int16     lamina's kernels over the blocks (activations int16 with a float scale per 32, exact integer sums: the
#             decode kernels given every row; no float copy of the weights): on AVX-512, where the panels run them
#             near the CPU's bfloat16 GEMM rate, the default there for the integer formats. Prompt log-probabilities
#             move from float32's by ~1e-3 (tests/quant/test_kernels.py bounds it);
#   float32   each block matrix dequantized for the call and PyTorch's float32 GEMM: float32's log-probabilities
#             (within the 1e-3 of transformers' that the reference tests hold), the default elsewhere;
#   bfloat16  the same in bfloat16, asked for: ~2x float32 where the CPU multiplies it natively (AMX, AVX-512 BF16),
#             at a measured cost (docs/models.md, "bfloat16 prefill").
PREFILL_DTYPES = (torch.int16, torch.float32, torch.bfloat16)


def prefill_dtype_for(qtype: str, path: str | None, asked: torch.dtype | None = None) -> torch.dtype:
    """The arithmetic of a `qtype` projection's many-row products on kernel `path` (None: no native kernel): `asked`,
    or by default int16 where the panels run (avx512) and float32 elsewhere; 16-bit float matrices have no int16
    kernel, so they keep float32's GEMM."""
    if asked is None:
        asked = torch.int16 if path == "avx512" else torch.float32
    return torch.float32 if asked == torch.int16 and type_of(qtype).family == "float" else asked


class QLinear(nn.Module):
    """y = x @ W.T with W [out_features, in_features] held as `qtype` blocks (uint8 [out, row bytes]), any format of
    lamina.kernels.types.TYPES."""

    def __init__(self, blocks: torch.Tensor, qtype: str, in_features: int):
        super().__init__()
        t = type_of(qtype)
        if blocks.dtype != torch.uint8 or blocks.dim() != 2:
            raise ValueError(
                f"QLinear takes a uint8 matrix of {qtype} blocks, got {blocks.dtype} {tuple(blocks.shape)}"
            )
        if in_features % t.block or blocks.shape[1] != t.row_bytes(in_features):
            raise ValueError(f"{qtype} blocks {tuple(blocks.shape)} do not hold rows of {in_features} weights")
        self.qtype, self.in_features, self.out_features = qtype, in_features, blocks.shape[0]
        self.register_buffer("blocks", blocks.contiguous())
        # The native kernels' best path for this CPU (None: no native kernel here); `use_kernels` picks another.
        self.kernels = kernels.get() if blocks.device.type == "cpu" and kernels.available() else None
        # A float32 input's many-row products run in this arithmetic (PREFILL_DTYPES; lamina.quant.use_kernels)
        self.prefill_dtype = prefill_dtype_for(qtype, self.kernels.path if self.kernels else None)
        self._qtype_id = kernels.QTYPES[qtype]

    @property
    def native(self) -> bool:
        return self.kernels is not None

    @classmethod
    def from_float(cls, weight: torch.Tensor, qtype: str) -> "QLinear":
        return cls(ggml.QUANTIZE[qtype](weight), qtype, weight.shape[1])

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.native and not torch.compiler.is_compiling():
            direct = dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32
            w = self.kernels.dequantize(self._qtype_id, self.blocks, self.out_features, self.in_features, direct)
            return w.to(dtype)
        return ggml.dequantize(self.blocks, self.qtype, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        few = x2.shape[0] <= NATIVE_MAX_ROWS
        if self.native and (few or (self.prefill_dtype == torch.int16 and x.dtype == torch.float32)):
            if torch.compiler.is_compiling():  # compiled graphs hold the kernel as one opaque operator
                y = torch.ops.lamina.qmatmul(x2.float(), self.blocks, self.qtype, self.out_features, self.kernels.path)
            else:  # eager calls go straight to it: every microsecond counts at one token a step
                y = self.kernels.run(self._qtype_id, self.blocks, self.out_features, x2.float().contiguous())
            y = y.to(x.dtype)
        elif x.dtype == torch.float32 and self.prefill_dtype == torch.bfloat16:
            y = F.linear(x2.to(self.prefill_dtype), self.dequantized(self.prefill_dtype)).to(x.dtype)
        else:
            y = F.linear(x2, self.dequantized(x.dtype))
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        native = f"native {self.kernels.path}" if self.native else "dequantize"
        if self.prefill_dtype != torch.float32:
            native += f", prefill {str(self.prefill_dtype).removeprefix('torch.')}"
        return f"{self.in_features} -> {self.out_features}, {self.qtype}, {native}"


class QEmbedding(nn.Module):
    """Rows of a `qtype` block matrix [vocab, dim], dequantized as they are looked up, to `dtype`."""

    def __init__(self, blocks: torch.Tensor, qtype: str, dim: int, dtype: torch.dtype):
        super().__init__()
        t = type_of(qtype)
        if dim % t.block or blocks.shape[1] != t.row_bytes(dim):
            raise ValueError(f"{qtype} blocks {tuple(blocks.shape)} do not hold rows of {dim} weights")
        self.qtype, self.dim, self.dtype, self._kid = qtype, dim, dtype, t.kid
        self.register_buffer("blocks", blocks)
        self.kernels = kernels.get() if blocks.device.type == "cpu" and kernels.available() else None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = self.blocks[tokens.reshape(-1)]
        if self.kernels is not None and not torch.compiler.is_compiling():
            direct = self.dtype if self.dtype in (torch.float32, torch.bfloat16) else torch.float32
            out = self.kernels.dequantize(self._kid, rows, rows.shape[0], self.dim, direct).to(self.dtype)
        else:
            out = ggml.dequantize(rows, self.qtype, self.dtype)
        return out.reshape(*tokens.shape, self.dim)

    def extra_repr(self) -> str:
        return f"{self.blocks.shape[0]} x {self.dim}, {self.qtype}"


def use_kernels(model: nn.Module, path: str | None = None, prefill_dtype: torch.dtype | None = None) -> str | None:
    """Every native block projection of `model` on the kernels of `path` (lamina.kernels.PATHS; None: the best this
    CPU runs), its many-row products of float32 inputs in `prefill_dtype` (PREFILL_DTYPES: int16, float32 or
    bfloat16; None: each projection's default on that path; see `prefill_dtype_for`). Returns the path now in use, or
    None where the model has no native projection. Raises RuntimeError for a path this CPU cannot run."""
    if prefill_dtype is not None and prefill_dtype not in PREFILL_DTYPES:
        raise ValueError(f"prefill products run in int16, float32 or bfloat16, not {prefill_dtype}")
    chosen = kernels.get(path)
    used = None
    for module in model.modules():
        if isinstance(module, QLinear) and module.native:
            dtype = prefill_dtype_for(module.qtype, chosen.path, prefill_dtype)
            module.kernels, module.prefill_dtype, used = chosen, dtype, chosen.path
    return used


def kernel_path(model: nn.Module) -> str | None:
    """The kernel path of `model`'s native block projections (None where it has none)."""
    paths = {m.kernels.path for m in model.modules() if isinstance(m, QLinear) and m.native}
    return paths.pop() if len(paths) == 1 else ("mixed" if paths else None)
