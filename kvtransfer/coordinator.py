"""Decode rank 0: reservations, destination dicts, and completion/failure events.

The decode worker's rank 0 owns one ``KVCoordinator`` (and the ``BlockAllocator`` under it); every
rank, rank 0 included, runs a ``KVReceiver`` that connects to the coordinator's control endpoint
and registers with ``hello``. Calls are made from one thread, the worker's event loop::

    coord = KVCoordinator(allocator, endpoint=ctrl, tp_size=tp)
    coord.wait_ready()                      # every rank's receiver said hello
    info = coord.describe()                 # published at registration
    dest = coord.reserve(transfer_id, num_tokens, transport=t, writer=prefill_id)  # None: full
    for event in await coord.wait_events(): # TransferDone / TransferFailed
        ...
    coord.abort(transfer_id); coord.peer_dead(prefill_id)
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import zmq
import zmq.asyncio

from kvtransfer.allocator import BlockAllocator
from kvtransfer.reservation import ReservationTable
from kvtransfer.spec import TRANSPORT_EXTRAS
from kvtransfer.transport import TransferDone, TransferEvent, TransferFailed
from kvtransfer.wire import WireError, pack, unpack

logger = logging.getLogger(__name__)

RANK_KINDS = frozenset({"hello", "rank_started", "rank_done", "rank_failed", "released", "rank_stopped"})


@dataclass
class _Progress:
    transport: str
    done: set[int] = field(default_factory=set)  # ranks whose part landed
    released: set[int] = field(default_factory=set)  # ranks that no writer touches any more
    first: tuple[int, float] | None = None


class KVCoordinator:
    """Owns the ``ReservationTable`` of one decode worker and gathers its ranks' reports."""

    def __init__(self, allocator: BlockAllocator, *, endpoint: str, tp_size: int = 1,
                 default_transport: str = "zmq", reserve_timeout_s: float = 30.0,
                 quarantine_timeout_s: float = 60.0, start_timeout_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if tp_size <= 0:
            raise ValueError(f"tp_size must be positive, got {tp_size}")
        # A reservation's timeout runs from its writer's start; before that it is bounded by
        # the writer's liveness (PeerDead) and start_timeout_s (None: the same timeout).
        self.table = ReservationTable(allocator, reserve_timeout_s=reserve_timeout_s,
                                      quarantine_timeout_s=quarantine_timeout_s,
                                      start_timeout_s=start_timeout_s, clock=clock)
        self.tp_size = tp_size
        self.default_transport = default_transport
        self._clock = clock
        self._ranks: dict[int, dict] = {}  # rank -> its receiver's entry (KVReceiver.describe)
        self._rank_errors: dict[int, str] = {}
        # rank -> why its receiver thread ended unasked (reported by the thread as it ends)
        self.stopped_ranks: dict[int, str] = {}
        self._progress: dict[str, _Progress] = {}
        self._events: list[TransferEvent] = []
        self._counts = {"transfers_done": 0, "transfers_failed": 0, "reservations_expired": 0,
                        "by_transport": {}}
        self._sock = zmq.Context.instance().socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._sock.setsockopt(zmq.LINGER, 0)
        try:
            self._sock.bind(endpoint)
        except zmq.ZMQError as exc:
            self._sock.close()
            raise ValueError(f"KV coordinator cannot bind {endpoint}: {exc}") from None
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._async_sock: zmq.asyncio.Socket | None = None  # a view of _sock for one event loop
        self._async_loop = None

    # -- setup ---------------------------------------------------------------------------
    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Wait until every rank's receiver registered. Raises TimeoutError naming the missing
        ranks, ValueError if a rank's pool does not match the allocator."""
        deadline = time.monotonic() + timeout_s
        while len(self._ranks) < self.tp_size:
            if self._rank_errors:
                raise ValueError("; ".join(self._rank_errors.values()))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(self.tp_size)) - set(self._ranks))
                raise TimeoutError(f"decode ranks {missing} did not register their KV receivers "
                                   f"with {self.endpoint} within {timeout_s}s")
            if self._sock.poll(int(remaining * 1000) + 1):
                self._drain()

    def describe(self) -> dict:
        """What registration publishes: every rank's entry and the transports all ranks accept."""
        if len(self._ranks) < self.tp_size:
            raise RuntimeError("call wait_ready() before describe()")
        entries = [self._ranks[r] for r in range(self.tp_size)]
        transports = [t for t in entries[0]["transports"] if all(t in e["transports"] for e in entries)]
        caps = {k: entries[0][k] for k in ("host", "boot_id", "shm_id")}
        return {"tp_size": self.tp_size, "ranks": entries, "capabilities": {"transports": transports, **caps}}

    # -- reservations --------------------------------------------------------------------
    def reserve(self, transfer_id: str, num_tokens: int, *, transport: str | None = None,
                writer: str | None = None, timeout_s: float | None = None) -> dict | None:
        """Reserve blocks for a transfer and return its destination dict, or None when the
        blocks are not free (queue the request and retry). ``writer`` is the prefill worker's
        id, so ``peer_dead`` can release its reservations early; ``timeout_s`` overrides
        ``reserve_timeout_s`` for this transfer.

        Raises ValueError for a reused transfer id, a bad token count or timeout, or an
        unsupported transport.
        """
        transport = transport or self.default_transport
        accepted = self.describe()["capabilities"]["transports"]
        if transport not in accepted:
            raise ValueError(f"transport {transport!r} is not accepted by every decode rank "
                             f"(they accept {accepted}); negotiate again")
        block_ids = self.table.reserve(transfer_id, num_tokens, writer=writer, timeout_s=timeout_s)
        if block_ids is None:
            return None
        self._progress[transfer_id] = _Progress(transport)
        by_transport = self._counts["by_transport"]
        by_transport[transport] = by_transport.get(transport, 0) + 1
        self._broadcast(pack("open", x=transfer_id, blocks=block_ids, transport=transport, writer=writer))
        extras = TRANSPORT_EXTRAS.get(transport, ())
        ranks = [{"endpoint": e["endpoint"], "num_blocks": e["num_blocks"], "block_ids": block_ids,
                  **{k: e[k] for k in extras}} for e in (self._ranks[r] for r in range(self.tp_size))]
        return {"transport": transport, "transfer_id": transfer_id,
                "ttl_s": timeout_s or self.table.reserve_timeout_s, "ranks": ranks}

    def abort(self, transfer_id: str, *, published: bool = True) -> bool:
        """Abort a live reservation (client cancel, router abort); its blocks are quarantined
        until every rank released them. ``published=False`` says the destination never reached
        a prefill worker, so no writer exists and the blocks are released at once. Returns
        False if the reservation is not live (done, failed or unknown)."""
        return self._fail(transfer_id, None, writer_dead=not published)

    def peer_dead(self, peer_id: str) -> None:
        """The prefill worker ``peer_id`` is dead: its live transfers fail (events follow) and
        its quarantined ones are released as soon as the ranks confirm."""
        self._broadcast(pack("dead", s=peer_id))
        for tid in self.table.ids_of_writer(peer_id):
            if not self._fail(tid, f"prefill worker {peer_id} died", writer_dead=True):
                self._broadcast(pack("close", x=tid, writer_dead=True))

    # -- events --------------------------------------------------------------------------
    def poll(self, timeout_s: float = 0.0) -> list[TransferEvent]:
        """Handle the ranks' reports and expiries; return new events, waiting up to ``timeout_s``
        for the first one."""
        deadline = time.monotonic() + timeout_s
        while True:
            self._drain()
            self._expire()
            now = time.monotonic()
            if self._events or now >= deadline:
                events, self._events = self._events, []
                return events
            self._sock.poll(max(1, int(self._wait_s(deadline - now) * 1000)))

    async def wait_events(self, timeout_s: float | None = None) -> list[TransferEvent]:
        """Await new events (the worker's event loop; no busy polling). Returns [] on timeout."""
        loop = asyncio.get_running_loop()
        if self._async_sock is None or self._async_loop is not loop:
            self._async_sock = zmq.asyncio.Socket.shadow(self._sock.underlying)
            self._async_loop = loop
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            events = self.poll(0.0)
            if events:
                return events
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return []
            wait = self._wait_s(remaining)
            await self._async_sock.poll(None if wait is None else max(1, int(wait * 1000)), zmq.POLLIN)

    def stats(self) -> dict:
        """Blocks (free, used, quarantined), reservations (live, quarantined) and transfer counts."""
        return {**self.table.stats().to_dict(), **self._counts,
                "by_transport": dict(self._counts["by_transport"])}

    def close(self) -> None:
        self._sock.close(linger=0)

    # -- internals -----------------------------------------------------------------------
    def _wait_s(self, remaining: float | None) -> float | None:
        """Seconds until the caller's deadline or the table's next expiry, whichever is first."""
        expiry = self.table.next_deadline()
        until_expiry = None if expiry is None else max(0.0, expiry - self._clock())
        waits = [w for w in (remaining, until_expiry) if w is not None]
        return min(waits) if waits else None

    def _drain(self) -> None:
        while self._sock.poll(0):
            parts = self._sock.recv_multipart()
            try:
                if len(parts) != 2:
                    raise WireError(f"a report must be one frame, got {len(parts) - 1}")
                self._on_rank(parts[0], unpack(parts[1], RANK_KINDS))
            except WireError as exc:
                logger.error("bad report from decode rank %r: %s", parts[0], exc)

    def _on_rank(self, identity: bytes, msg: dict) -> None:
        kind = msg["t"]
        rank = msg["rank"]
        if identity != f"r{rank}".encode() or not 0 <= rank < self.tp_size:
            raise WireError(f"a {kind} claims rank {rank} from {identity!r} in a TP group of {self.tp_size}")
        if kind == "hello":
            self._register(rank, msg["entry"])
            return
        if kind == "rank_stopped":
            logger.error("decode rank %d's KV receiver thread stopped: %s", rank, msg["reason"])
            self.stopped_ranks[rank] = msg["reason"]
            return
        tid = msg["x"]
        progress = self._progress.get(tid)
        if progress is None:
            return
        if kind == "rank_started":
            self.table.writer_started(tid)
        elif kind == "rank_failed":
            self._fail(tid, msg["reason"], writer_dead=msg.get("writer_dead", False))
        elif kind == "rank_done" and self.table.is_live(tid):
            progress.done.add(rank)
            if rank == 0:
                if "tok" not in msg:
                    self._fail(tid, "the prefill side sent no first token")
                    return
                progress.first = (msg["tok"], float(msg.get("lp", 0.0)))
            if len(progress.done) == self.tp_size:
                block_ids = self.table.complete(tid)
                del self._progress[tid]
                self._counts["transfers_done"] += 1
                self._events.append(TransferDone(tid, block_ids, *progress.first))
        elif self.table.is_quarantined(tid):  # released, or done after the abort: no more writes
            progress.released.add(rank)
            if len(progress.released) == self.tp_size:
                self.table.writer_finished(tid)
                del self._progress[tid]

    def _register(self, rank: int, entry: dict) -> None:
        for name, types in (("endpoint", str), ("num_blocks", int), ("transports", list), ("host", str),
                            ("boot_id", str), ("shm_id", str)):
            if not isinstance(entry.get(name), types):
                raise WireError(f"rank {rank}'s registration lacks {name!r}")
        extras = TRANSPORT_EXTRAS
        for transport in entry["transports"]:
            if not all(isinstance(entry.get(name), str) for name in extras.get(transport, ())):
                raise WireError(f"rank {rank} offers {transport} without {extras[transport]}")
        if entry["num_blocks"] != self.table.allocator.num_blocks:
            self._rank_errors[rank] = (f"decode rank {rank}'s KV pool has {entry['num_blocks']} blocks but "
                                       f"the allocator hands out {self.table.allocator.num_blocks}: "
                                       "every rank must size its pool alike")
            return
        self._ranks[rank] = entry

    def _fail(self, tid: str, reason: str | None, *, writer_dead: bool = False) -> bool:
        """Quarantine a live reservation and close it on every rank; ``reason`` None means the
        worker asked (no event). Returns False if ``tid`` was not live."""
        if not self.table.abort(tid):
            return False
        self._broadcast(pack("close", x=tid, writer_dead=writer_dead))
        if reason is not None:
            logger.info("KV transfer %s failed: %s", tid, reason)
            self._counts["transfers_failed"] += 1
            self._events.append(TransferFailed(tid, reason))
        return True

    def _expire(self) -> None:
        expiry = self.table.expire()
        self._counts["reservations_expired"] += len(expiry.expired)
        for tid in expiry.expired:
            self._broadcast(pack("close", x=tid, writer_dead=False))
            self._counts["transfers_failed"] += 1
            self._events.append(TransferFailed(tid, "expired: the KV did not arrive in time"))
        for tid in expiry.released:
            self._progress.pop(tid, None)

    def _broadcast(self, message: bytes) -> None:
        for rank in range(self.tp_size):
            try:
                self._sock.send_multipart([f"r{rank}".encode(), message])
            except zmq.ZMQError as exc:
                logger.error("decode rank %d is unreachable for KV control: %s", rank, exc)
