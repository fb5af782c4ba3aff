"""Layers over GGML-block weights: a linear projection and an embedding table (which a tied output projection shares).

On the CPU a product with few rows (decode: one row per running sequence) goes to lamina's native kernel, which reads
each block once and multiplies in integers (lamina.kernels); a product with many rows (prefill) is compute-bound, so the
weight is dequantized once for the call and multiplied by PyTorch's float GEMM. Without the native kernel (no
compiler, or CUDA) every product dequantizes: correct, and slower.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lamina import kernels
from lamina.quant import ggml

# Rows up to which the native kernel beats dequantize + float GEMM (measured on SmolLM2 shapes, 2 AVX2 cores: the
# kernel costs ~35 us a row for a 1536x576 matrix, dequantize + sgemm ~1 ms + 16 us a row).
NATIVE_MAX_ROWS = 32


class QLinear(nn.Module):
    """y = x @ W.T with W [out_features, in_features] held as `qtype` blocks (uint8 [out, in/32 * block bytes])."""

    def __init__(self, blocks: torch.Tensor, qtype: str, in_features: int):
        super().__init__()
        if qtype not in kernels.QTYPES or blocks.dtype != torch.uint8 or blocks.dim() != 2:
            raise ValueError(f"QLinear takes uint8 Q4_1 or Q8_0 blocks, got {qtype} {blocks.dtype}")
        if in_features % ggml.QK or blocks.shape[1] != in_features // ggml.QK * ggml.BLOCK_BYTES[qtype]:
            raise ValueError(f"{qtype} blocks {tuple(blocks.shape)} do not hold rows of {in_features} weights")
        self.qtype, self.in_features, self.out_features = qtype, in_features, blocks.shape[0]
        self.register_buffer("blocks", blocks.contiguous())
        self.native = blocks.device.type == "cpu" and kernels.available()
        self._qtype_id = kernels.QTYPES[qtype]

    @classmethod
    def from_float(cls, weight: torch.Tensor, qtype: str) -> "QLinear":
        return cls(ggml.QUANTIZE[qtype](weight), qtype, weight.shape[1])

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.native and not torch.compiler.is_compiling():
            return kernels.dequantize(self._qtype_id, self.blocks, self.out_features, self.in_features).to(dtype)
        return ggml.dequantize(self.blocks, self.qtype, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if self.native and x2.shape[0] <= NATIVE_MAX_ROWS:
            if torch.compiler.is_compiling():  # compiled graphs hold the kernel as one opaque operator
                y = torch.ops.lamina.qmatmul(x2.float(), self.blocks, self.qtype, self.out_features)
            else:  # eager calls go straight to it: every microsecond counts at one token a step
                y = kernels.run(self._qtype_id, self.blocks, self.out_features, x2.float().contiguous())
            y = y.to(x.dtype)
        else:
            y = F.linear(x2, self.dequantized(x.dtype))
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        native = "native" if self.native else "dequantize"
        return f"{self.in_features} -> {self.out_features}, {self.qtype}, {native}"


class QEmbedding(nn.Module):
    """Rows of a `qtype` block matrix [vocab, dim], dequantized as they are looked up, to `dtype`."""

    def __init__(self, blocks: torch.Tensor, qtype: str, dim: int, dtype: torch.dtype):
        super().__init__()
        if qtype not in ggml.BLOCK_BYTES or blocks.shape[1] != dim // ggml.QK * ggml.BLOCK_BYTES[qtype]:
            raise ValueError(f"{qtype} blocks {tuple(blocks.shape)} do not hold rows of {dim} weights")
        self.qtype, self.dim, self.dtype = qtype, dim, dtype
        self.register_buffer("blocks", blocks)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return ggml.dequantize(self.blocks[tokens], self.qtype, self.dtype)

    def extra_repr(self) -> str:
        return f"{self.blocks.shape[0]} x {self.dim}, {self.qtype}"
