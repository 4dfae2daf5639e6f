"""Tensor-parallel linear layers that own their sharding.

Every parameter carries ``weight_loader(param, loaded, shard_id=None)``. ``loaded`` is a
safetensors slice (``get_shape()``, ``[a:b]``, ``[:, a:b]``) or a tensor; a loader reads
only its own rank's rows or columns, never the full tensor, and raises ``ValueError`` when
the checkpoint tensor's shape is not the one the layer expects.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvtransfer.spec import kv_head_range
from models.parallel import SINGLE, ParallelContext, all_reduce


def loaded_shape(loaded) -> tuple[int, ...]:
    """Shape of a safetensors slice or a tensor, without reading its data."""
    get_shape = getattr(loaded, "get_shape", None)
    return tuple(get_shape()) if get_shape is not None else tuple(loaded.shape)


def check_shape(loaded, expected: tuple[int, ...]) -> None:
    shape = loaded_shape(loaded)
    if shape != tuple(expected):
        raise ValueError(f"checkpoint shape {list(shape)} does not match the model's "
                         f"{list(expected)}")


def default_weight_loader(param: nn.Parameter, loaded, shard_id=None) -> None:
    """Replicated parameter: every rank holds the whole tensor."""
    check_shape(loaded, param.shape)
    param.data.copy_(loaded[:])


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


def _divide(size: int, ctx: ParallelContext, what: str) -> int:
    if size % ctx.world_size:
        raise ValueError(f"{what} ({size}) is not divisible by TP={ctx.world_size}; "
                         "choose a TP degree that divides it")
    return size // ctx.world_size


class ColumnParallelLinear(nn.Module):
    """``y = x W^T + b`` with W's output rows split over ranks; output stays sharded."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 ctx: ParallelContext = SINGLE):
        super().__init__()
        self.ctx = ctx
        self.input_size = input_size
        self.output_size = output_size
        self.output_size_per_rank = _divide(output_size, ctx, "linear output size")
        self.weight = _param(self.output_size_per_rank, input_size)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = _param(self.output_size_per_rank)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        check_shape(loaded, (self.output_size, *param.shape[1:]))
        start = self.ctx.rank * self.output_size_per_rank
        param.data.copy_(loaded[start:start + self.output_size_per_rank])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input fused into one matmul
    (gate_up). Shard ``i`` of the checkpoint fills block ``i`` of each rank's rows."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False,
                 ctx: ParallelContext = SINGLE):
        for size in output_sizes:
            _divide(size, ctx, "fused linear output size")
        self.output_sizes = list(output_sizes)
        super().__init__(input_size, sum(output_sizes), bias, ctx)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        if not isinstance(shard_id, int) or not 0 <= shard_id < len(self.output_sizes):
            raise ValueError(f"fused linear shard id must be 0..{len(self.output_sizes) - 1}, "
                             f"got {shard_id!r}")
        size = self.output_sizes[shard_id]
        check_shape(loaded, (size, *param.shape[1:]))
        tp = self.ctx.world_size
        local = size // tp
        offset = sum(self.output_sizes[:shard_id]) // tp
        start = self.ctx.rank * local
        param.data[offset:offset + local].copy_(loaded[start:start + local])


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q, k, v projections. Each rank holds ``num_heads / TP`` query heads and the kv
    heads ``kv_head_range(num_kv_heads, TP, rank)`` (replicated when fewer kv heads than
    ranks). Output rows per rank: ``[q heads | k heads | v heads] * head_dim``."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, ctx: ParallelContext = SINGLE):
        self.head_dim = head_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.num_local_heads = _divide(num_heads, ctx, "number of attention heads")
        self.kv_start, kv_stop = kv_head_range(num_kv_heads, ctx.world_size, ctx.rank)
        self.num_local_kv_heads = kv_stop - self.kv_start
        local_rows = (self.num_local_heads + 2 * self.num_local_kv_heads) * head_dim
        super().__init__(hidden_size, local_rows * ctx.world_size, bias, ctx)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        d = self.head_dim
        q_rows, kv_rows = self.num_local_heads * d, self.num_local_kv_heads * d
        if shard_id == "q":
            full, start, offset, rows = self.num_heads * d, self.ctx.rank * q_rows, 0, q_rows
        elif shard_id in ("k", "v"):
            full, start, rows = self.num_kv_heads * d, self.kv_start * d, kv_rows
            offset = q_rows + (kv_rows if shard_id == "v" else 0)
        else:
            raise ValueError(f"qkv shard id must be 'q', 'k' or 'v', got {shard_id!r}")
        check_shape(loaded, (full, *param.shape[1:]))
        param.data[offset:offset + rows].copy_(loaded[start:start + rows])


class RowParallelLinear(nn.Module):
    """``y = x W^T + b`` with W's input columns split over ranks: the input arrives sharded,
    partial outputs are summed across ranks, then the (replicated) bias is added once."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 ctx: ParallelContext = SINGLE):
        super().__init__()
        self.ctx = ctx
        self.input_size = input_size
        self.output_size = output_size
        self.input_size_per_rank = _divide(input_size, ctx, "linear input size")
        self.weight = _param(output_size, self.input_size_per_rank)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = _param(output_size)
            self.bias.weight_loader = default_weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        check_shape(loaded, (self.output_size, self.input_size))
        start = self.ctx.rank * self.input_size_per_rank
        param.data.copy_(loaded[:, start:start + self.input_size_per_rank])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ctx.world_size == 1:
            return F.linear(x, self.weight, self.bias)
        y = all_reduce(self.ctx, F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias
