"""Decode side, one per TP rank: lands incoming KV and reports to the coordinator on rank 0.

The receiver's thread owns two sockets: a ROUTER at ``endpoint`` where prefill ranks send data
and notices (and ask for NIXL metadata), and a DEALER to the coordinator, which sends
``open``/``close``/``dead`` and receives ``hello``/``rank_started``/``rank_done``/``rank_failed``/
``released``.
With nixl enabled it also drains the NIXL agent's notifications.

Per transfer id the rank is in one of three places: open (accepting data), closing (closed, but
a direct writer may still be writing) or history (bounded memory of finished ids). Data for
ids in closing or history is dropped; a message for an id it has never seen is parked (one
message; the ROUTER is not read meanwhile, so senders feel backpressure) until the
coordinator's ``open`` or ``close`` explains it, or dropped after ``park_timeout_s``.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import zmq

from kvtransfer.negotiate import capabilities
from kvtransfer.nixl_transport import NixlPoolAgent
from kvtransfer.plan import sources_for
from kvtransfer.pool import KVPool
from kvtransfer.shm_transport import OwnerTags, shm_pool_files
from kvtransfer.wire import WireError, int_list, pack, unpack
from kvtransfer.zmq_transport import land_layer

logger = logging.getLogger(__name__)

SENDER_KINDS = frozenset({"start", "kv", "done", "abort", "md_req"})
CONTROL_KINDS = frozenset({"open", "close", "dead"})


@dataclass(frozen=True)
class ReceiverConfig:
    """Knobs of one decode rank's receiver."""

    rcvhwm: int = 4  # data messages queued per sender before it must wait
    socket_buffer_bytes: int = 4 << 20  # kernel receive buffer (capped by net.core.rmem_max)
    max_frame_bytes: int = 256 << 20  # largest frame accepted (must exceed the sender's messages)
    park_timeout_s: float = 2.0  # how long a message of a not-yet-opened transfer waits
    nixl_poll_s: float = 0.001  # NIXL notifications drained this often while a nixl transfer is open
    history: int = 65536  # ended transfer ids remembered (their late data is dropped)

    def __post_init__(self) -> None:
        if min(self.rcvhwm, self.socket_buffer_bytes, self.max_frame_bytes, self.history) <= 0:
            raise ValueError("ReceiverConfig counts and sizes must be positive")
        if self.park_timeout_s <= 0 or self.nixl_poll_s <= 0:
            raise ValueError("ReceiverConfig timeouts must be positive seconds")


@dataclass
class _RankTransfer:
    block_ids: list[int]
    transport: str
    writer: str | None
    expected: frozenset[int] | None = None  # prefill ranks writing here, once one has spoken
    p_tp: int | None = None
    done: set[int] = field(default_factory=set)
    ended: set[int] = field(default_factory=set)  # sent done or abort: will not write again
    writes_expected: dict[int, int] = field(default_factory=dict)  # nixl: WRITEs per source
    writes_landed: dict[int, int] = field(default_factory=dict)
    first: tuple[int, float] | None = None
    writer_gone: bool = False  # dead, or the whole prefill group declined
    start_reported: bool = False  # the coordinator knows a writer began (its timeout runs)

    def __post_init__(self) -> None:
        self.blocks = frozenset(self.block_ids)


class KVReceiver:
    """Receives KV into one decode rank's pool: zmq always, shm when the pool was created with
    ``backend="shm"``, nixl when ``nixl=True`` (and the package is installed).

    ``endpoint`` is where prefill ranks connect (ipc:// or tcp://, ``*`` port allowed);
    ``coordinator`` is the control endpoint of the group's ``KVCoordinator`` on rank 0.
    Raises ValueError if the endpoint cannot be bound.
    """

    def __init__(self, pool: KVPool, *, endpoint: str, coordinator: str, rank: int = 0,
                 tp_size: int = 1, nixl: bool = False, config: ReceiverConfig | None = None):
        if not 0 <= rank < tp_size:
            raise ValueError(f"rank {rank} is outside a TP group of {tp_size}")
        self.pool, self.rank, self.tp_size = pool, rank, tp_size
        self.config = config or ReceiverConfig()
        self._tags = self._nixl = None
        transports = ["zmq"]
        if pool.backend == "shm":
            shm_path, owners_path = shm_pool_files(pool)
            self._tags = OwnerTags(pool.num_blocks, owners_path)
            transports.append("shm")
        if nixl:
            self._tags = self._tags or OwnerTags(pool.num_blocks)
            self._nixl = NixlPoolAgent(pool, f"decode{rank}", tags=self._tags.tags)
            transports.append("nixl")
        self._open: dict[str, _RankTransfer] = {}
        self._closing: dict[str, _RankTransfer] = {}
        self._history: OrderedDict[str, None] = OrderedDict()
        self._early_writes: OrderedDict[str, dict[int, int]] = OrderedDict()  # nixl notes before open
        self._parked: tuple | None = None  # (deadline, message, frames) of an unknown id
        self._stats = {"bytes_landed": 0, "stale_dropped": 0, "malformed_dropped": 0,
                       "parked": 0, "transfers_done": 0, "transfers_failed": 0}
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: Exception | None = None
        self._entry = {"rank": rank, "num_blocks": pool.num_blocks, **capabilities(transports)}
        if "shm" in transports:
            self._entry.update(shm_path=shm_path, owners_path=owners_path)
        if self._nixl is not None:
            self._entry["nixl_agent"] = self._nixl.name
        self._thread = threading.Thread(target=self._run, args=(endpoint, coordinator),
                                        name=f"kv-receiver-{rank}", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self.close()
            raise ValueError(f"KV receiver cannot bind {endpoint}: {self._error}")

    def describe(self) -> dict:
        """This rank's entry for destinations and registration (no block ids)."""
        return dict(self._entry)

    def stats(self) -> dict:
        """Bytes landed here (zmq), dropped stale/malformed messages, parked messages, and
        transfers done, failed, open and closing on this rank."""
        return {**self._stats, "open": len(self._open), "closing": len(self._closing)}

    def is_alive(self) -> bool:
        """Whether the receiver thread still runs (it stops only on ``close``)."""
        return self._thread.is_alive()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self._nixl is not None:
            self._nixl.close()
        if self._tags is not None:
            self._tags.close()

    # -- thread --------------------------------------------------------------------------
    def _run(self, endpoint: str, coordinator: str) -> None:
        ctx = zmq.Context.instance()
        self._data = ctx.socket(zmq.ROUTER)
        self._data.setsockopt(zmq.RCVHWM, self.config.rcvhwm)
        self._data.setsockopt(zmq.RCVBUF, self.config.socket_buffer_bytes)
        self._data.setsockopt(zmq.MAXMSGSIZE, self.config.max_frame_bytes)
        self._data.setsockopt(zmq.LINGER, 0)
        self._ctrl = ctx.socket(zmq.DEALER)
        self._ctrl.setsockopt(zmq.IDENTITY, f"r{self.rank}".encode())
        self._ctrl.setsockopt(zmq.SNDTIMEO, 50)
        self._ctrl.setsockopt(zmq.LINGER, 0)
        try:
            self._data.bind(endpoint)
            self._entry["endpoint"] = self._data.getsockopt_string(zmq.LAST_ENDPOINT)
            self._ctrl.connect(coordinator)
        except zmq.ZMQError as exc:
            self._error = exc
        self._ready.set()
        if self._error is None:
            self._report("hello", rank=self.rank, entry=self._entry)
            why = "its loop returned"
            try:
                self._loop()
            except Exception as exc:
                logger.exception("KV receiver rank %d stopped", self.rank)
                why = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            if not self._stop.is_set():
                # Ending unasked: on ranks > 0 nothing else would notice before the rank's process
                # exits (rank 0 reports it in the heartbeat's ``health`` and the worker exits).
                # A few tries only: the coordinator may be gone too.
                with contextlib.suppress(zmq.ZMQError):
                    self._report("rank_stopped", tries=20, rank=self.rank, reason=why)
        self._data.close()
        self._ctrl.close()

    def _loop(self) -> None:
        with_data, control_only = zmq.Poller(), zmq.Poller()
        for poller in (with_data, control_only):
            poller.register(self._ctrl, zmq.POLLIN)
        with_data.register(self._data, zmq.POLLIN)
        while not self._stop.is_set():
            timeout = 0.05
            if self._nixl is not None and any(t.transport == "nixl" for t in self._open.values()):
                timeout = self.config.nixl_poll_s  # NIXL notifications have no file descriptor
            if self._parked is not None:  # leave the ROUTER unread: senders feel backpressure
                timeout = min(timeout, max(0.0, self._parked[0] - time.monotonic()))
            ready = dict((control_only if self._parked else with_data).poll(max(1, round(timeout * 1000))))
            while self._ctrl in ready and self._ctrl.poll(0):
                self._on_control(self._ctrl.recv())
            if self._nixl is not None:
                for note in self._nixl.notifications():
                    self._on_write_landed(note)
            if self._parked is not None:
                self._retry_parked()
            elif self._data in ready:
                for _ in range(64):  # a bounded burst, then look at control again
                    if self._parked is not None or not self._data.poll(0):
                        break
                    identity, *parts = self._data.recv_multipart(copy=False)
                    self._on_sender(identity.bytes, parts)

    def _report(self, kind: str, tries: int | None = None, **fields) -> None:
        """Send to the coordinator; while it is slow, wait (backpressure) unless closing or
        ``tries`` sends failed."""
        message = pack(kind, **fields)
        while not self._stop.is_set() and tries != 0:
            try:
                self._ctrl.send(message)
                return
            except zmq.Again:
                tries = None if tries is None else tries - 1

    # -- coordinator messages ------------------------------------------------------------
    def _on_control(self, data: bytes) -> None:
        try:
            msg = unpack(data, CONTROL_KINDS)
            if msg["t"] == "open":
                self._on_open(msg["x"], int_list(msg["blocks"], "blocks"), msg["transport"], msg.get("writer"))
            elif msg["t"] == "close":
                self._on_close(msg["x"], msg["writer_dead"])
            else:
                for tid, t in list(self._open.items()) + list(self._closing.items()):
                    if t.writer == msg["s"]:
                        t.writer_gone = True
                        self._fail(tid, f"prefill worker {msg['s']} died", writer_dead=True)
                        self._try_release(tid)
        except WireError as exc:
            logger.error("rank %d: bad control message: %s", self.rank, exc)

    def _on_open(self, tid: str, block_ids: list[int], transport: str, writer: str | None) -> None:
        if tid in self._open or tid in self._closing or tid in self._history:
            return
        if any(not 0 <= b < self.pool.num_blocks for b in block_ids):
            logger.error("rank %d: open(%s) names blocks outside the pool", self.rank, tid)
            return
        t = self._open[tid] = _RankTransfer(block_ids, transport, writer)
        if self._tags is not None:
            self._tags.mark_open(block_ids, tid)
        for p, n in self._early_writes.pop(tid, {}).items():
            t.writes_landed[p] = n

    def _on_close(self, tid: str, writer_dead: bool) -> None:
        if tid in self._open:
            self._move_to_closing(tid)
        if tid in self._closing:
            self._closing[tid].writer_gone |= writer_dead
            self._try_release(tid)
        else:  # done here already, or never opened: nobody writes it through this rank
            self._remember(tid)
            self._report("released", x=tid, rank=self.rank)

    # -- prefill messages ----------------------------------------------------------------
    def _on_sender(self, identity: bytes, parts: list) -> None:
        try:
            msg = unpack(parts[0].bytes, SENDER_KINDS)
        except WireError as exc:
            self._stats["malformed_dropped"] += 1
            logger.warning("rank %d: dropped a bad message from a prefill rank: %s", self.rank, exc)
            return
        if msg["t"] == "md_req":
            if self._nixl is not None:
                self._data.send_multipart([identity, self._nixl.metadata_reply()])
            return
        self._dispatch(msg, parts[1:], park=True)

    def _dispatch(self, msg: dict, frames: list, *, park: bool) -> None:
        tid = msg["x"]
        if tid in self._open or tid in self._closing:
            try:
                self._apply(tid, msg, frames)
            except WireError as exc:
                self._stats["malformed_dropped"] += 1
                logger.warning("rank %d: dropped a bad message for %s: %s", self.rank, tid, exc)
        elif tid in self._history or not park:
            self._stats["stale_dropped"] += 1
            logger.debug("rank %d: dropped a %s message of ended transfer %s", self.rank, msg["t"], tid)
        else:
            self._stats["parked"] += 1
            self._parked = (time.monotonic() + self.config.park_timeout_s, msg, frames)

    def _retry_parked(self) -> None:
        deadline, msg, frames = self._parked
        tid = msg["x"]
        known = tid in self._open or tid in self._closing or tid in self._history
        if known or time.monotonic() >= deadline:
            self._parked = None
            if not known:  # ids are opened before they are published: this one never will be
                logger.warning("rank %d: dropping data of transfer %s, never opened here", self.rank, tid)
                self._remember(tid)
            self._dispatch(msg, frames, park=False)

    def _apply(self, tid: str, msg: dict, frames: list) -> None:
        """Handle a prefill message for a known transfer; a bad one raises WireError before it
        changes anything."""
        t = self._open.get(tid) or self._closing[tid]
        kind, p = msg["t"], msg["p"]
        expected = self._check_source(t, msg)
        if kind == "kv":
            if tid not in self._open:
                self._stats["stale_dropped"] += 1
                return
            self._stats["bytes_landed"] += land_layer(self.pool, msg, frames, t.blocks)
        t.writer, t.p_tp, t.expected = t.writer or msg["s"], msg["pt"], expected
        if kind == "start" and tid in self._open and not t.start_reported:
            t.start_reported = True
            self._report("rank_started", x=tid, rank=self.rank)
        if kind == "done":
            t.done.add(p)
            t.ended.add(p)
            t.writes_expected[p] = msg["n"]
            if "tok" in msg:
                t.first = (msg["tok"], float(msg.get("lp", 0.0)))
        elif kind == "abort":
            t.ended.add(p)
            t.writer_gone |= bool(msg.get("every"))
            self._fail(tid, f"prefill rank {p} aborted: {msg['reason']}")
        self._try_complete(tid)
        self._try_release(tid)

    def _check_source(self, t: _RankTransfer, msg: dict) -> frozenset[int]:
        """The prefill ranks that write here, from the message's (rank, TP) claims."""
        p, p_tp = msg["p"], msg["pt"]
        if not 0 <= p < p_tp or (t.p_tp is not None and p_tp != t.p_tp):
            raise WireError(f"prefill rank {p} of TP={p_tp} does not fit this transfer (TP={t.p_tp})")
        if t.expected is not None:
            return t.expected
        try:
            return sources_for(self.pool.spec.num_kv_heads, p_tp, self.tp_size, self.rank)
        except ValueError as exc:
            raise WireError(str(exc)) from None

    def _on_write_landed(self, note: bytes) -> None:
        try:
            msg = unpack(note, frozenset({"nx"}))
        except WireError as exc:
            logger.warning("rank %d: bad NIXL notification: %s", self.rank, exc)
            return
        tid, p = msg["x"], msg["p"]
        t = self._open.get(tid) or self._closing.get(tid)
        if t is not None:
            t.writes_landed[p] = t.writes_landed.get(p, 0) + 1
            self._try_complete(tid)
        elif tid not in self._history:  # landed before the open reached this thread
            counts = self._early_writes.setdefault(tid, {})
            counts[p] = counts.get(p, 0) + 1
            while len(self._early_writes) > 1024:
                self._early_writes.popitem(last=False)

    # -- transitions ---------------------------------------------------------------------
    def _try_complete(self, tid: str) -> None:
        t = self._open.get(tid)
        if t is None or t.expected is None or not t.expected <= t.done:
            return
        if any(t.writes_landed.get(p, 0) < t.writes_expected.get(p, 0) for p in t.expected):
            return
        del self._open[tid]
        if self._tags is not None:
            self._tags.mark_closed(t.block_ids, tid)
        self._remember(tid)
        self._stats["transfers_done"] += 1
        tok, lp = t.first if self.rank == 0 and t.first is not None else (None, None)
        self._report("rank_done", x=tid, rank=self.rank, tok=tok, lp=lp)

    def _fail(self, tid: str, reason: str, *, writer_dead: bool = False) -> None:
        if tid in self._open:
            self._move_to_closing(tid)
            self._stats["transfers_failed"] += 1
            self._report("rank_failed", x=tid, rank=self.rank, reason=reason, writer_dead=writer_dead or None)

    def _move_to_closing(self, tid: str) -> None:
        t = self._closing[tid] = self._open.pop(tid)
        if self._tags is not None:
            self._tags.mark_closed(t.block_ids, tid)

    def _try_release(self, tid: str) -> None:
        t = self._closing.get(tid)
        if t is None:
            return
        # zmq: this thread is the only writer and no longer accepts data for tid.
        writers_done = t.expected is not None and t.expected <= t.ended
        if t.transport == "zmq" or t.writer_gone or writers_done:
            del self._closing[tid]
            self._remember(tid)
            self._report("released", x=tid, rank=self.rank)

    def _remember(self, tid: str) -> None:
        self._history[tid] = None
        while len(self._history) > self.config.history:
            self._history.popitem(last=False)
