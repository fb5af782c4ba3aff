"""Meta checkpoints: `params.json` plus one or more model-parallel shards `consolidated.NN.pth`."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lamina.errors import ConfigError, WeightsError
from lamina.model import ModelConfig
from lamina.weights.common import Select, Span, check_shapes, cut, expected_shapes

# Tensors some Meta checkpoints carry that the model recomputes instead.
_IGNORED = {"rope.freqs"}


def load_meta_checkpoint(
    ckpt_dir: str | Path, select: Select | None = None
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read `params.json` and merge every `consolidated.*.pth` shard into one state dict (tensors stay in the
    checkpoint's dtype, memory-mapped where nothing had to be merged). With `select`, each weight is only the part
    it names, cut as the weight is merged (so a rank of a tensor-parallel group never holds the whole model)."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        raise WeightsError(f"checkpoint directory not found: {root}")
    params_path = root / "params.json"
    if not params_path.is_file():
        raise WeightsError(f"{root} has no params.json; a Meta checkpoint holds params.json and consolidated.*.pth")
    try:
        params = json.loads(params_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {params_path}: {e}") from None
    if not isinstance(params, dict):
        raise ConfigError(f"{params_path} must hold a JSON object")
    config = ModelConfig.from_meta(params)

    shard_paths = sorted(root.glob("consolidated.*.pth"))
    if not shard_paths:
        raise WeightsError(f"{root} has no consolidated.*.pth weight files")
    shards = [_load_shard(p) for p in shard_paths]
    names = set(shards[0])
    for path, shard in zip(shard_paths[1:], shards[1:]):
        if set(shard) != names:
            raise WeightsError(f"shard {path.name} holds different tensor names than {shard_paths[0].name}")

    expected = expected_shapes(config)
    names = sorted(names - _IGNORED)
    # Names (and a single shard's shapes) checked before anything is merged; _merge checks the pieces' shapes.
    check_shapes(
        config,
        {n: shards[0][n].shape if len(shards) == 1 else expected.get(n, shards[0][n].shape) for n in names},
        str(root),
    )
    state_dict = {}
    for name in names:
        parts = [shard[name] for shard in shards]
        span = select(config, name) if select else None
        if len(parts) == 1:
            state_dict[name] = cut(parts[0], span)
        else:
            state_dict[name] = _merge(name, parts, expected[name], span)
    return config, state_dict


def _load_shard(path: Path) -> dict[str, torch.Tensor]:
    try:
        shard = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises pickle, zip and runtime errors alike for a bad file
        raise WeightsError(f"cannot read {path}: {e}") from None
    if not isinstance(shard, dict) or not all(isinstance(t, torch.Tensor) for t in shard.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    return shard


def _merge(name: str, parts: list[torch.Tensor], full: torch.Size, span: Span | None = None) -> torch.Tensor:
    """Join model-parallel pieces of one tensor into the shape the model expects (only the part `span` of it).

    The split dimension is the one where the pieces differ from the full shape: rows for column-parallel weights
    (wq, wk, wv, w1, w3, output; tok_embeddings in Llama 3), columns for row-parallel ones (wo, w2; tok_embeddings in
    Llama 2). Norm weights are replicated. When there are more shards than key/value heads, each shard carries a
    copy of its head's wk/wv rows, and the copies are dropped after checking they agree. A span along the split
    dimension takes only the pieces it overlaps.
    """
    shape = parts[0].shape
    if any(p.shape != shape for p in parts) or len(shape) != len(full):
        raise WeightsError(f"shards disagree on the shape of {name}: {[tuple(p.shape) for p in parts]}")
    if shape == full:
        return cut(parts[0], span)
    split = [d for d in range(len(full)) if shape[d] != full[d]]
    if len(split) != 1:
        raise WeightsError(f"cannot merge shards of {name}: pieces {tuple(shape)}, model expects {tuple(full)}")
    d = split[0]
    total = shape[d] * len(parts)
    if total == full[d]:
        if span is not None and span[0] == d:  # the pieces this span overlaps, each cut to the overlap
            n, lo, hi = shape[d], span[1], span[2]
            return torch.cat(
                [
                    p.narrow(d, max(lo - i * n, 0), min(hi - i * n, n) - max(lo - i * n, 0))
                    for i, p in enumerate(parts)
                    if i * n < hi and (i + 1) * n > lo
                ],
                dim=d,
            )
        return cut(torch.cat(parts, dim=d), span)
    copies = total // full[d]
    if d == 0 and total % full[d] == 0 and len(parts) % copies == 0:
        distinct = len(parts) // copies
        # Copies may sit next to each other (h0 h0 h1 h1) or repeat the whole set (h0 h1 h0 h1).
        for kept, copy_of in ((parts[::copies], lambda i: i // copies), (parts[:distinct], lambda i: i % distinct)):
            if all(torch.equal(parts[i], kept[copy_of(i)]) for i in range(len(parts))):
                return cut(torch.cat(kept, dim=0), span)
    raise WeightsError(f"cannot merge {len(parts)} shards of {name} with shape {tuple(shape)} into {tuple(full)}")
