"""Test harness: KV senders and receivers, each in its own process.

A ``Node`` starts a process that builds a ``DecodeNode`` or ``PrefillNode`` and then serves
method calls sent over a pipe. Processes come from a forkserver that has imported this module
(and so torch, zmq and nixl) once, which saves seconds per process on a small machine; each is
still a separate process with its own memory, sockets and NIXL agent. Pools hold deterministic
random KV so the test process can compute every expected value itself; pool contents come back
as raw bits (bit-exact checks).
"""
from __future__ import annotations

import asyncio
import glob
import hashlib
import multiprocessing as mp
import os
import signal
import traceback

import numpy as np
import torch

from kvtransfer.allocator import BlockAllocator
from kvtransfer.coordinator import KVCoordinator
from kvtransfer.pool import TORCH_DTYPES, KVPool
from kvtransfer.receiver import KVReceiver, ReceiverConfig
from kvtransfer.sender import KVSender, SenderConfig
from kvtransfer.spec import KVSpec, kv_head_range
from kvtransfer.transport import TransferDone

SHM_PREFIX = "/dev/shm/pdserve-kvtest-"


def global_kv(spec: KVSpec, num_blocks: int, seed: int) -> torch.Tensor:
    """Random KV of a whole (unsharded) pool: [layers, 2, blocks, block_size, kv_heads, head_dim]."""
    g = torch.Generator().manual_seed(seed)
    shape = (spec.num_layers, 2, num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
    return torch.randn(shape, generator=g).to(TORCH_DTYPES[spec.dtype])


def shard(kv: torch.Tensor, spec: KVSpec, tp_size: int, rank: int) -> torch.Tensor:
    start, stop = kv_head_range(spec.num_kv_heads, tp_size, rank)
    return kv[:, :, :, :, start:stop]


def bits(t: torch.Tensor) -> np.ndarray:
    """The raw bits of a tensor, for bit-exact comparison."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()]).numpy().copy()


class DecodeNode:
    """One decode rank: pool (random-filled), receiver, and on rank 0 the coordinator."""

    def __init__(self, *, spec: dict, num_blocks: int, endpoint: str, ctrl: str, rank: int = 0,
                 tp_size: int = 1, backend: str = "heap", nixl: bool = False, seed: int = 1,
                 receiver_config: dict | None = None, shm_path: str | None = None):
        self.spec = KVSpec(**spec)
        self.pool = KVPool(self.spec, num_blocks, tp_size=tp_size, backend=backend, shm_path=shm_path)
        self.pool.kv.copy_(shard(global_kv(self.spec, num_blocks, seed), self.spec, tp_size, rank))
        self.coord = None
        if rank == 0:
            self.allocator = BlockAllocator(num_blocks, self.spec.block_size)
            self.coord = KVCoordinator(self.allocator, endpoint=ctrl, tp_size=tp_size)
        self.recv = KVReceiver(self.pool, endpoint=endpoint, coordinator=ctrl, rank=rank, tp_size=tp_size,
                               nixl=nixl, config=ReceiverConfig(**(receiver_config or {})))

    def wait_ready(self, timeout_s: float = 30.0) -> dict:
        self.coord.wait_ready(timeout_s)
        return self.coord.describe()

    def order_free_list(self, first: list[int]) -> None:
        """Make the allocator hand out ``first`` next, in that order, then the other free blocks."""
        free = self.allocator.free_block_ids()
        self.allocator.allocate(len(free))
        order = first + [b for b in free if b not in first]
        self.allocator.free(list(reversed(order)))

    def reserve(self, transfer_id: str, num_tokens: int, **kwargs) -> dict | None:
        return self.coord.reserve(transfer_id, num_tokens, **kwargs)

    def set_start_timeout(self, seconds: float | None) -> None:
        """How long reservations wait for their writer to start (None: their own timeout)."""
        self.coord.table.start_timeout_s = seconds

    def events(self, timeout_s: float = 10.0, use_async: bool = False) -> list[tuple]:
        if use_async:
            events = asyncio.run(self.coord.wait_events(timeout_s))
        else:
            events = self.coord.poll(timeout_s)
        return [("done", e.transfer_id, e.block_ids, e.first_token_id, e.first_logprob)
                if isinstance(e, TransferDone) else ("failed", e.transfer_id, e.reason) for e in events]

    def settle(self, timeout_s: float = 10.0) -> dict:
        """Handle reports until no reservation is quarantined (or the timeout); return stats."""
        for _ in range(int(timeout_s / 0.02)):
            self.coord.poll(0.02)
            if self.coord.stats()["num_quarantined"] == 0:
                break
        return self.stats()

    def abort(self, transfer_id: str, published: bool = True) -> bool:
        return self.coord.abort(transfer_id, published=published)

    def peer_dead(self, peer_id: str) -> None:
        self.coord.peer_dead(peer_id)

    def free(self, block_ids: list[int]) -> None:
        self.allocator.free(block_ids)

    def free_block_ids(self) -> list[int]:
        return self.allocator.free_block_ids()

    def stats(self) -> dict:
        return {"coord": self.coord.stats() if self.coord else None, "recv": self.recv.stats()}

    def pool_bits(self) -> np.ndarray:
        return bits(self.pool.kv)

    def blocks_digest(self, block_ids: list[int]) -> str:
        return hashlib.sha256(bits(self.pool.kv[:, :, block_ids]).tobytes()).hexdigest()

    def peak_rss_kb(self) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))

    def reset_peak_rss(self) -> None:
        """Touch every pool page, then restart the peak-RSS count from the current RSS."""
        self.pool.kv.add_(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def describe_variant(self, backend: str, nixl: bool, endpoint: str, ctrl: str) -> dict:
        """The receiver entry a decode rank with another pool backend / nixl setting would publish."""
        pool = KVPool(self.spec, 4, backend=backend)
        recv = KVReceiver(pool, endpoint=endpoint, coordinator=ctrl, nixl=nixl)
        try:
            return recv.describe()
        finally:
            recv.close()
            pool.close()

    def close(self) -> None:
        self.recv.close()
        if self.coord:
            self.coord.close()
        self.pool.close()


class PrefillNode:
    """One prefill rank: its head shard of a seeded random pool, and a sender."""

    def __init__(self, *, spec: dict, num_blocks: int, sender_id: str, rank: int = 0, tp_size: int = 1,
                 seed: int = 2, sender_config: dict | None = None):
        self.spec = KVSpec(**spec)
        self.pool = KVPool(self.spec, num_blocks, tp_size=tp_size)
        self.pool.kv.copy_(shard(global_kv(self.spec, num_blocks, seed), self.spec, tp_size, rank))
        self.sender = KVSender(self.pool, sender_id=sender_id, rank=rank, tp_size=tp_size,
                               config=SenderConfig(**(sender_config or {})))
        self.transfers = {}

    def start(self, dest: dict, block_ids: list[int], num_tokens: int | None = None) -> None:
        self.transfers[dest["transfer_id"]] = self.sender.start(dest, block_ids, num_tokens)

    def send(self, transfer_id: str, layers: list[int] | None = None, start: int = 0, stop: int | None = None) -> None:
        """The listed layers one by one (as ``on_layer_done`` does), or all at once (``send_all``)."""
        transfer = self.transfers[transfer_id]
        if layers is None:
            transfer.send_all(start, stop)
        for layer in layers or []:
            transfer.send_layer(layer, start, stop)

    def finish(self, transfer_id: str, token: int = 7, logprob: float = -0.25) -> None:
        self.transfers[transfer_id].finish(token, logprob)

    def abort(self, transfer_id: str) -> None:
        self.transfers[transfer_id].abort("test abort")

    def wait(self, transfer_id: str, timeout_s: float = 20.0) -> str | None:
        """None if the transfer completed, else the error text."""
        try:
            self.transfers.pop(transfer_id).wait(timeout_s)
            return None
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"

    def reject(self, dest: dict) -> None:
        self.sender.reject(dest)

    def capabilities(self) -> dict:
        return self.sender.capabilities()

    def blocks_digest(self, block_ids: list[int]) -> str:
        return hashlib.sha256(bits(self.pool.kv[:, :, block_ids]).tobytes()).hexdigest()

    def stats(self) -> dict:
        return self.sender.stats()

    def close(self) -> None:
        self.sender.close()


def _serve(conn, cls, kwargs) -> None:
    torch.set_num_threads(1)
    try:
        node = cls(**kwargs)
        conn.send(("ok", None))
    except BaseException:
        conn.send(("err", traceback.format_exc()))
        return
    while True:
        method, args, kw = conn.recv()
        try:
            result = node.close() if method == "close" else getattr(node, method)(*args, **kw)
            conn.send(("ok", result))
        except BaseException:
            conn.send(("err", traceback.format_exc()))
        if method == "close":  # everything is released; skip the slow interpreter teardown
            conn.close()
            os._exit(0)


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


class Node:
    """The test's handle on one node process."""

    def __init__(self, cls, timeout_s: float = 120.0, **kwargs):
        ctx = _context()
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, cls, kwargs), daemon=True)
        self.proc.start()
        child.close()
        try:
            self._result(timeout_s, "start")
        except BaseException:
            self.kill()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def call(self, method: str, *args, rpc_timeout_s: float = 60.0, **kwargs):
        self._conn.send((method, args, kwargs))
        return self._result(rpc_timeout_s, method)

    def _result(self, timeout_s: float, what: str):
        if not self._conn.poll(timeout_s):
            raise TimeoutError(f"node {self.pid}: {what} did not answer within {timeout_s}s")
        status, value = self._conn.recv()
        if status == "err":
            raise RuntimeError(f"node {self.pid}: {what} failed:\n{value}")
        return value

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def kill(self) -> None:
        if self.proc.is_alive():
            os.kill(self.pid, signal.SIGCONT)
            self.proc.kill()
        self.proc.join(10)

    def close(self) -> None:
        try:
            if self.proc.is_alive():
                self.call("close", rpc_timeout_s=20)
        except Exception:
            pass
        finally:
            self.proc.join(5)
            self.kill()


def remove_shm_files(tag: str) -> None:
    for path in glob.glob(f"{SHM_PREFIX}{tag}*"):
        os.unlink(path)
