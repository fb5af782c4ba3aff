"""ModelRunner: turns lists of token ids into forward passes over the model and its KV cache."""

from __future__ import annotations

from typing import Sequence

import torch

from lamina.engine.config import EngineConfig
from lamina.engine.kv_cache import KVCache
from lamina.model import Decode, Prefill, Transformer


class ModelRunner:
    """Owns the KV cache of one model; every call writes the cache rows (slots) it is given."""

    def __init__(self, model: Transformer, config: EngineConfig):
        self.model = model
        self.config = config
        self.device = config.device
        self.cache = KVCache.allocate(
            model.config, config.max_batch_size, config.max_seq_len, device=config.device, dtype=config.dtype
        )

    def prefill(self, prompts: Sequence[Sequence[int]], slots: Sequence[int]) -> torch.Tensor:
        """Run fresh prompts packed into one pass, each into its slot from position 0.

        Returns the final hidden states of every prompt token, packed in order: [sum of lengths, dim]."""
        lens = tuple(len(p) for p in prompts)
        tokens = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=self.device)
        positions = torch.cat([torch.arange(n) for n in lens]).to(self.device)
        slot_ids = torch.repeat_interleave(torch.tensor(slots), torch.tensor(lens)).to(self.device)
        return self.model(tokens, Prefill(slot_ids, positions, lens), self.cache.layers)

    def decode(self, tokens: Sequence[int], slots: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
        """One step: token b goes to `positions[b]` of row `slots[b]`. Returns logits [B, vocab] (float32)."""
        batch = Decode(
            slots=torch.tensor(slots, dtype=torch.long, device=self.device),
            positions=torch.tensor(positions, dtype=torch.long, device=self.device),
            kv_len=max(positions) + 1,
            contiguous=list(slots) == list(range(len(slots))),
        )
        h = self.model(torch.tensor(tokens, dtype=torch.long, device=self.device), batch, self.cache.layers)
        return self.model.logits(h)
