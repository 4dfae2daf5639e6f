"""shm transport: the prefill rank copies straight into the decode rank's shared-memory pool.

Only the ``done``/``abort`` notifications travel (over the rank's ZMQ link). Next to its pool,
each decode rank keeps an owner tag per block in shared memory (``OwnerTags``):

    tag(x)  reserved for transfer x and open: writers of x may copy
    -tag(x) transfer x was closed on this rank: writers of x must stop
    other   not open for x (never reserved, or not yet: writers of x wait a bounded time)

Only the decode rank's receiver thread writes tags; the writer checks them before every copy,
so a writer whose transfer was closed or whose blocks moved on drops its data instead of
writing. The quarantine (reservation.py) still guards the check-then-copy window. The nixl
transport reads the same tags remotely (nixl_transport.py).
"""
from __future__ import annotations

import hashlib
import os
import time

import numpy as np

from kvtransfer.blockcopy import gather_blocks, scatter_blocks
from kvtransfer.plan import SOLO_RUN_BYTES, HeadSlice, group_runs, slice_block_bytes
from kvtransfer.pool import KVPool
from kvtransfer.spec import KVSpec
from kvtransfer.transport import RankTarget, TransferError


def transfer_tag(transfer_id: str) -> int:
    """A positive 62-bit tag of a transfer id, identical in every process."""
    digest = hashlib.blake2b(transfer_id.encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "little") & ((1 << 62) - 1)) | 1


def tag_state(tags: np.ndarray, transfer_id: str) -> str:
    """``open`` if every block is open for the transfer, ``closed`` if it was closed on any of
    them, else ``pending``: not opened for it (yet: a reused block keeps its previous owner's
    tag until the rank's ``open`` lands, so writers wait a bounded time before giving up)."""
    tag = transfer_tag(transfer_id)
    if (tags == tag).all():
        return "open"
    if (tags == -tag).any():
        return "closed"
    return "pending"


class OwnerTags:
    """One int64 owner tag per block of a decode rank's pool: in a /dev/shm file next to a
    shared pool (``path``), else in process memory (read remotely through NIXL)."""

    def __init__(self, num_blocks: int, path: str | None = None, *, create: bool = True):
        self.path = path
        self._owner = create
        if path is None:
            self.tags = np.zeros(num_blocks, dtype=np.int64)
            return
        if create:
            with open(path, "xb") as f:
                f.truncate(num_blocks * 8)
        elif os.path.getsize(path) != num_blocks * 8:
            raise ValueError(f"owner tags {path} do not match a pool of {num_blocks} blocks: "
                             "the destination and the decode pool disagree")
        self.tags = np.memmap(path, dtype=np.int64, mode="r+", shape=(num_blocks,))

    def mark_open(self, block_ids: list[int], transfer_id: str) -> None:
        self.tags[block_ids] = transfer_tag(transfer_id)

    def mark_closed(self, block_ids: list[int], transfer_id: str) -> None:
        self.tags[block_ids] = -transfer_tag(transfer_id)

    def state(self, block_ids: list[int], transfer_id: str) -> str:
        return tag_state(self.tags[block_ids], transfer_id)

    def close(self) -> None:
        self.tags = None
        if self._owner and self.path is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


class ShmWriter:
    """Sender side: maps each decode rank's pool once and copies block runs into it."""

    def __init__(self, spec: KVSpec, *, open_wait_s: float = 2.0):
        self.spec = spec
        self.open_wait_s = open_wait_s
        self._pools: dict[str, tuple[KVPool, OwnerTags]] = {}

    def _attach(self, target: RankTarget, d_tp: int) -> tuple[KVPool, OwnerTags]:
        key = target.shm_path
        if key not in self._pools:
            for path in [p for p in self._pools if not os.path.exists(p)]:
                # That decode worker is gone: unmap its pool so its memory is returned.
                pool, tags = self._pools.pop(path)
                pool.close()
                tags.close()
            if not os.path.exists(target.shm_path) or not os.path.exists(target.owners_path):
                raise TransferError(f"decode pool {target.shm_path} is not visible from this process: "
                                    "shm needs both workers on one host sharing /dev/shm; use zmq")
            try:
                pool = KVPool.attach(self.spec, target.num_blocks, target.shm_path, tp_size=d_tp)
                tags = OwnerTags(target.num_blocks, target.owners_path, create=False)
            except ValueError as exc:
                raise TransferError(str(exc)) from None
            self._pools[key] = (pool, tags)
        return self._pools[key]

    def write_layers(self, src: KVPool, layers: range, runs: list[tuple[int, int, int]],
                     head_slice: HeadSlice, target: RankTarget, d_tp: int, transfer_id: str,
                     cancelled) -> int:
        """Copy ``layers`` of the runs into ``target``; returns bytes written. The pool is
        layer-major, so one strided copy moves a run (or one gather/scatter a group of short
        runs) through every layer of the range at once.

        Waits up to ``open_wait_s`` for the blocks to be opened for this transfer. Raises
        TransferError if the transfer was closed on the decode rank, the blocks do not open in
        time, or ``cancelled()`` turns true while waiting; nothing is written then.
        """
        dst, tags = self._attach(target, d_tp)
        dst_ids = [d + i for _, d, n in runs for i in range(n)]
        deadline = time.monotonic() + self.open_wait_s
        while (state := tags.state(dst_ids, transfer_id)) != "open":
            if state == "closed" or time.monotonic() > deadline or cancelled():
                raise TransferError(f"the decode blocks are no longer reserved for this transfer "
                                    f"({state}); dropping its data")
            time.sleep(0.0002)
        (ss, se), (ds, de) = head_slice.src, head_slice.dst
        block_bytes = slice_block_bytes(self.spec, head_slice.src)
        lo, hi = layers.start, layers.stop
        src_kv, dst_kv = src.kv[lo:hi], dst.kv[lo:hi]  # [layers, 2, num_blocks, block_size, heads, head_dim]
        for group in group_runs(runs, max(1, SOLO_RUN_BYTES // block_bytes)):
            if len(group) == 1:
                s, d, n = group[0]
                dst_kv[:, :, d:d + n, :, ds:de].copy_(src_kv[:, :, s:s + n, :, ss:se])
            else:
                src_ids = [s + i for s, _, n in group for i in range(n)]
                group_dst = [d + i for _, d, n in group for i in range(n)]
                scatter_blocks(dst_kv, group_dst, (ds, de), gather_blocks(src_kv, src_ids, (ss, se)))
        return 2 * len(layers) * len(dst_ids) * block_bytes

    def close(self) -> None:
        for pool, tags in self._pools.values():
            pool.close()
            tags.close()
        self._pools.clear()


def shm_pool_files(pool: KVPool) -> tuple[str, str]:
    """The pool file and the owner-tag file path of a decode rank's shared-memory pool."""
    if pool.backend != "shm" or pool.shm_path is None:
        raise ValueError("the shm transport needs a decode pool created with backend='shm'")
    return pool.shm_path, pool.shm_path + ".owners"
