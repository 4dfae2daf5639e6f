"""Prefill side: one ``KVSender`` per prefill rank, one ``KVTransfer`` (transfer.py) per request.

The model thread only enqueues (``send_layer`` from ``on_layer_done``, ``finish``, ``abort``); the
sender's thread does every copy, send and WRITE, in order, so backpressure from a slow decode
rank stalls that thread and never the model. ``KVTransfer.future`` resolves once the sender no
longer reads the request's source blocks: free them only then.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import zmq

from kvtransfer.negotiate import capabilities
from kvtransfer.nixl_transport import NixlWriter, nixl_available
from kvtransfer.plan import HeadSlice, block_runs, head_slices, slice_block_bytes
from kvtransfer.pool import KVPool
from kvtransfer.shm_transport import ShmWriter
from kvtransfer.spec import num_blocks_for
from kvtransfer.transfer import KVTransfer
from kvtransfer.transport import Destination, RankTarget, TransferError
from kvtransfer.wire import pack
from kvtransfer.zmq_transport import ZmqLink, layer_messages

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SenderConfig:
    """Knobs of one prefill rank's sender."""

    max_message_bytes: int = 8 << 20  # zmq: bytes of K/V in one message
    sndhwm: int = 4  # zmq: messages queued per decode rank before the sender waits
    socket_buffer_bytes: int = 4 << 20  # zmq: kernel send buffer (capped by net.core.wmem_max)
    nixl_window: int = 32  # nixl: WRITEs in flight before the sender waits
    transfer_timeout_s: float = 30.0  # give up on a transfer (capped by the destination's ttl_s)
    handshake_timeout_s: float = 5.0
    open_wait_s: float = 2.0  # shm: how long to wait for blocks to be opened on the decode rank

    def __post_init__(self) -> None:
        for name in ("max_message_bytes", "sndhwm", "socket_buffer_bytes", "nixl_window"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"SenderConfig.{name} must be a positive integer")
        for name in ("transfer_timeout_s", "handshake_timeout_s", "open_wait_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SenderConfig.{name} must be positive seconds")


@dataclass
class _Flight:
    """Sender-thread state of one transfer."""

    transfer: KVTransfer
    slices: list[HeadSlice]
    deadline: float
    trackers: list = field(default_factory=list)
    nixl_writes: dict[int, int] = field(default_factory=dict)  # decode rank -> WRITEs posted
    ending: str | None = None  # "finish", or why it failed; notices go out once writes settle
    first: tuple[int, float] | None = None


class KVSender:
    """Sends KV from one prefill rank's pool; thread-safe to call from the model thread."""

    def __init__(self, pool: KVPool, *, sender_id: str, rank: int = 0, tp_size: int = 1,
                 config: SenderConfig | None = None,
                 after_layers: Callable[[str], None] | None = None):
        """``after_layers(transfer_id)`` runs on the sender thread after each batch of layers
        went out (a test hook: it may block the thread to hold a transfer in flight)."""
        if not 0 <= rank < tp_size:
            raise ValueError(f"rank {rank} is outside a TP group of {tp_size}")
        if not sender_id:
            raise ValueError("sender_id must name this prefill worker (the router's worker id)")
        self.pool = pool
        self.sender_id = sender_id
        self.rank = rank
        self.tp_size = tp_size
        self.config = config or SenderConfig()
        self._after_layers = after_layers
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._active: set[str] = set()
        self._lock = threading.Lock()
        self._stats = {"bytes_sent": 0, "transfers_done": 0, "transfers_failed": 0}
        # Owned by the sender thread:
        self._ctx = zmq.Context.instance()
        self._links: dict[str, ZmqLink] = {}
        self._flights: dict[str, _Flight] = {}
        self._stopping = False
        self._shm = ShmWriter(pool.spec, open_wait_s=self.config.open_wait_s)
        self._nixl: NixlWriter | None = None
        self._thread = threading.Thread(target=self._run, name=f"kv-sender-{rank}", daemon=True)
        self._thread.start()

    # -- model-thread API ----------------------------------------------------------------
    def start(self, dest: dict, block_ids: Sequence[int], num_tokens: int | None = None) -> KVTransfer:
        """Begin sending one request's KV from ``block_ids`` (its block table in this rank's
        pool) into ``dest``: block i goes to the destination's block i. The destination may
        hold more blocks (reserved for the tokens decode will add). ``num_tokens`` defaults to
        every token of ``block_ids``.

        Raises ValueError if the destination is malformed or does not fit the blocks.
        """
        parsed = Destination.parse(dest)
        block_ids = [int(b) for b in block_ids]
        if not block_ids or len(block_ids) > len(parsed.ranks[0].block_ids):
            raise ValueError(f"transfer {parsed.transfer_id}: {len(block_ids)} source blocks for a "
                             f"destination of {len(parsed.ranks[0].block_ids)}")
        if any(not 0 <= b < self.pool.num_blocks for b in block_ids):
            raise ValueError(f"transfer {parsed.transfer_id}: source block ids must be below "
                             f"{self.pool.num_blocks}")
        bs = self.pool.spec.block_size
        num_tokens = len(block_ids) * bs if num_tokens is None else num_tokens
        if num_blocks_for(num_tokens, bs) != len(block_ids):
            raise ValueError(f"{num_tokens} tokens do not fill exactly {len(block_ids)} blocks of {bs}")
        if parsed.transport == "nixl" and not nixl_available():
            raise ValueError("the destination asks for nixl, which is not installed here; "
                             "negotiate the transport again")
        head_slices(self.pool.spec.num_kv_heads, self.tp_size, self.rank, len(parsed.ranks))  # checks TP
        with self._lock:
            if parsed.transfer_id in self._active:
                raise ValueError(f"transfer {parsed.transfer_id} is already being sent")
            self._active.add(parsed.transfer_id)
        transfer = KVTransfer(self, parsed, block_ids, num_tokens)
        self._put(("start", transfer))
        return transfer

    def reject(self, dest: dict, reason: str = "aborted before prefill started") -> None:
        """Tell every decode rank that no rank of this prefill group will write into ``dest``
        (for a request aborted before its transfer started); its blocks are released at once."""
        self._put(("reject", Destination.parse(dest), reason))

    def capabilities(self) -> dict:
        """What this rank advertises for transport negotiation (``negotiate.choose_transport``)."""
        return capabilities(["zmq", "shm"] + (["nixl"] if nixl_available() else []))

    def stats(self) -> dict:
        with self._lock:
            return {**self._stats, "transfers_active": len(self._active)}

    def is_alive(self) -> bool:
        """Whether the sender thread still runs (it stops only on ``close``)."""
        return self._thread.is_alive()

    def close(self) -> None:
        """Abort what is still in flight, stop the thread, release sockets and mappings."""
        if self._thread.is_alive():
            self._put(("stop",))
            self._thread.join()

    def _put(self, job: tuple) -> None:
        if not self._thread.is_alive():
            raise RuntimeError("this KVSender is closed")
        self._jobs.put(job)

    # -- sender thread -------------------------------------------------------------------
    def _run(self) -> None:
        while not (self._stopping and not self._flights):
            busy = any(f.ending for f in self._flights.values()) or (
                self._nixl is not None and self._nixl.has_pending())
            try:
                job = self._jobs.get(timeout=0.0005 if busy else 0.05)
            except queue.Empty:
                job = None
            if job is not None and job[0] == "stop":
                self._stopping = True
                for flight in list(self._flights.values()):
                    self._fail(flight, "the prefill worker is shutting down")
                for endpoint in list(self._links):
                    self._reset_link(endpoint, "the prefill worker is shutting down")
            elif job is not None:
                self._handle(job)
            self._advance(time.monotonic())
        for link in self._links.values():
            link.close()
        self._shm.close()
        if self._nixl is not None:
            self._nixl.close()

    def _handle(self, job: tuple) -> None:
        kind = job[0]
        if kind == "reject":
            _, dest, reason = job
            for target in dest.ranks:
                self._notify(target, pack("abort", x=dest.transfer_id, s=self.sender_id, p=self.rank,
                                          pt=self.tp_size, reason=reason, every=True))
            return
        transfer = job[1]
        if kind == "start":
            timeout = min(self.config.transfer_timeout_s, transfer.dest.ttl_s)
            slices = head_slices(self.pool.spec.num_kv_heads, self.tp_size, self.rank, len(transfer.dest.ranks))
            self._flights[transfer.transfer_id] = _Flight(transfer, slices, time.monotonic() + timeout)
        flight = self._flights.get(transfer.transfer_id)
        if flight is None or flight.ending:
            return
        try:
            if kind == "start":
                self._begin(flight)
            elif kind == "layers" and not transfer.cancelled:
                self._send_layers(flight, *job[2:])
                if self._after_layers is not None:
                    self._after_layers(transfer.transfer_id)
            elif kind == "finish" and not transfer.cancelled:
                flight.first = (job[2], job[3])
                flight.ending = "finish"
            elif kind == "abort":
                flight.ending = job[2]
        except TransferError as exc:
            self._fail(flight, str(exc))
        except Exception as exc:  # a bug must fail one transfer, not the sender thread
            logger.exception("transfer %s failed", transfer.transfer_id)
            self._fail(flight, f"internal error: {exc!r}")

    def _begin(self, flight: _Flight) -> None:
        transfer = flight.transfer
        dest = transfer.dest
        if self._stopping:
            raise TransferError("the prefill worker is shutting down")
        if dest.transport == "nixl":
            if self._nixl is None:
                self._nixl = NixlWriter(self.pool, max_outstanding=self.config.nixl_window)
            for s in flight.slices:
                target = dest.ranks[s.d_rank]
                self._nixl.connect(target, self._link(target.endpoint), self.config.handshake_timeout_s)
        # Name the writer before the first write: shm and nixl data never pass the rank, which
        # must still know whose death releases the blocks.
        start = pack("start", x=transfer.transfer_id, s=self.sender_id, p=self.rank, pt=self.tp_size)
        for s in flight.slices:
            if not self._notify(dest.ranks[s.d_rank], start):
                raise TransferError(f"decode rank {s.d_rank} is unreachable")

    def _send_layers(self, flight: _Flight, layers: range, first: int, last: int, ready=None) -> None:
        if ready is not None:
            ready.synchronize()   # the layer's K/V writes on the GPU are done: the blocks are final
        transfer = flight.transfer
        dest = transfer.dest
        src_ids = transfer.block_ids[first:last]
        for s in flight.slices:
            target = dest.ranks[s.d_rank]
            dst_ids = list(target.block_ids[first:last])
            if dest.transport == "zmq":
                self._send_frames(flight, layers, s, target, src_ids, dst_ids)
            elif dest.transport == "shm":
                self._count(self._shm.write_layers(self.pool, layers, block_runs(src_ids, dst_ids), s, target,
                                                   len(dest.ranks), transfer.transfer_id,
                                                   cancelled=lambda: transfer.cancelled))
            else:
                if s.d_rank not in flight.nixl_writes:
                    self._nixl.check_open(target, list(target.block_ids), transfer.transfer_id,
                                          self.config.open_wait_s, lambda: transfer.cancelled)
                self._count(self._nixl.write_layers(layers, block_runs(src_ids, dst_ids), s, target,
                                                    len(dest.ranks), transfer.transfer_id, self.rank))
                flight.nixl_writes[s.d_rank] = flight.nixl_writes.get(s.d_rank, 0) + 1

    def _send_frames(self, flight: _Flight, layers: range, s: HeadSlice, target: RankTarget,
                     src_ids: list[int], dst_ids: list[int]) -> None:
        transfer = flight.transfer
        max_bytes = self.config.max_message_bytes
        runs = block_runs(src_ids, dst_ids, max(1, max_bytes // (2 * slice_block_bytes(self.pool.spec, s.src))))
        source = {"x": transfer.transfer_id, "s": self.sender_id, "p": self.rank, "pt": self.tp_size}
        link = self._link(target.endpoint)
        for layer in layers:
            for parts in layer_messages(self.pool, layer, runs, s, source, max_bytes):
                try:
                    tracker = link.send(parts, deadline=flight.deadline, cancelled=lambda: transfer.cancelled)
                except TransferError as exc:
                    if not transfer.cancelled:
                        self._reset_link(target.endpoint, str(exc))
                    raise
                if tracker is not None:
                    flight.trackers.append(tracker)
                self._count(sum(p.nbytes for p in parts[1:]))

    def _fail(self, flight: _Flight, reason: str) -> None:
        if flight.ending is None or flight.ending == "finish":
            logger.warning("KV transfer %s failed: %s", flight.transfer.transfer_id, reason)
            flight.ending = reason
        flight.transfer.cancelled = True

    def _advance(self, now: float) -> None:
        """Fail flights past their deadline; retire settled ones (notices out, future resolved)."""
        if self._nixl is not None:
            for tid, why in self._nixl.progress().items():
                if tid in self._flights:
                    self._fail(self._flights[tid], why)
        for tid, flight in list(self._flights.items()):
            if now > flight.deadline:
                if flight.ending is None:
                    self._fail(flight, "the transfer deadline passed before finish()")
                if flight.trackers:  # the decode rank stopped reading: drop what its link queues
                    for s in flight.slices:
                        self._reset_link(flight.transfer.dest.ranks[s.d_rank].endpoint,
                                         "the decode rank stopped reading")
                if self._nixl is not None:
                    self._nixl.abandon(tid)
            if flight.ending is None:
                continue
            flight.trackers = [t for t in flight.trackers if not t.done]
            if flight.trackers or (self._nixl is not None and not self._nixl.is_settled(tid)):
                continue
            del self._flights[tid]
            self._conclude(flight)

    def _conclude(self, flight: _Flight) -> None:
        transfer = flight.transfer
        dest, ok = transfer.dest, flight.ending == "finish"
        for s in flight.slices:
            fields = dict(x=transfer.transfer_id, s=self.sender_id, p=self.rank, pt=self.tp_size)
            if ok:
                first = flight.first if self.rank == 0 and s.d_rank == 0 else (None, None)
                message = pack("done", **fields, n=flight.nixl_writes.get(s.d_rank, 0), tok=first[0], lp=first[1])
            else:
                message = pack("abort", **fields, reason=flight.ending)
            if not self._notify(dest.ranks[s.d_rank], message) and ok:
                ok, flight.ending = False, "the completion notice could not be delivered"
        with self._lock:
            self._active.discard(transfer.transfer_id)
            self._stats["transfers_done" if ok else "transfers_failed"] += 1
        if ok:
            transfer.future.set_result(None)
        else:
            transfer.future.set_exception(TransferError(f"transfer {transfer.transfer_id}: {flight.ending}"))

    def _notify(self, target: RankTarget, message: bytes) -> bool:
        timeout = 0.2 if self._stopping else self.config.handshake_timeout_s
        try:
            self._link(target.endpoint).send([message], deadline=time.monotonic() + timeout)
            return True
        except TransferError as exc:
            self._reset_link(target.endpoint, str(exc))
            return False

    def _reset_link(self, endpoint: str, reason: str) -> None:
        """Close a link, dropping what it queues; every flight that used it fails, since a
        ``done`` must never overtake data that was dropped."""
        link = self._links.pop(endpoint, None)
        if link is None:
            return
        link.close()
        for flight in self._flights.values():
            if any(flight.transfer.dest.ranks[s.d_rank].endpoint == endpoint for s in flight.slices):
                self._fail(flight, f"link to {endpoint} reset: {reason}")

    def _link(self, endpoint: str) -> ZmqLink:
        if endpoint not in self._links:
            self._links[endpoint] = ZmqLink(self._ctx, endpoint, sndhwm=self.config.sndhwm,
                                            sndbuf=self.config.socket_buffer_bytes)
        return self._links[endpoint]

    def _count(self, nbytes: int) -> None:
        with self._lock:
            self._stats["bytes_sent"] += nbytes
