"""Int4 weight-only quantization in groups along the input dimension, PyTorch's packed int4 matmul on the CPU.

A group of `group_size` weights stores 4-bit q in 0..15 with w = (q - 8) * scale + zero. GGUF's Q4_1 blocks
(w = d * q + m, 32 weights) are exactly this with scale = d and zero = m + 8d, and Q4_0 (w = d * (q - 8)) with zero = 0,
so those files' own 4-bit weights carry over with no further loss (`lamina.weights.gguf.int4_groups`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lamina.errors import ConfigError

INNER_K_TILES = 2  # the packing layout the CPU kernel reads; measured no slower than 4 or 8 for these shapes


def quantize_int4_grouped(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max int4 per group: weight [N, K] -> (q int32 [N, K] in 0..15, scales and zeros
    [N, K/g])."""
    N, K = weight.shape
    if K % group_size:
        raise ConfigError(f"int4 groups of {group_size} do not divide the input size {K}")
    w = weight.float().reshape(N, K // group_size, group_size)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    scales = ((hi - lo) / 15).clamp_min(1e-12)
    q = torch.round((w - lo[..., None]) / scales[..., None]).clamp(0, 15).to(torch.int32)
    return q.reshape(N, K), scales, lo + 8 * scales


class Int4Linear(nn.Module):
    """y = x @ W.T with W = (q - 8) * scale + zero per group; `aten._weight_int4pack_mm_for_cpu` on the CPU
    (bfloat16 activations), a dequantize-then-matmul elsewhere. Output in the input's dtype."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.group_size = group_size
        if self.in_features % group_size or self.out_features % 8:
            raise ConfigError(f"int4 needs rows divisible by 8 and groups dividing the input, got {tuple(q.shape)}")
        sz = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()  # [K/g, N, 2]
        if q.device.type == "cpu":
            self.register_buffer("weight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.int(), INNER_K_TILES))
            self.register_buffer("scales_and_zeros", sz.to(torch.bfloat16))
        else:
            self.register_buffer("weight", q.to(torch.uint8))
            self.register_buffer("scales_and_zeros", sz.float())

    @classmethod
    def from_float(cls, weight: torch.Tensor, group_size: int) -> "Int4Linear":
        return cls(*quantize_int4_grouped(weight, group_size), group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.weight.device.type == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2.to(torch.bfloat16), self.weight, self.group_size, self.scales_and_zeros
            )
        else:
            scales, zeros = self.scales_and_zeros.unbind(-1)  # [K/g, N] each
            q = self.weight.float().reshape(self.out_features, -1, self.group_size)
            w = ((q - 8) * scales.T[..., None] + zeros.T[..., None]).reshape(self.out_features, self.in_features)
            y = F.linear(x2.float(), w)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)
