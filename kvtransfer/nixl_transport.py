"""nixl transport: the prefill rank WRITEs block runs straight into the decode rank's pool.

Both ends run a NIXL agent with the UCX backend and register their whole pool once (DRAM for a
CPU pool, VRAM for a CUDA pool). The prefill side fetches a decode rank's agent metadata once,
through a ``md_req`` handshake on the rank's ZMQ endpoint, and caches it by agent name. Every
WRITE carries a ``nx`` notification, delivered after its data; the final ``done`` (a standalone
notification) says how many WRITEs to expect, so the decode rank knows when all have landed.
Outstanding WRITEs are bounded by a window. Before its first WRITE of a transfer into a rank,
the prefill side READs that rank's owner tags (shm_transport.py) for the destination blocks and
drops the transfer if they are not open for it, so a stale transfer id writes nothing. nixl is
imported lazily: without it the transport is simply not advertised.
"""
from __future__ import annotations

import time
import uuid
from typing import Callable

import numpy as np

from kvtransfer.plan import HeadSlice
from kvtransfer.pool import KVPool
from kvtransfer.shm_transport import tag_state
from kvtransfer.transport import RankTarget, TransferError
from kvtransfer.wire import pack, unpack

TAG_READ_CHUNK = 4096  # owner tags read per NIXL READ


def nixl_available() -> bool:
    """Whether the nixl package (with its UCX plugin) can be imported here."""
    try:
        import nixl._api  # noqa: F401
    except Exception:
        return False
    return True


class NixlPoolAgent:
    """A NIXL agent with one KV pool registered, and an int64 array of owner tags (decode side)
    or of scratch space for reading them (prefill side)."""

    def __init__(self, pool: KVPool, role: str, tags: np.ndarray):
        try:
            from nixl._api import nixl_agent, nixl_agent_config
        except Exception as exc:
            raise TransferError(f"the nixl transport needs the nixl package ({exc}); "
                                "install pdserve[nixl] or use --kv-transport zmq") from None
        self.name = f"pdserve-{role}-{uuid.uuid4().hex[:12]}"
        # No progress thread: NIXL's spins on a core even when idle. The sender's state checks
        # and the receiver's notification drain make progress instead.
        self.agent = nixl_agent(self.name, nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))
        if "UCX" not in self.agent.backends:
            raise TransferError("NIXL has no UCX backend here; use --kv-transport zmq")
        self.pool = pool
        self.mem_type = "VRAM" if pool.kv.is_cuda else "DRAM"
        self.dev = pool.kv.get_device() if pool.kv.is_cuda else 0
        self.base = pool.kv.data_ptr()
        self.tags = tags
        self._registrations = [self.agent.register_memory(pool.kv), self.agent.register_memory(
            [(tags.ctypes.data, tags.nbytes, 0, "")], "DRAM")]

    def metadata_reply(self) -> bytes:
        return pack("md", agent=self.name, md=self.agent.get_agent_metadata(), base=self.base,
                    dev=self.dev, tags=self.tags.ctypes.data)

    def notifications(self) -> list[bytes]:
        return [m for msgs in self.agent.get_new_notifs().values() for m in msgs]

    def close(self) -> None:
        for registration in self._registrations:
            self.agent.deregister_memory(registration)
        self._registrations = []


def region_descs(shape: tuple, itemsize: int, base: int, dev: int, layer: int, kv: int,
                 start: int, num_blocks: int, heads: tuple[int, int], per_row: bool) -> list[tuple]:
    """``(address, length, device)`` of blocks ``[start, start + num_blocks)`` of one layer's K or
    V in a pool of ``shape``: one region, or one per token row when only some heads move."""
    _, _, n_blocks, block_size, n_heads, head_dim = shape
    row = head_dim * itemsize
    offset = (((layer * 2 + kv) * n_blocks + start) * block_size) * n_heads * row
    if not per_row:
        return [(base + offset, num_blocks * block_size * n_heads * row, dev)]
    h0, h1 = heads
    return [(base + offset + (t * n_heads + h0) * row, (h1 - h0) * row, dev)
            for t in range(num_blocks * block_size)]


class NixlWriter:
    """Sender side: posts WRITEs into decode pools and tracks them per transfer."""

    def __init__(self, pool: KVPool, *, max_outstanding: int):
        self.agent = NixlPoolAgent(pool, "prefill", np.zeros(TAG_READ_CHUNK, dtype=np.int64))
        self.pool = pool
        self.max_outstanding = max_outstanding
        self._remotes: dict[str, tuple[int, int, int]] = {}  # agent -> (pool base, device, tags base)
        self._pending: dict[str, list] = {}  # transfer id -> handles in flight

    def connect(self, target: RankTarget, link, timeout_s: float) -> None:
        """Load a decode rank's agent metadata, once per agent name."""
        if target.nixl_agent in self._remotes:
            return
        reply = unpack(link.request(pack("md_req"), timeout_s), frozenset({"md"}))
        name = self.agent.agent.add_remote_agent(reply["md"])
        name = name.decode() if isinstance(name, bytes) else name
        if name != target.nixl_agent:
            raise TransferError(f"{target.endpoint} runs NIXL agent {name}, the destination names "
                                f"{target.nixl_agent}: the decode worker restarted; re-reserve")
        self._remotes[name] = (reply["base"], reply["dev"], reply["tags"])

    def check_open(self, target: RankTarget, block_ids: list[int], transfer_id: str,
                   wait_s: float, cancelled: Callable[[], bool]) -> None:
        """Wait until the decode rank opened ``block_ids`` for this transfer (up to ``wait_s``).
        Raises TransferError if they belong to something else or never open."""
        deadline = time.monotonic() + wait_s
        while (state := tag_state(self._read_tags(target, block_ids), transfer_id)) != "open":
            if state == "closed" or time.monotonic() > deadline or cancelled():
                raise TransferError(f"the decode blocks are no longer reserved for this transfer "
                                    f"({state}); dropping its data")
            time.sleep(0.0002)

    def _read_tags(self, target: RankTarget, block_ids: list[int]) -> np.ndarray:
        agent, scratch = self.agent.agent, self.agent.tags
        tags_base = self._remotes[target.nixl_agent][2]
        values = np.empty(len(block_ids), dtype=np.int64)
        for i in range(0, len(block_ids), TAG_READ_CHUNK):
            chunk = block_ids[i:i + TAG_READ_CHUNK]
            local = [(scratch.ctypes.data + 8 * j, 8, 0) for j in range(len(chunk))]
            remote = [(tags_base + 8 * b, 8, 0) for b in chunk]
            handle = agent.initialize_xfer("READ", agent.get_xfer_descs(local, "DRAM"),
                                           agent.get_xfer_descs(remote, "DRAM"), target.nixl_agent)
            state = agent.transfer(handle)
            while state == "PROC":
                state = agent.check_xfer_state(handle)
            agent.release_xfer_handle(handle)
            if state != "DONE":
                raise TransferError(f"reading owner tags from {target.nixl_agent} failed")
            values[i:i + len(chunk)] = scratch[:len(chunk)]
        return values

    def write_layers(self, layers: range, runs: list[tuple[int, int, int]], head_slice: HeadSlice,
                     target: RankTarget, d_tp: int, transfer_id: str, p_rank: int) -> int:
        """Post one WRITE (every layer of the range, K and V of every run) with its ``nx``
        notification; returns bytes."""
        while sum(map(len, self._pending.values())) >= self.max_outstanding:
            self.progress()
        spec = self.pool.spec
        remote_base, remote_dev, _ = self._remotes[target.nixl_agent]
        remote_shape = (spec.num_layers, 2, target.num_blocks, spec.block_size,
                        spec.num_local_kv_heads(d_tp), spec.head_dim)
        per_row = (head_slice.src != (0, self.pool.shape[4])
                   or head_slice.dst != (0, remote_shape[4]))
        local, remote = [], []
        for layer in layers:
            for kv in (0, 1):
                for s, d, n in runs:
                    local += region_descs(self.pool.shape, spec.itemsize, self.agent.base, self.agent.dev,
                                          layer, kv, s, n, head_slice.src, per_row)
                    remote += region_descs(remote_shape, spec.itemsize, remote_base, remote_dev,
                                           layer, kv, d, n, head_slice.dst, per_row)
        agent = self.agent.agent
        mem = self.agent.mem_type
        handle = agent.initialize_xfer("WRITE", agent.get_xfer_descs(local, mem),
                                       agent.get_xfer_descs(remote, mem), target.nixl_agent,
                                       pack("nx", x=transfer_id, p=p_rank))
        if agent.transfer(handle) == "ERR":
            raise TransferError(f"NIXL refused a WRITE to {target.nixl_agent}")
        self._pending.setdefault(transfer_id, []).append(handle)
        return sum(length for _, length, _ in local)

    def progress(self) -> dict[str, str]:
        """Retire finished WRITEs; returns the transfers whose WRITE failed, with why."""
        agent = self.agent.agent
        failed = {}
        for transfer_id, handles in list(self._pending.items()):
            still = []
            for handle in handles:
                try:
                    state, why = agent.check_xfer_state(handle), "a NIXL WRITE failed"
                except Exception as exc:  # e.g. NIXL_ERR_REMOTE_DISCONNECT: the decode peer died
                    state, why = "ERR", f"a NIXL WRITE failed: {exc}"
                if state == "PROC":
                    still.append(handle)
                    continue
                if state == "ERR":
                    failed[transfer_id] = why
                try:
                    agent.release_xfer_handle(handle)
                except Exception:  # a handle whose peer vanished may refuse release; drop it
                    pass
            if still:
                self._pending[transfer_id] = still
            else:
                del self._pending[transfer_id]
        return failed

    def abandon(self, transfer_id: str) -> None:
        """Cancel a transfer's WRITEs that never completed (the peer is gone)."""
        for handle in self._pending.pop(transfer_id, []):
            try:
                self.agent.agent.release_xfer_handle(handle)
            except Exception:  # NIXL refuses to cancel some in-flight requests; drop them anyway
                pass

    def has_pending(self) -> bool:
        return bool(self._pending)

    def is_settled(self, transfer_id: str) -> bool:
        return transfer_id not in self._pending

    def notify(self, target: RankTarget, message: bytes) -> None:
        self.agent.agent.send_notif(target.nixl_agent, message)

    def close(self) -> None:
        for transfer_id in list(self._pending):
            self.abandon(transfer_id)
        for name in self._remotes:
            self.agent.agent.remove_remote_agent(name)
        self.agent.close()
