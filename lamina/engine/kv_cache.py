"""The KV cache: preallocated per-layer key and value tensors, one row (slot) per sequence, owned by the engine."""

from __future__ import annotations

import ctypes
import math
import os
import sys
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from lamina.model import ModelConfig


@dataclass
class KVCache:
    """`layers[i]` is layer i's (keys, values), each `[num_blocks, n_kv_heads, block_size, head_dim]`.

    Allocated once. A sequence's positions live in the blocks of its block table, in order (position p in block
    table[p // block_size] at p % block_size); one block of max_seq_len positions per sequence is a plain cache row.
    Nothing is reallocated while generating. On the CPU the memory is mapped lazily: a page becomes resident when a
    position in it is first written, so memory in use follows the tokens cached, not the blocks allocated."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]

    @property
    def num_blocks(self) -> int:
        return self.layers[0][0].shape[0]

    @property
    def block_size(self) -> int:
        return self.layers[0][0].shape[2]

    @classmethod
    def allocate(
        cls, config: ModelConfig, num_blocks: int, block_size: int, *, device: torch.device, dtype: torch.dtype
    ) -> "KVCache":
        shape = (num_blocks, config.n_kv_heads, block_size, config.head_dim)
        return cls(
            [
                (lazy_zeros(shape, device=device, dtype=dtype), lazy_zeros(shape, device=device, dtype=dtype))
                for _ in range(config.n_layers)
            ]
        )

    @staticmethod
    def bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
        """Keys and values of one position, all layers."""
        return 2 * config.n_layers * config.n_kv_heads * config.head_dim * torch.empty((), dtype=dtype).element_size()


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
