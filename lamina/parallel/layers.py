"""The parallel layers that make a rank's model a part of the whole: a row-parallel projection summed over the group,
and the embedding and output projection split by vocabulary."""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import nn

from lamina.parallel.group import TensorParallel
from lamina.parallel.plan import vocab_rows


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
