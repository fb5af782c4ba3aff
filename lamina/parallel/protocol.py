"""One scheduler: where only rank 0 runs the engine (the server), the other ranks follow it. Before each forward pass
rank 0's runner hands the pass's inputs (token ids, positions, block tables: a few KB) to every rank, which runs
the same pass on its shard; the all-reduces inside keep the ranks in step. Before it projects hidden states to
logits outside a decode step (a prompt's last token, prompt logprobs) it hands them over too: each rank computes
its share of the vocabulary. Rank 0 alone samples."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from lamina.parallel.group import TensorParallel


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


def rank0_value(tp: TensorParallel, value: float) -> float:
    """Rank 0's `value` on every rank. Where every rank runs the engine itself (offline, under torchrun), a choice
    made from a measurement (speculative decoding's plan, from step times) must be made from the same one on every
    rank, or the ranks would run different steps and their collectives would not meet."""
    box = torch.tensor([value], dtype=torch.float64)
    dist.broadcast(box, src=0, group=tp.group)
    return float(box.item())


def group_of(model) -> TensorParallel | None:
    """The tensor-parallel group a model was made part of (`parallelize`), None for a whole model."""
    return getattr(model.output, "tp", None)


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
            if op not in ("prefill", "decode", "rows"):
                raise RuntimeError(f"rank 0 announced an unknown step {op!r}")
            getattr(runner, op)(*args)


def release(tp: TensorParallel) -> None:
    """Rank 0: tell the following ranks to return from `follow`."""
    dist.broadcast_object_list([("stop", ())], src=0, group=tp.group)
