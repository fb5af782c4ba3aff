"""The process group of a tensor-parallel launch: joining it (torchrun's environment; gloo on the CPU, NCCL on CUDA),
this process's place in it, and a check that every rank loads the same model."""

from __future__ import annotations

import atexit
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lamina.errors import ConfigError


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


def current() -> TensorParallel | None:
    """The group this process joined (`setup`), or None outside one."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    return TensorParallel(dist.get_rank(), dist.get_world_size())
