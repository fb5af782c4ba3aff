"""Checks every weight loader applies: a state dict must match the model its config describes, name for name."""

from __future__ import annotations

import re
from typing import Callable, Mapping

import torch

from lamina.errors import WeightsError
from lamina.model import ModelConfig, Transformer


def expected_shapes(config: ModelConfig) -> dict[str, torch.Size]:
    """Name -> shape of every tensor a Transformer built from `config` holds (nothing is allocated)."""
    model = Transformer(config, device=torch.device("meta"))
    return {name: t.shape for name, t in model.state_dict().items()}


Progress = Callable[[int, int], None]  # progress(done, total), called while weights are read

# A part of a weight: (dim, lo, hi) keeps indices lo..hi-1 along dimension `dim`.
Span = tuple[int, int, int]
# select(config, name) -> the part of weight `name` to read (None: all of it); tensor parallelism passes one so that
# each rank reads only its slice of each weight (lamina.parallel.span), never the whole model at once.
Select = Callable[[ModelConfig, str], Span | None]


def cut(t: torch.Tensor, span: Span | None) -> torch.Tensor:
    """The part `span` of a tensor, copied, so that the full tensor (or the file it maps) can go; as it is for None."""
    if span is None:
        return t
    dim, lo, hi = span
    return t.narrow(dim, lo, hi - lo).clone()


def target_name(name: str, global_names: Mapping[str, str], layer_re: re.Pattern, layer_names: Mapping[str, str]):
    """A checkpoint's tensor name in lamina's scheme (`layers.N.attention.wq.weight`, ...), or None if unknown.
    `layer_re` captures the layer number and the per-layer part that `layer_names` maps."""
    if name in global_names:
        return global_names[name]
    m = layer_re.fullmatch(name)
    if m and m.group(2) in layer_names:
        return f"layers.{m.group(1)}.{layer_names[m.group(2)]}.weight"
    return None


def check_state_dict(config: ModelConfig, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise WeightsError naming missing, unexpected and mis-shaped tensors when `state_dict` does not fit `config`."""
    check_shapes(config, {name: t.shape for name, t in state_dict.items()}, source)


def check_shapes(config: ModelConfig, shapes: Mapping[str, torch.Size], source: str) -> None:
    """`check_state_dict` on names and shapes alone, before any tensor is read."""
    expected = expected_shapes(config)
    problems = []
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing:
        problems.append(f"missing {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected {_some(unexpected)}")
    wrong = [
        f"{name} has shape {tuple(shapes[name])}, config says {tuple(shape)}"
        for name, shape in expected.items()
        if name in shapes and tuple(shapes[name]) != tuple(shape)
    ]
    if wrong:
        problems.append(f"{len(wrong)} shape mismatch(es): {'; '.join(wrong[:3])}")
    if problems:
        raise WeightsError(f"weights in {source} do not match the model configuration: {'; '.join(problems)}")


def _some(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return f"{len(names)} tensor(s) ({shown}{', ...' if len(names) > limit else ''})"
