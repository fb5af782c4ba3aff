"""GGML's block formats for weight matrices, in PyTorch: quantize, dequantize and convert.

A matrix [N, K] is stored row by row as K/32 blocks of 32 weights each, as uint8 [N, K/32 * block bytes]:
  Q8_0  float16 d, 32 int8 q                          w = d * q          (34 bytes: 8.5 bits a weight)
  Q4_1  float16 d, float16 m, 16 bytes of nibbles     w = d * q + m      (20 bytes: 5 bits a weight)
  Q4_0  float16 d, 16 bytes of nibbles                w = d * (q - 8)    (18 bytes; converted to Q4_1 exactly)
A nibble byte j of a block holds q[j] in its low half and q[j + 16] in its high half. These are the bytes a GGUF file
holds, so a file's Q8_0 and Q4_1 weights are used as they are: the model runs exactly what llama.cpp runs.
"""

from __future__ import annotations

import torch

QK = 32  # weights per block
BLOCK_BYTES = {"Q8_0": 34, "Q4_1": 20, "Q4_0": 18}


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """[..., 2] uint8 -> float32 [...], read as little-endian float16."""
    return raw.contiguous().view(torch.float16)[..., 0].float()


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).unsqueeze(-1).view(torch.uint8)  # [..., 2]


def _check(w: torch.Tensor) -> None:
    if w.dim() != 2 or w.shape[1] % QK:
        raise ValueError(f"block quantization needs a matrix whose rows are a multiple of {QK}, got {tuple(w.shape)}")


def quantize_q8_0(w: torch.Tensor) -> torch.Tensor:
    """Float [N, K] -> Q8_0 blocks: per block d = max|w| / 127, q = round(w / d)."""
    _check(w)
    N, K = w.shape
    x = w.float().reshape(N, K // QK, QK)
    d = (x.abs().amax(dim=-1) / 127).to(torch.float16)
    inv = torch.where(d > 0, 1 / d.float(), torch.zeros_like(d, dtype=torch.float32))
    q = torch.round(x * inv[..., None]).clamp(-127, 127).to(torch.int8)
    return torch.cat([_f16_bytes(d), q.view(torch.uint8)], dim=-1).reshape(N, -1)


def quantize_q4_1(w: torch.Tensor) -> torch.Tensor:
    """Float [N, K] -> Q4_1 blocks: per block m = min, d = (max - min) / 15, q = round((w - m) / d)."""
    _check(w)
    N, K = w.shape
    x = w.float().reshape(N, K // QK, QK)
    lo, hi = x.amin(dim=-1), x.amax(dim=-1)
    d, m = ((hi - lo) / 15).to(torch.float16), lo.to(torch.float16)
    inv = torch.where(d > 0, 1 / d.float(), torch.zeros_like(d, dtype=torch.float32))
    q = torch.round((x - m.float()[..., None]) * inv[..., None]).clamp(0, 15).to(torch.uint8)
    nibbles = q[..., : QK // 2] | (q[..., QK // 2 :] << 4)
    return torch.cat([_f16_bytes(d), _f16_bytes(m), nibbles], dim=-1).reshape(N, -1)


QUANTIZE = {"Q8_0": quantize_q8_0, "Q4_1": quantize_q4_1}  # float matrix -> blocks, by format


def q4_0_to_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    """Q4_0 blocks -> the same weights as Q4_1 blocks (m = -8d, exact in float16)."""
    N = blocks.shape[0]
    b = blocks.reshape(N, -1, BLOCK_BYTES["Q4_0"])
    m = _f16_bytes(-8 * _f16(b[..., :2]))
    return torch.cat([b[..., :2], m, b[..., 2:]], dim=-1).reshape(N, -1)


def dequantize(blocks: torch.Tensor, qtype: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [N, K/32 * bytes] (or [n_blocks * bytes] for a flat tensor) -> [N, K] in `dtype`."""
    if qtype not in BLOCK_BYTES:
        raise ValueError(f"unknown block format {qtype!r}; expected one of {', '.join(BLOCK_BYTES)}")
    lead = blocks.shape[:-1]
    b = blocks.reshape(*lead, -1, BLOCK_BYTES[qtype])
    d = _f16(b[..., :2])[..., None]
    if qtype == "Q8_0":
        w = d * b[..., 2:].contiguous().view(torch.int8).float()
    else:
        qs = b[..., -QK // 2 :]
        q = torch.cat([qs & 0xF, qs >> 4], dim=-1).float()
        w = d * q + _f16(b[..., 2:4])[..., None] if qtype == "Q4_1" else d * (q - 8)
    return w.reshape(*lead, -1).to(dtype)
