"""The KV cache: preallocated per-layer key and value tensors, one row (slot) per sequence, owned by the engine."""

from __future__ import annotations

import ctypes
import math
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch

from lamina.model import ModelConfig


@dataclass
class KVCache:
    """`layers[i]` is layer i's (keys, values), each `[max_batch_size, n_kv_heads, max_seq_len, head_dim]`.

    Allocated once; a sequence owns one slot for its lifetime and writes position p of its row at step p, so
    nothing is reallocated while generating. On the CPU the memory is mapped lazily: a page becomes resident when a
    position in it is first written, so memory in use follows the tokens cached, not max_batch_size * max_seq_len."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]

    @classmethod
    def allocate(
        cls, config: ModelConfig, max_batch_size: int, max_seq_len: int, *, device: torch.device, dtype: torch.dtype
    ) -> "KVCache":
        shape = (max_batch_size, config.n_kv_heads, max_seq_len, config.head_dim)
        return cls(
            [
                (_zeros(shape, device=device, dtype=dtype), _zeros(shape, device=device, dtype=dtype))
                for _ in range(config.n_layers)
            ]
        )


def _zeros(shape: tuple[int, ...], *, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
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
