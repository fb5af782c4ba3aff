"""Hugging Face Llama checkpoints: `config.json` plus `model.safetensors` (or shards listed in its index), renamed to
lamina's scheme, with q/k rows permuted back from rotate-half order to Meta's interleaved RoPE order."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from lamina.errors import ConfigError, WeightsError
from lamina.model import ModelConfig
from lamina.weights.common import Progress, Select, check_shapes, target_name

_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_NAMES = {
    "input_layernorm": "attention_norm",
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")
_IGNORED = re.compile(r".*rotary_emb\.inv_freq")


def read_hf_config(root: Path) -> dict:
    path = root / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise WeightsError(f"{root} has no config.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return config


def safetensors_files(root: Path) -> list[Path]:
    """The weight files of a checkpoint directory: the shards its index names, else model.safetensors."""
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise WeightsError(f"cannot read {index}: {e}") from None
        files = [root / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise WeightsError(f"{index.name} lists shard(s) missing from {root}: {', '.join(missing)}")
        return files
    single = root / "model.safetensors"
    if single.is_file():
        return [single]
    raise WeightsError(f"{root} has no model.safetensors (nor model.safetensors.index.json with its shards)")


def load_hf_checkpoint(
    ckpt_dir: str | Path, progress: Progress | None = None, select: Select | None = None
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a Hugging Face Llama checkpoint directory into (config, state dict in the checkpoint's dtype). Names and
    shapes are checked before any tensor is read; with `select`, only the part of each weight it names is read."""
    from safetensors import SafetensorError, safe_open

    root = Path(ckpt_dir)
    config = ModelConfig.from_hf(read_hf_config(root))
    files = safetensors_files(root)
    where: dict[str, tuple[Path, str, tuple[int, ...]]] = {}  # lamina name -> (file, its name there, full shape)
    try:
        for file in files:
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in f.keys():
                    if _IGNORED.fullmatch(name):
                        continue
                    target = _target_name(name)
                    if target is None:
                        raise WeightsError(f"{file} holds tensor {name!r}, which a Llama model does not have")
                    where[target] = (file, name, tuple(f.get_slice(name).get_shape()))
    except SafetensorError as e:
        raise WeightsError(f"cannot read {file}: {e}") from None
    if config.tie_embeddings:
        where.pop("output.weight", None)  # some tied checkpoints store the shared matrix twice
    check_shapes(config, {target: shape for target, (_, _, shape) in where.items()}, str(root))

    state: dict[str, torch.Tensor] = {}
    for i, file in enumerate(files):
        if progress:
            progress(i, len(files))
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for target, (_, name, shape) in [(t, w) for t, w in where.items() if w[0] == file]:
                    span = select(config, target) if select else None
                    if span is None:
                        t = f.get_tensor(name)
                    else:  # only this part is read from the file
                        dim, lo, hi = span
                        t = f.get_slice(name)[(slice(None),) * dim + (slice(lo, hi),)]
                    state[target] = _from_hf_layout(target, t, config)
        except SafetensorError as e:
            raise WeightsError(f"cannot read {file}: {e}") from None
    if progress:
        progress(len(files), len(files))
    return config, state


def _target_name(name: str) -> str | None:
    return target_name(name, _GLOBAL_NAMES, _LAYER_RE, _LAYER_NAMES)


def _from_hf_layout(name: str, t: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """Hugging Face rotates the two halves of each head (rotate_half); Meta rotates adjacent pairs. Reorder the
    rows of wq/wk so that HF row i of a head's first half and row i of its second half become pair (2i, 2i+1).
    `t` may hold any whole heads of the weight (a tensor-parallel rank's rows)."""
    if not name.endswith(("attention.wq.weight", "attention.wk.weight")):
        return t
    D = config.head_dim
    return t.view(t.shape[0] // D, 2, D // 2, -1).transpose(1, 2).reshape(t.shape[0], -1)
