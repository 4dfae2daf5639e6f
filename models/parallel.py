"""Tensor-parallel group of one worker, passed explicitly to every TP-aware layer.

There is no module-level "current group": a layer gets its ``ParallelContext`` at
construction, so two models (or two test groups) in one process cannot interfere.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import msgpack
import torch
import torch.distributed as dist


# torch >= 2.13 names it all_gather_single; older releases all_gather_into_tensor.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True)
class ParallelContext:
    """Rank and size of a TP group. ``group`` carries tensor collectives (gloo on CPU, NCCL
    on CUDA); ``cpu_group`` (gloo) carries step plans, and is ``group`` itself on CPU."""

    rank: int = 0
    world_size: int = 1
    group: Any = None
    cpu_group: Any = None

    def __post_init__(self) -> None:
        if not isinstance(self.world_size, int) or self.world_size < 1:
            raise ValueError(f"TP world_size must be a positive integer, got {self.world_size!r}")
        if not isinstance(self.rank, int) or not 0 <= self.rank < self.world_size:
            raise ValueError(f"TP rank {self.rank!r} is outside a group of {self.world_size}")

    @property
    def is_driver(self) -> bool:
        """Rank 0: owns the sockets and its results are authoritative."""
        return self.rank == 0


SINGLE = ParallelContext()


def init_tensor_parallel(rank: int, world_size: int, init_method: str,
                         backend: str | None = None,
                         timeout_s: float | None = None) -> ParallelContext:
    """Join a TP group of ``world_size`` processes through ``init_method`` (``file://...``
    or ``tcp://127.0.0.1:PORT``). ``backend`` defaults to NCCL when CUDA is available,
    gloo otherwise. Under NCCL each rank uses ``cuda:rank``. ``timeout_s`` bounds how long
    joining and each collective wait for a missing peer (torch's default otherwise)."""
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"unknown torch.distributed backend {backend!r}; use gloo or nccl")
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    ctx = ParallelContext(rank=rank, world_size=world_size)  # validates before joining
    timeout = timedelta(seconds=timeout_s) if timeout_s is not None else None
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=timeout)
    group = dist.group.WORLD
    cpu_group = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else group
    return ParallelContext(rank=ctx.rank, world_size=ctx.world_size, group=group,
                           cpu_group=cpu_group)


def destroy_tensor_parallel(ctx: ParallelContext) -> None:
    """Leave the process group started by ``init_tensor_parallel`` (no-op at world size 1)."""
    if ctx.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(ctx: ParallelContext, x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over the group, in place."""
    if ctx.world_size > 1:
        dist.all_reduce(x, group=ctx.group)
    return x


def all_gather(ctx: ParallelContext, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's ``x`` (equal shapes) along ``dim``, in rank order."""
    if ctx.world_size == 1:
        return x
    x = x.contiguous()
    out = torch.empty((ctx.world_size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_single(out, x, group=ctx.group)
    out = out.view(ctx.world_size, *x.shape)
    if dim < 0:
        dim += x.dim()
    # [world, ..., d, ...] -> [..., world * d, ...]
    return out.movedim(0, dim).reshape(*x.shape[:dim], -1, *x.shape[dim + 1:])


def broadcast_plan(ctx: ParallelContext, obj: Any = None) -> Any:
    """Send a msgpack-able ``obj`` from rank 0 to every rank; every rank returns it.

    Travels as a length then a byte tensor over the gloo group (never pickled).
    """
    if ctx.world_size == 1:
        return obj
    group = ctx.cpu_group if ctx.cpu_group is not None else ctx.group
    if ctx.rank == 0:
        payload = msgpack.packb(obj, use_bin_type=True)
        size = torch.tensor([len(payload)], dtype=torch.int64)
    else:
        size = torch.zeros(1, dtype=torch.int64)
    dist.broadcast(size, src=0, group=group)
    if ctx.rank == 0:
        data = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    else:
        data = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.broadcast(data, src=0, group=group)
    # Every rank, rank 0 included, returns the decoded copy so all see the same types.
    raw = payload if ctx.rank == 0 else data.numpy().tobytes()
    return msgpack.unpackb(raw, raw=False, strict_map_key=False)
