"""Int8 weight-only quantization: one scale per output channel, PyTorch's packed int8 matmul kernel on the CPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def quantize_int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: weight [N, K] -> (int8 [N, K], float32 scales [N]) with
    weight ~= q * scale and |q| <= 127."""
    w = weight.float()
    scales = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T, computed by `aten._weight_int8pack_mm` on the CPU (activations in bfloat16, which that
    kernel needs to be fast) and by an int8->activation-dtype matmul elsewhere. Output in the input's dtype."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        q, scales = quantize_int8_per_channel(weight)
        self.out_features, self.in_features = q.shape
        self.register_buffer("weight", q)
        self.register_buffer("scales", scales.to(torch.bfloat16 if q.device.type == "cpu" else weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x.device.type == "cpu":
            y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16), self.weight, self.scales)
        else:
            y = F.linear(x2, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)
