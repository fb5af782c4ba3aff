"""The sharding plan: which part of each weight a rank holds (attention heads and feed-forward hidden units split by
output rows or input columns, the vocabulary tables by rows, norms whole), the shapes of a rank's model, and cutting
a state dict held in memory to a rank's part (the loaders cut as they read instead, through `span`)."""

from __future__ import annotations

import dataclasses

import torch

from lamina.errors import ConfigError
from lamina.kernels.types import type_of
from lamina.model import ModelConfig
from lamina.parallel.group import TensorParallel
from lamina.quant import Blocks

COLUMN = ("wq", "wk", "wv", "w1", "w3")  # split by output rows
ROW = ("wo", "w2")  # split by input columns, then all-reduced


def _check(config: ModelConfig, world: int) -> None:
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ConfigError(f"tensor parallel size {world} does not divide {what}")

    need(config.n_heads % world == 0, f"the model's {config.n_heads} attention heads (wq rows, wo columns)")
    need(
        config.n_kv_heads % world == 0 or world % config.n_kv_heads == 0,
        f"nor is it a multiple of the model's {config.n_kv_heads} key/value heads (wk, wv rows)",
    )
    need(
        config.hidden_dim % world == 0, f"the feed-forward's {config.hidden_dim} hidden units (w1, w3 rows, w2 columns)"
    )


def local_config(config: ModelConfig, world: int) -> ModelConfig:
    """The shapes one rank's model has: its share of the heads and of the hidden units."""
    _check(config, world)
    return dataclasses.replace(
        config,
        n_heads=config.n_heads // world,
        n_kv_heads=max(config.n_kv_heads // world, 1),
        hidden_dim=config.hidden_dim // world,
        head_dim=config.head_dim,
    )


def vocab_rows(vocab_size: int, tp: TensorParallel) -> tuple[int, int]:
    """The vocabulary rows (of the embedding and the output projection) this rank holds: ceil(vocab / world) each,
    the last rank's fewer where the world size does not divide the vocabulary."""
    per = -(-vocab_size // tp.world_size)
    lo = min(tp.rank * per, vocab_size)
    return lo, min(lo + per, vocab_size)


def _span(kind: str, config: ModelConfig, tp: TensorParallel) -> tuple[int, int]:
    """The range of rows (column-parallel weights) or columns (row-parallel ones) of a full weight this rank keeps."""
    r, W, D = tp.rank, tp.world_size, config.head_dim
    if kind in ("wq", "wo"):
        n = config.n_heads // W * D
        return r * n, (r + 1) * n
    if kind in ("wk", "wv"):
        if W <= config.n_kv_heads:
            n = config.n_kv_heads // W * D
            return r * n, (r + 1) * n
        head = r * config.n_kv_heads // W  # replicated: the KV head this rank's query heads read
        return head * D, (head + 1) * D
    n = config.hidden_dim // W  # w1, w3, w2
    return r * n, (r + 1) * n


def span(config: ModelConfig, name: str, tp: TensorParallel) -> tuple[int, int, int] | None:
    """The part of the full model's weight `name` (lamina's names) this rank holds, as (dim, lo, hi): rows of the
    column-parallel weights and of the vocabulary tables, columns of the row-parallel ones; None: all of it (norms).
    Raises ConfigError when the world size does not divide the model's heads or hidden units. The loaders take it
    as their `select` (lamina.weights.common.Select), so a rank reads only its part of each weight."""
    _check(config, tp.world_size)
    if name in ("tok_embeddings.weight", "output.weight"):
        return (0, *vocab_rows(config.vocab_size, tp))
    kind = name.split(".")[-2] if name.startswith("layers.") and name.endswith(".weight") else ""
    if kind in COLUMN or kind in ROW:
        return (0 if kind in COLUMN else 1, *_span(kind, config, tp))
    return None


def build_config(config: ModelConfig, tp: TensorParallel) -> ModelConfig:
    """The shapes the model a rank builds has: its heads, hidden units and vocabulary rows (`parallelize` then makes
    the model whole again towards its caller: full-vocabulary ids in, full-vocabulary logits out)."""
    lo, hi = vocab_rows(config.vocab_size, tp)
    return dataclasses.replace(local_config(config, tp.world_size), vocab_size=hi - lo)


def _take(name: str, w, dim: int, lo: int, hi: int, world: int):
    """Rows (dim 0) or columns (dim 1) lo..hi-1 of a weight, copied (so that the full tensor can go)."""
    if isinstance(w, Blocks):
        if dim == 0:
            return Blocks(w.qtype, w.data[lo:hi].clone(), w.cols)
        t = type_of(w.qtype)
        if lo % t.block or hi % t.block:
            raise ConfigError(
                f"{name}: {w.qtype} blocks of {t.block} columns cannot be split {world} ways (columns {lo}..{hi - 1} "
                f"of {w.cols}: dimension 1 must divide into whole blocks per rank)"
            )
        return Blocks(w.qtype, w.data[:, t.row_bytes(lo) : t.row_bytes(hi)].clone(), hi - lo)
    return w.narrow(dim, lo, hi - lo).clone()


def shard(
    config: ModelConfig, state: dict[str, torch.Tensor | Blocks], tp: TensorParallel
) -> tuple[ModelConfig, dict[str, torch.Tensor | Blocks]]:
    """This rank's model shapes (`build_config`) and weights, cut from a full model's state dict held in memory (the
    loaders cut them as they read instead, through `span`)."""
    out = {}
    for name, w in state.items():
        part = span(config, name, tp)
        out[name] = w if part is None else _take(name, w, *part, tp.world_size)
    return build_config(config, tp), out
