"""The KV cache: preallocated per-layer key and value tensors, one row (slot) per sequence, owned by the engine."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lamina.model import ModelConfig


@dataclass
class KVCache:
    """`layers[i]` is layer i's (keys, values), each `[max_batch_size, n_kv_heads, max_seq_len, head_dim]`.

    Allocated once; a sequence owns one slot for its lifetime and writes position p of its row at step p, so
    nothing is reallocated while generating."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]

    @classmethod
    def allocate(
        cls, config: ModelConfig, max_batch_size: int, max_seq_len: int, *, device: torch.device, dtype: torch.dtype
    ) -> "KVCache":
        shape = (max_batch_size, config.n_kv_heads, max_seq_len, config.head_dim)
        return cls(
            [
                (torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
                for _ in range(config.n_layers)
            ]
        )
