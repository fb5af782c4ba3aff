"""The KV cache: preallocated per-layer key and value tensors in blocks of positions, owned by the engine; in the
model's dtype, a 16-bit float, or q8_0 (int8 with a scale per 32 values, as llama.cpp's q8_0 cache)."""

from __future__ import annotations

import ctypes
import math
import os
import sys
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from lamina.errors import ConfigError
from lamina.model import ModelConfig


KV_DTYPES = {  # --kv-cache-dtype names -> what the cache holds ("auto": the model's dtype)
    "auto": None,
    "float32": torch.float32,
    "f32": torch.float32,
    "float16": torch.float16,
    "f16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "q8_0": "q8_0",
}
KVDtype = torch.dtype | str  # a float dtype, or "q8_0"
KV_TYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, "q8_0": 3}  # decode.c's kv_type
Q8 = 32  # values per q8_0 scale


def quantize_q8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (int8 [..., D], float32 scales [..., D / 32]): scale = max |x| / 127 per 32 values, values
    rounded to nearest even (decode.c's kv_store does the same arithmetic)."""
    blocks = x.float().unflatten(-1, (-1, Q8))
    scale = blocks.abs().amax(-1) / 127.0
    q = torch.where(scale[..., None] > 0, blocks / scale[..., None], 0.0).round().clamp(-127, 127)
    return q.to(torch.int8).flatten(-2), scale


def dequantize_q8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (q.unflatten(-1, (-1, Q8)).float() * scale[..., None]).flatten(-2)


class Q8Cache:
    """One layer's keys or values in q8_0: int8 `data` [blocks, KVH, block_size, D] and float32 `scales` [blocks,
    KVH, block_size, D / 32]. Indexed as a float tensor would be (over the first three dimensions): assignment
    quantizes, reading dequantizes to float32, so the model's attention reads it as it reads a plain cache."""

    dtype = torch.float32  # what reading gives

    def __init__(self, shape: tuple[int, ...], device: torch.device):
        self.data = lazy_zeros(shape, device=device, dtype=torch.int8)
        self.scales = lazy_zeros((*shape[:-1], shape[-1] // Q8), device=device, dtype=torch.float32)

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def __setitem__(self, index, x: torch.Tensor) -> None:
        self.data[index], self.scales[index] = quantize_q8(x)

    def __getitem__(self, index) -> torch.Tensor:
        return dequantize_q8(self.data[index], self.scales[index])

    @staticmethod
    def round(x: torch.Tensor) -> torch.Tensor:
        """x as this cache gives it back once stored."""
        return dequantize_q8(*quantize_q8(x)).to(x.dtype)


def resolve_kv_dtype(kind: str | torch.dtype | None, dtype: torch.dtype) -> KVDtype:
    """A --kv-cache-dtype name (or torch dtype; None or "auto": the model's `dtype`) -> what the cache holds."""
    if kind is None:
        return dtype
    if isinstance(kind, torch.dtype) and kind in KV_TYPE_CODES:
        return kind
    if isinstance(kind, str) and kind.lower() in KV_DTYPES:
        return KV_DTYPES[kind.lower()] or dtype
    raise ConfigError(f"unknown kv_cache_dtype {kind!r}; expected one of {', '.join(KV_DTYPES)}")


@dataclass
class KVCache:
    """`layers[i]` is layer i's (keys, values), each `[num_blocks, n_kv_heads, block_size, head_dim]`.

    Allocated once. A sequence's positions live in the blocks of its block table, in order (position p in block
    table[p // block_size] at p % block_size); one block of max_seq_len positions per sequence is a plain cache row.
    Nothing is reallocated while generating. On the CPU the memory is mapped lazily: a page becomes resident when a
    position in it is first written, so memory in use follows the tokens cached, not the blocks allocated."""

    layers: list[tuple[torch.Tensor | Q8Cache, torch.Tensor | Q8Cache]]

    @property
    def num_blocks(self) -> int:
        return self.layers[0][0].shape[0]

    @property
    def block_size(self) -> int:
        return self.layers[0][0].shape[2]

    @classmethod
    def allocate(
        cls, config: ModelConfig, num_blocks: int, block_size: int, *, device: torch.device, dtype: KVDtype
    ) -> "KVCache":
        shape = (num_blocks, config.n_kv_heads, block_size, config.head_dim)
        if dtype == "q8_0" and config.head_dim % Q8:
            raise ConfigError(f"a q8_0 KV cache needs head_dim divisible by {Q8}; this model's is {config.head_dim}")

        def make():
            return Q8Cache(shape, device) if dtype == "q8_0" else lazy_zeros(shape, device=device, dtype=dtype)

        return cls([(make(), make()) for _ in range(config.n_layers)])

    @property
    def dtype(self) -> KVDtype:
        k = self.layers[0][0]
        return "q8_0" if isinstance(k, Q8Cache) else k.dtype

    @staticmethod
    def bytes_per_token(config: ModelConfig, dtype: KVDtype) -> int:
        """Keys and values of one position, all layers (q8_0: a byte a value plus a float32 scale per 32)."""
        values = 2 * config.n_layers * config.n_kv_heads * config.head_dim
        if dtype == "q8_0":
            return values + values // Q8 * 4
        return values * torch.empty((), dtype=dtype).element_size()


def padded_tables(tables: Sequence[Sequence[int]]) -> torch.Tensor:
    """Block tables as one int64 CPU tensor [B, longest], short ones padded with their first block (never read:
    attention stops at each sequence's length)."""
    width = max(len(t) for t in tables)
    return torch.tensor([list(t) + [t[0]] * (width - len(t)) for t in tables], dtype=torch.long)


def lazy_zeros(shape: tuple[int, ...], *, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A zero tensor whose CPU pages become resident only when written (see below)."""
    if device.type != "cpu":
        return torch.zeros(shape, device=device, dtype=dtype)
    # torch.zeros writes every byte; numpy's zeros is calloc, whose large blocks are fresh zero pages from the OS,
    # made resident only when written. All-zero bytes are 0.0 in every float format.
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    buffer = np.zeros(nbytes, dtype=np.uint8)
    _no_huge_pages(buffer)
    return torch.from_numpy(buffer).view(dtype).view(shape)


def _no_huge_pages(buffer: np.ndarray) -> None:
    """With transparent huge pages, one write makes 2 MB resident: a few positions of every row would make the whole
    cache resident. Ask for small pages on the buffer (Linux; elsewhere, and on failure, nothing changes)."""
    if sys.platform != "linux" or buffer.nbytes < 4 * _HUGE:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        page = os.sysconf("SC_PAGE_SIZE")
        start = -(-buffer.ctypes.data // page) * page
        end = (buffer.ctypes.data + buffer.nbytes) // page * page
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_NOHUGEPAGE)
    except (OSError, AttributeError, ValueError):
        pass


_HUGE = 2 << 20
_MADV_NOHUGEPAGE = 15
