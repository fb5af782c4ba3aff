"""Tensor parallelism on torch.distributed: one model's weights split across the processes of a group, each rank
holding its share of the attention heads and of the feed-forward's hidden units (and of the KV cache: a rank caches
only its own key/value heads), with one all-reduce after the attention output and one after the feed-forward, as in
Megatron-LM, gpt-fast's tp.py and vLLM's Column/RowParallelLinear.

The plan works on a state dict before the model is built (`shard`), so each rank builds a smaller model of the same
code: a local ModelConfig with its heads and hidden units, and weights sliced by output rows (wq, wk, wv, w1, w3:
"column parallel") or by input columns (wo, w2: "row parallel"; `parallelize` wraps them in `AllReduce`). The model
file has no parallel code. GGML blocks are sliced along rows, and along columns in whole blocks of 32. Embeddings, the
output projection and the norms are replicated: the output projection split by vocabulary would need an all-gather
of every step's logits, and every rank samples from the same full logits, so every rank computes the same tokens
(the all-reduced hidden states are bitwise equal on every rank) and returns what Meta's reference returns on each.

Key/value heads: with as many ranks as KV heads or fewer, each rank takes n_kv_heads / world of them; with more, each
KV head is replicated on world / n_kv_heads ranks, which hold the query heads that read it.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from lamina.errors import ConfigError
from lamina.model import ModelConfig
from lamina.quant import Blocks
from lamina.quant.ggml import BLOCK_BYTES, QK

COLUMN = ("wq", "wk", "wv", "w1", "w3")  # split by output rows
ROW = ("wo", "w2")  # split by input columns, then all-reduced


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in a tensor-parallel group: its rank, the group's size, and the group (None: the default
    group torch.distributed was initialised with)."""

    rank: int
    world_size: int
    group: dist.ProcessGroup | None = None


def launched_ranks() -> int:
    """How many processes torchrun (or any launcher setting WORLD_SIZE) started; 1 outside such a launch."""
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number of processes") from None


def init(world_size: int | None, device: torch.device, timeout_s: float = 300.0) -> TensorParallel:
    """Join the process group of a torchrun launch (RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT from its
    environment): gloo on the CPU, NCCL on CUDA. `world_size` (None: whatever the launch has) must match the launch.
    A collective that waits longer than `timeout_s` fails instead of hanging."""
    launched = launched_ranks()
    if world_size is not None and world_size != launched:
        how = "started outside torchrun" if "WORLD_SIZE" not in os.environ else f"torchrun started {launched}"
        raise ConfigError(
            f"tensor parallel size {world_size} needs as many processes ({how}): "
            f"run it as `torchrun --nproc-per-node {world_size} ...`"
        )
    if "RANK" not in os.environ or "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise ConfigError("a tensor-parallel launch needs RANK, MASTER_ADDR and MASTER_PORT (torchrun sets them)")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return TensorParallel(dist.get_rank(), dist.get_world_size())


def setup(world_size: int | None, device: torch.device) -> tuple[TensorParallel | None, torch.device]:
    """The tensor-parallel group a load runs in (None: one process), and this rank's device: with CUDA, the card of
    its LOCAL_RANK. `world_size` None follows the launch (Meta's `model_parallel_size=None`: WORLD_SIZE)."""
    world = launched_ranks() if world_size is None else world_size
    if not isinstance(world, int) or isinstance(world, bool) or world < 1:
        raise ConfigError(f"tensor parallel size must be a positive integer, got {world_size!r}")
    if world == 1:  # one process (also when a launch runs several, each with the whole model)
        return None, device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return init(world, device), device


def agree(tp: TensorParallel, what: str, value) -> None:
    """Every rank must hold the same `value` (the model it loads, its shapes): a launch whose ranks disagree is an
    error on every rank, naming the first rank that differs from rank 0, instead of a silently wrong model."""
    values = [None] * tp.world_size
    dist.all_gather_object(values, value, group=tp.group)
    for rank, other in enumerate(values):
        if other != values[0]:
            raise ConfigError(f"the ranks disagree on {what}: rank 0 has {values[0]!r}, rank {rank} has {other!r}")


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


def _take(name: str, w, dim: int, lo: int, hi: int, world: int):
    """Rows (dim 0) or columns (dim 1) lo..hi-1 of a weight, copied (so that the full tensor can go)."""
    if isinstance(w, Blocks):
        if dim == 0:
            return Blocks(w.qtype, w.data[lo:hi].clone(), w.cols)
        if lo % QK or hi % QK:
            raise ConfigError(
                f"{name}: {w.qtype} blocks of {QK} columns cannot be split {world} ways (columns {lo}..{hi - 1} of "
                f"{w.cols}: dimension 1 must divide into whole blocks per rank)"
            )
        size = BLOCK_BYTES[w.qtype]
        return Blocks(w.qtype, w.data[:, lo // QK * size : hi // QK * size].clone(), hi - lo)
    return w.narrow(dim, lo, hi - lo).clone()


def shard(
    config: ModelConfig, state: dict[str, torch.Tensor | Blocks], tp: TensorParallel
) -> tuple[ModelConfig, dict[str, torch.Tensor | Blocks]]:
    """This rank's model shapes and weights: column-parallel weights cut by rows, row-parallel ones by columns, the
    rest as they are. `state` holds the full model's weights in lamina's names (tensors or GGML blocks)."""
    local = local_config(config, tp.world_size)
    out = {}
    for name, w in state.items():
        kind = name.split(".")[-2] if name.startswith("layers.") and name.endswith(".weight") else ""
        if kind in COLUMN or kind in ROW:
            lo, hi = _span(kind, config, tp)
            out[name] = _take(name, w, 0 if kind in COLUMN else 1, lo, hi, tp.world_size)
        else:
            out[name] = w
    return local, out


class AllReduce(nn.Module):
    """A row-parallel projection: this rank's columns of the weight against its share of the input, summed over the
    group. gloo reduces float32 (a bfloat16 output is summed in float32 and cast back)."""

    def __init__(self, inner: nn.Module, tp: TensorParallel):
        super().__init__()
        self.inner, self.tp = inner, tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        if y.device.type == "cpu" and y.dtype != torch.float32:
            total = y.float()
            dist.all_reduce(total, group=self.tp.group)
            return total.to(y.dtype)
        dist.all_reduce(y, group=self.tp.group)
        return y


def parallelize(model: nn.Module, tp: TensorParallel) -> nn.Module:
    """Wrap each layer's row-parallel projections (attention output, feed-forward down) in an all-reduce."""
    for layer in model.layers:
        layer.attention.wo = AllReduce(layer.attention.wo, tp)
        layer.feed_forward.w2 = AllReduce(layer.feed_forward.w2, tp)
    return model


# One scheduler: where only rank 0 runs the engine (the server), the other ranks follow it. Before each forward pass
# rank 0's runner hands the pass's inputs (token ids, positions, block tables: a few KB) to every rank, which runs
# the same pass on its shard; the all-reduces inside keep the ranks in step. Rank 0 alone samples.


def _plain(value):
    """The inputs of a forward pass as plain lists and ints (no request objects travel)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def drive(runner, tp: TensorParallel) -> None:
    """Make `runner` (rank 0's ModelRunner) announce each forward pass to the other ranks before it runs it."""

    def announce(op: str, args: tuple) -> None:
        dist.broadcast_object_list([(op, _plain(args))], src=0, group=tp.group)

    runner.before_forward = announce


def heartbeat(tp: TensorParallel, every_s: float):
    """A callable for rank 0's idle moments: at most every `every_s` seconds it tells the following ranks it is alive
    (they wait for the next step in a collective, which fails after the group's timeout), and it raises when a rank
    is gone, so an idle server notices a dead rank too."""
    last = [time.monotonic()]

    def beat() -> None:
        if time.monotonic() - last[0] >= every_s:
            dist.broadcast_object_list([("ping", ())], src=0, group=tp.group)
            last[0] = time.monotonic()

    return beat


def follow(runner, tp: TensorParallel) -> None:
    """A following rank: run every forward pass rank 0 announces on this rank's shard, until it says stop. Raises
    what a failed collective raises (rank 0 gone, or a timeout)."""
    with torch.inference_mode():
        while True:
            box = [None]
            dist.broadcast_object_list(box, src=0, group=tp.group)
            op, args = box[0]
            if op == "stop":
                return
            if op == "ping":
                continue
            if op not in ("prefill", "decode"):
                raise RuntimeError(f"rank 0 announced an unknown step {op!r}")
            getattr(runner, op)(*args)


def release(tp: TensorParallel) -> None:
    """Rank 0: tell the following ranks to return from `follow`."""
    dist.broadcast_object_list([("stop", ())], src=0, group=tp.group)


def current() -> TensorParallel | None:
    """The group this process joined (`setup`), or None outside one."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    return TensorParallel(dist.get_rank(), dist.get_world_size())


__all__ = [
    "current",
    "drive",
    "follow",
    "heartbeat",
    "release",
    "AllReduce",
    "agree",
    "TensorParallel",
    "init",
    "launched_ranks",
    "local_config",
    "parallelize",
    "setup",
    "shard",
]
