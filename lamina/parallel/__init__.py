"""Tensor parallelism on torch.distributed: one model's weights split across the processes of a group, each rank
holding its share of the attention heads and of the feed-forward's hidden units (and of the KV cache: a rank caches
only its own key/value heads), with one all-reduce after the attention output and one after the feed-forward, as in
Megatron-LM, gpt-fast's tp.py and vLLM's Column/RowParallelLinear.

The plan is applied as the weights are read (`span`: each loader reads only a rank's part of each weight, so no rank
ever holds the whole model), and each rank builds a smaller model of the same code: a local ModelConfig with its
heads and hidden units, and weights sliced by output rows (wq, wk, wv, w1, w3: "column parallel") or by input
columns (wo, w2: "row parallel"; `parallelize` wraps them in `AllReduce`). The model file has no parallel code. GGML
blocks are sliced along rows, and along columns in whole blocks of 32.

Embeddings and the output projection are split by vocabulary, as vLLM's VocabParallelEmbedding / ParallelLMHead: a
rank looks up only the token ids in its rows (the others give zeros; one all-reduce sums them) and computes only
its rows' logits, which one all-gather joins. Replicating them instead costs each rank the whole table (on Llama 3
shapes, 128,256 x dim: a quarter of a 1B model's weights, twice that untied), so a rank would hold far more than
its 1/N. Every rank gets the whole logits and samples from them with the same generator, so every rank computes
the same tokens (the all-reduced hidden states are bitwise equal on every rank) and returns what Meta's reference
returns on each. Norms are replicated.

Key/value heads: with as many ranks as KV heads or fewer, each rank takes n_kv_heads / world of them; with more, each
KV head is replicated on world / n_kv_heads ranks, which hold the query heads that read it.
"""

from __future__ import annotations

import atexit
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
from lamina.kernels.types import type_of

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
        atexit.register(_leave)
    return TensorParallel(dist.get_rank(), dist.get_world_size())


def _leave() -> None:
    """At exit, leave the group we joined: its connections closed by us, not torn down with the process (a peer
    that sees them vanish mid-flight may abort)."""
    if dist.is_initialized():
        dist.destroy_process_group()


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


def _all_reduce(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """The sum of `x` over the group (gloo reduces float32 only: a CPU bfloat16 tensor is summed in float32)."""
    if x.device.type == "cpu" and x.dtype != torch.float32:
        total = x.float()
        dist.all_reduce(total, group=tp.group)
        return total.to(x.dtype)
    dist.all_reduce(x, group=tp.group)
    return x


class AllReduce(nn.Module):
    """A row-parallel projection: this rank's columns of the weight against its share of the input, summed over the
    group. `reduce` is the sum alone (lamina.engine.native calls it between the stages of its C step)."""

    def __init__(self, inner: nn.Module, tp: TensorParallel):
        super().__init__()
        self.inner, self.tp = inner, tp

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        return _all_reduce(x, self.tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _all_reduce(self.inner(x), self.tp)


class VocabParallelEmbedding(nn.Module):
    """An embedding table of which this rank holds rows lo..hi-1: ids outside them look up zeros, and the sum over
    the group is every id's row (exactly: one term of each sum is not zero)."""

    def __init__(self, inner: nn.Module, lo: int, hi: int, tp: TensorParallel):
        super().__init__()
        self.inner, self.lo, self.hi, self.tp = inner, lo, hi, tp

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.lo
        mine = (local >= 0) & (local < self.hi - self.lo)
        rows = self.inner(local.clamp(0, self.hi - self.lo - 1))
        return _all_reduce(rows * mine.unsqueeze(-1).to(rows.dtype), self.tp)


class VocabParallelLogits(nn.Module):
    """The output projection of which this rank holds the rows (logits) lo..hi-1 of `vocab_size`: each rank
    computes its logits and one all-gather gives every rank all of them, in order."""

    def __init__(self, inner: nn.Module, vocab_size: int, tp: TensorParallel):
        super().__init__()
        self.inner, self.vocab_size, self.tp = inner, vocab_size, tp
        self.per = -(-vocab_size // tp.world_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        mine = self.inner(h).float()  # [n, rows of this rank]
        if mine.shape[-1] < self.per:  # the last rank's short share, padded so every rank sends as much
            mine = torch.nn.functional.pad(mine, (0, self.per - mine.shape[-1]))
        parts = [torch.empty_like(mine) for _ in range(self.tp.world_size)]
        dist.all_gather(parts, mine.contiguous(), group=self.tp.group)
        return torch.cat(parts, dim=-1)[..., : self.vocab_size]


def parallelize(model: nn.Module, tp: TensorParallel, vocab_size: int) -> nn.Module:
    """Make a rank's model (built from `build_config`'s shapes) a part of the whole: each layer's row-parallel
    projections (attention output, feed-forward down) summed over the group, the embedding and the output
    projection over the whole vocabulary of `vocab_size` ids (a tied output projection reads the embedding's rows).
    The model's config then says the full vocabulary and this rank's heads."""
    for layer in model.layers:
        layer.attention.wo = AllReduce(layer.attention.wo, tp)
        layer.feed_forward.w2 = AllReduce(layer.feed_forward.w2, tp)
    lo, hi = vocab_rows(vocab_size, tp)
    table = model.tok_embeddings
    if model.output is None:  # tied: the logits of this rank's rows of the embedding table
        output = nn.Linear(table.weight.shape[1], hi - lo, bias=False, device="meta")
        output.weight = table.weight
        model.output = output
    model.output = VocabParallelLogits(model.output, vocab_size, tp)
    model.tok_embeddings = VocabParallelEmbedding(table, lo, hi, tp)
    model.config = dataclasses.replace(model.config, vocab_size=vocab_size)
    return model


# One scheduler: where only rank 0 runs the engine (the server), the other ranks follow it. Before each forward pass
# rank 0's runner hands the pass's inputs (token ids, positions, block tables: a few KB) to every rank, which runs
# the same pass on its shard; the all-reduces inside keep the ranks in step. Before it projects hidden states to
# logits outside a decode step (a prompt's last token, prompt logprobs) it hands them over too: each rank computes
# its share of the vocabulary. Rank 0 alone samples.


def _plain(value):
    """The inputs of a forward pass as plain lists and ints (no request objects travel)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def drive(runner, tp: TensorParallel) -> None:
    """Make `runner` (rank 0's ModelRunner) announce each forward pass to the other ranks before it runs it."""

    def announce(op: str, args: tuple) -> None:
        if op == "logits":  # hidden states, from the CPU (each rank moves them to its device)
            args = (args[0].cpu(),)
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
            if op == "logits":  # hidden states rank 0 projects (each rank computes its share of the vocabulary)
                runner.logits(args[0].to(runner.config.device))
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
    "VocabParallelEmbedding",
    "VocabParallelLogits",
    "agree",
    "build_config",
    "TensorParallel",
    "init",
    "launched_ranks",
    "local_config",
    "parallelize",
    "setup",
    "shard",
    "span",
    "vocab_rows",
]
