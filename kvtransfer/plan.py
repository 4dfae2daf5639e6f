"""What one prefill rank sends where: kv-head re-sharding between TP groups and block runs.

Pure Python (no torch), so both ends and the tests compute identical plans.

Re-sharding rule: decode rank ``d`` needs the global heads ``kv_head_range(H, d_tp, d)``. Each of
those heads is taken from exactly one prefill rank: the only holder when heads are split, or,
when the prefill group replicates heads (H < p_tp), holder number ``d % replicas`` so that
equal TP degrees pair rank i with rank i. A prefill rank therefore sends to decode rank ``d``
either one contiguous head slice or nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

SOLO_RUN_BYTES = 64 << 10  # a run this large (K or V of one layer) moves alone; smaller ones are grouped

from kvtransfer.spec import kv_head_range, num_blocks_for


@dataclass(frozen=True)
class HeadSlice:
    """The heads one prefill rank writes into one decode rank, in each side's local numbering."""

    d_rank: int
    src: tuple[int, int]  # [start, stop) of the prefill rank's local kv heads
    dst: tuple[int, int]  # [start, stop) of the decode rank's local kv heads


def _holders(num_kv_heads: int, p_tp: int, head: int) -> list[int]:
    ranges = [kv_head_range(num_kv_heads, p_tp, p) for p in range(p_tp)]
    return [p for p, (start, stop) in enumerate(ranges) if start <= head < stop]


def head_slices(num_kv_heads: int, p_tp: int, p_rank: int, d_tp: int) -> list[HeadSlice]:
    """Every decode rank that prefill rank ``p_rank`` writes to, with the heads it writes."""
    p_start, p_stop = kv_head_range(num_kv_heads, p_tp, p_rank)
    slices = []
    for d_rank in range(d_tp):
        d_start, d_stop = kv_head_range(num_kv_heads, d_tp, d_rank)
        start, stop = max(p_start, d_start), min(p_stop, d_stop)
        if start >= stop:
            continue
        holders = _holders(num_kv_heads, p_tp, start)
        if holders[d_rank % len(holders)] != p_rank:
            continue  # a replica of this head on another prefill rank sends it
        slices.append(HeadSlice(d_rank, (start - p_start, stop - p_start),
                                (start - d_start, stop - d_start)))
    return slices


def sources_for(num_kv_heads: int, p_tp: int, d_tp: int, d_rank: int) -> frozenset[int]:
    """The prefill ranks that write into decode rank ``d_rank`` (each sends it one ``done``)."""
    return frozenset(p for p in range(p_tp)
                     if any(s.d_rank == d_rank for s in head_slices(num_kv_heads, p_tp, p, d_tp)))


def block_runs(src_ids: Sequence[int], dst_ids: Sequence[int],
               max_blocks: int | None = None) -> list[tuple[int, int, int]]:
    """Coalesce block pairs into ``(src_start, dst_start, num_blocks)`` runs.

    A run grows while both the source and the destination ids are consecutive, and stops at
    ``max_blocks`` (to bound the bytes of one message or copy).
    """
    if len(src_ids) != len(dst_ids):
        raise ValueError(f"{len(src_ids)} source blocks but {len(dst_ids)} destination blocks")
    runs: list[tuple[int, int, int]] = []
    for src, dst in zip(src_ids, dst_ids):
        if runs:
            s, d, n = runs[-1]
            if src == s + n and dst == d + n and (max_blocks is None or n < max_blocks):
                runs[-1] = (s, d, n + 1)
                continue
        runs.append((src, dst, 1))
    return runs


def slice_block_bytes(spec, heads: tuple[int, int]) -> int:
    """Bytes of one block of one layer's K (or V), restricted to local heads ``[start, stop)``."""
    return spec.block_size * (heads[1] - heads[0]) * spec.head_dim * spec.itemsize


def group_runs(runs: list[tuple[int, int, int]], min_alone: int) -> list[list[tuple[int, int, int]]]:
    """Split runs into groups that each move in one operation: a run of at least ``min_alone``
    blocks alone (a slice copy, or a zero-copy frame), consecutive shorter runs together (one
    gather and one scatter, far cheaper than a small copy per block on a fragmented pool)."""
    groups: list[list[tuple[int, int, int]]] = []
    for run in runs:
        if run[2] >= min_alone:
            groups.append([run])
        elif groups and groups[-1][-1][2] < min_alone:
            groups[-1].append(run)
        else:
            groups.append([run])
    return groups


def block_span(start: int, stop: int, block_size: int) -> tuple[int, int]:
    """Indices ``[first, last)`` into a block table of the blocks holding tokens ``[start, stop)``."""
    if not 0 <= start < stop:
        raise ValueError(f"bad token range [{start}, {stop})")
    return start // block_size, num_blocks_for(stop, block_size)
