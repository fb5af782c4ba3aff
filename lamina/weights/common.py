"""Checks every weight loader applies: a state dict must match the model its config describes, name for name."""

from __future__ import annotations

import torch

from lamina.errors import WeightsError
from lamina.model import ModelConfig, Transformer


def expected_shapes(config: ModelConfig) -> dict[str, torch.Size]:
    """Name -> shape of every tensor a Transformer built from `config` holds (nothing is allocated)."""
    model = Transformer(config, device=torch.device("meta"))
    return {name: t.shape for name, t in model.state_dict().items()}


def check_state_dict(config: ModelConfig, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Raise WeightsError naming missing, unexpected and mis-shaped tensors when `state_dict` does not fit `config`."""
    expected = expected_shapes(config)
    problems = []
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing:
        problems.append(f"missing {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected {_some(unexpected)}")
    wrong = [
        f"{name} has shape {tuple(state_dict[name].shape)}, config says {tuple(shape)}"
        for name, shape in expected.items()
        if name in state_dict and state_dict[name].shape != shape
    ]
    if wrong:
        problems.append(f"{len(wrong)} shape mismatch(es): {'; '.join(wrong[:3])}")
    if problems:
        raise WeightsError(f"weights in {source} do not match the model configuration: {'; '.join(problems)}")


def _some(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return f"{len(names)} tensor(s) ({shown}{', ...' if len(names) > limit else ''})"
