"""Building a model's layers in GGML's block formats: which format each weight gets in each quantization mode, and
the quantized layers (QLinear, QEmbedding) that replace its float ones.

Modes (`quantize=` in lamina.load, `--quantize` on the CLI):
  none   every weight in the float dtype (the exact path, for checking)
  gguf   a GGUF's block matrices kept as the file stores them, in every format of lamina.kernels.types (a file
         mixes them: Q4_K_M is Q4_K, Q6_K and a 32-weight fallback where rows are not whole 256-weight blocks),
         F16 and BF16 matrices too (16-bit, never widened to float32)
  int8   every projection Q8_0 (groups of 32, one scale each); a file's Q8_0 kept as it is
  int4   every projection Q4_1 (groups of 32, scale and offset); a file's Q4_0/Q4_1 kept as they are; the output
         projection (the logits, the most sensitive product) Q8_0 unless the file stores it in 4 bits
  q4_k, q6_k, q8_0, iq4_xs, ... (a format's name, lower case)
         every projection in that format (GGML's reference quantizer, lamina.quant.ggml), where a row is not whole
         blocks of it in llama.cpp's fallback format (FALLBACK); the output projection Q6_K (Q8_0 for q8_0, or where
         its rows are not whole 256-weight blocks), as llama.cpp writes it; a matrix already in the format is kept;
         f16 and bf16: every projection and the output projection 16-bit floats
With a tied output projection the embedding table is read from the same blocks, so no float copy of it exists.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lamina.errors import ConfigError
from lamina.kernels.types import TYPES
from lamina.model import ModelConfig, Transformer, build_transformer
from lamina.quant import ggml
from lamina.quant.linear import QEmbedding, QLinear

FORMAT_MODES = tuple(name.lower() for name in TYPES)  # "q4_1", "q8_0", ..., "q6_k", "f16", "bf16"
MODES = ("none", "gguf", "int8", "int4", *FORMAT_MODES)
# What llama.cpp's quantizer writes where a row is not whole blocks of a 256-weight format (rows of 576 weights).
FALLBACK = {"Q2_K": "IQ4_NL", "Q3_K": "IQ4_NL", "IQ4_XS": "IQ4_NL", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


@dataclass(frozen=True)
class Blocks:
    """A weight matrix [rows, cols] as a checkpoint stores it in a GGML block format (uint8 [rows, bytes])."""

    qtype: str
    data: torch.Tensor
    cols: int

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return ggml.dequantize(self.data, self.qtype, dtype)


Weight = torch.Tensor | Blocks


def is_projection(name: str) -> bool:
    """The linear projections of the transformer blocks, by state-dict name."""
    return name.endswith(tuple(f".{w}.weight" for w in ("wq", "wk", "wv", "wo", "w1", "w2", "w3")))


def _cols(w: Weight) -> int:
    return w.cols if isinstance(w, Blocks) else w.shape[1]


def _format_for(mode: str, cols: int, output: bool) -> str:
    """The format a projection of rows of `cols` weights gets in a format mode (or int8 / int4)."""
    if mode == "int8":
        return "Q8_0"
    if mode == "int4":
        return "Q8_0" if output else "Q4_1"
    want = mode.upper()
    if output and want != "Q8_0" and TYPES[want].family != "float":
        want = "Q6_K"
    return want if cols % TYPES[want].block == 0 else FALLBACK.get(want, "Q8_0")


def _blocks_for(w: Weight, mode: str, output: bool) -> tuple[torch.Tensor, str] | None:
    """The block matrix (data, qtype) a weight gets in `mode`, or None to keep it float."""
    kept = isinstance(w, Blocks)
    if mode == "gguf":
        return (w.data, w.qtype) if kept else None
    want = _format_for(mode, _cols(w), output)
    if kept and (w.qtype == want or (mode == "int4" and w.qtype in ("Q4_0", "Q4_1"))):
        return w.data, w.qtype
    return ggml.QUANTIZE[want](w.dequantize(torch.float32) if kept else w), want


def quantized_modules(
    state: dict[str, Weight], mode: str, *, tied: bool, device: torch.device, dtype: torch.dtype
) -> dict[str, nn.Module | None]:
    """Pop the weights that `mode` stores as blocks out of `state` and return their layers by module path
    ("layers.0.attention.wqkv", "output", "tok_embeddings"; None for a projection fused into another), for
    build_transformer. What is left in `state` stays float (Blocks left there are for the caller to dequantize)."""
    if mode not in MODES:
        raise ConfigError(f"unknown quantization {mode!r}; expected one of {', '.join(MODES)}")
    if mode == "none":
        return {}
    modules: dict[str, nn.Module | None] = {}
    outputs = ["tok_embeddings.weight"] if tied else ["output.weight"]
    for name in [n for n in state if is_projection(n)] + [n for n in outputs if n in state]:
        chosen = _blocks_for(state[name], mode, output=name in outputs)
        if chosen is None:
            continue
        data, qtype = chosen[0].to(device), chosen[1]
        layer = QLinear(data, qtype, _cols(state.pop(name)))
        if tied and name == "tok_embeddings.weight":  # the same blocks serve the embedding and the logits
            modules["output"] = layer
            modules["tok_embeddings"] = QEmbedding(data, qtype, layer.in_features, dtype)
        else:
            modules[name.removesuffix(".weight")] = layer
    _fuse(modules, "attention", ("wq", "wk", "wv"), "wqkv")
    _fuse(modules, "feed_forward", ("w1", "w3"), "w13")
    embed = state.get("tok_embeddings.weight")
    if isinstance(embed, Blocks):  # untied, stored in blocks: look rows up there
        embed = state.pop("tok_embeddings.weight")
        modules["tok_embeddings"] = QEmbedding(embed.data.to(device), embed.qtype, embed.cols, dtype)
    return modules


def build_model(
    config: ModelConfig, state: dict[str, Weight], mode: str, *, device: torch.device, dtype: torch.dtype
) -> Transformer:
    """The Transformer for `state` (consumed) with its weights stored as `mode` says."""
    modules = quantized_modules(state, mode, tied=config.tie_embeddings, device=device, dtype=dtype)
    for name, w in state.items():
        if isinstance(w, Blocks):
            state[name] = w.dequantize(dtype)
    return build_transformer(config, state, device=device, dtype=dtype, modules=modules)


def _fuse(modules: dict[str, nn.Module | None], part: str, names: tuple[str, ...], fused: str) -> None:
    """Projections of one input in the same block format become one (their rows stacked): one kernel call, not
    three, per layer and step. The originals are replaced by None (removed from the model)."""
    prefixes = {path.rsplit(".", 2)[0] for path in modules if path.startswith("layers.")}
    for prefix in prefixes:
        parts = [modules.get(f"{prefix}.{part}.{name}") for name in names]
        if all(isinstance(p, QLinear) for p in parts) and len({(p.qtype, p.in_features) for p in parts}) == 1:
            data = torch.cat([p.blocks for p in parts])
            modules[f"{prefix}.{part}.{fused}"] = QLinear(data, parts[0].qtype, parts[0].in_features)
            for name in names:
                modules[f"{prefix}.{part}.{name}"] = None
