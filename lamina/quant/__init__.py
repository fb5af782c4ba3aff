"""Weight-only quantization as a module swap on a built model: int8 per output channel, int4 in groups."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from lamina.errors import ConfigError
from lamina.quant.int4 import Int4Linear, quantize_int4_grouped
from lamina.quant.int8 import Int8Linear, quantize_int8_per_channel

MODES = ("int8", "int4")
INT4_GROUP_SIZE = 32

Int4Groups = Mapping[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # name -> (q, scales, zeros), group 32


def quantize_model(model: nn.Module, mode: str, *, int4_groups: Int4Groups | None = None) -> nn.Module:
    """Swap every projection of the transformer blocks, and the output projection, for its quantized form (in
    place; returns the model). Embeddings and norms stay as they are; a tied output projection gets its own
    quantized copy of the embedding matrix (int8 in int4 mode, unless the checkpoint stores it in 4 bits).
    `int4_groups` supplies ready 4-bit weights by state-dict name (from a GGUF's Q4_0/Q4_1 blocks); other weights
    are quantized from their float values."""
    if mode not in MODES:
        raise ConfigError(f"unknown quantization {mode!r}; expected one of {', '.join(MODES)} (or None)")
    groups = int4_groups or {}

    def swap(name: str, weight: torch.Tensor, *, sensitive: bool = False) -> nn.Module:
        if mode == "int8":
            return Int8Linear(weight)
        if name in groups:
            return Int4Linear(*groups[name], INT4_GROUP_SIZE)
        # The logits are the most sensitive product: int4 of a float output projection costs ~6% perplexity on
        # SmolLM2, int8 ~0.1%, so in int4 mode it gets int8 unless the checkpoint itself stores it in 4 bits.
        return Int8Linear(weight) if sensitive else Int4Linear.from_float(weight, INT4_GROUP_SIZE)

    for i, block in enumerate(model.layers):
        for part, parent in (("attention", block.attention), ("feed_forward", block.feed_forward)):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, swap(f"layers.{i}.{part}.{name}.weight", child.weight.data))
    if model.output is None:
        model.output = swap("tok_embeddings.weight", model.tok_embeddings.weight.data, sensitive=True)
    else:
        model.output = swap("output.weight", model.output.weight.data, sensitive=True)
    return model


__all__ = [
    "MODES",
    "Int4Linear",
    "Int8Linear",
    "quantize_int4_grouped",
    "quantize_int8_per_channel",
    "quantize_model",
]
