"""Decode-side ownership of reserved KV blocks, keyed by transfer id.

A reservation moves through these states:

    reserve ──▶ live ──complete──▶ (blocks handed to the caller; the table forgets them)
                 │
                 └─abort / expire──▶ quarantined ──writer finished / quarantine timeout──▶ free

Invariants:
- a transfer id is used once: reserving an id that is live, quarantined or recently ended
  raises, so a late frame of an old transfer can never match a new one;
- blocks of an aborted or expired reservation stay out of the free list (quarantined) until
  every writer that could still write into them is known finished or dead, so a late direct
  write (shm, RDMA) can never land in another request's blocks; the quarantine timeout is the
  last resort when no such news ever comes;
- the table never reserves more blocks than are free: ``reserve`` returns None instead;
- a live reservation's timeout counts from when its writer starts (``writer_started``), so time
  spent queued for prefill never expires it; until then it waits at most ``start_timeout_s``
  (its writer's death and the router's loss release it sooner).

Not thread-safe, like the ``BlockAllocator`` it draws from: one owner thread does every call.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from kvtransfer.allocator import BlockAllocator
from kvtransfer.spec import num_blocks_for

logger = logging.getLogger(__name__)


@dataclass
class _Reservation:
    block_ids: list[int]
    writer: str | None
    deadline: float  # live: expiry; quarantined: forced release
    timeout_s: float  # live, once its writer started
    quarantined: bool = False
    writer_done: bool = False
    writer_started: bool = False


@dataclass(frozen=True)
class ReservationStats:
    """Block and reservation counts of one decode worker (its rank-0 allocator)."""

    num_free_blocks: int
    num_used_blocks: int
    num_quarantined_blocks: int
    num_live: int
    num_quarantined: int
    num_forced_releases: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Expiry:
    """What one ``expire`` call did: live reservations it expired (now quarantined) and
    quarantined ones it force-released after the quarantine timeout."""

    expired: list[str]
    released: list[str]


class ReservationTable:
    """Reservations of blocks for incoming KV transfers, over one ``BlockAllocator``."""

    def __init__(self, allocator: BlockAllocator, *, reserve_timeout_s: float = 30.0,
                 quarantine_timeout_s: float = 60.0, start_timeout_s: float | None = None,
                 history: int = 65536, clock: Callable[[], float] = time.monotonic):
        if reserve_timeout_s <= 0 or quarantine_timeout_s <= 0:
            raise ValueError("reserve_timeout_s and quarantine_timeout_s must be positive")
        if start_timeout_s is not None and start_timeout_s <= 0:
            raise ValueError("start_timeout_s must be positive (or None: the reservation's timeout)")
        self.allocator = allocator
        self.reserve_timeout_s = reserve_timeout_s
        self.start_timeout_s = start_timeout_s
        self.quarantine_timeout_s = quarantine_timeout_s
        self._clock = clock
        self._entries: dict[str, _Reservation] = {}
        self._ended: OrderedDict[str, None] = OrderedDict()  # bounded memory of used ids
        self._history = history
        self._num_forced_releases = 0

    # -- queries -------------------------------------------------------------------------
    def is_live(self, transfer_id: str) -> bool:
        entry = self._entries.get(transfer_id)
        return entry is not None and not entry.quarantined

    def is_quarantined(self, transfer_id: str) -> bool:
        entry = self._entries.get(transfer_id)
        return entry is not None and entry.quarantined

    def block_ids(self, transfer_id: str) -> list[int]:
        """Blocks of a live or quarantined reservation. Raises KeyError for any other id."""
        return list(self._entries[transfer_id].block_ids)

    def writer(self, transfer_id: str) -> str | None:
        entry = self._entries.get(transfer_id)
        return entry.writer if entry is not None else None

    def ids_of_writer(self, writer: str) -> list[str]:
        """Live and quarantined reservations whose writer is ``writer``."""
        return [tid for tid, e in self._entries.items() if e.writer == writer]

    def next_deadline(self) -> float | None:
        """The earliest expiry or forced release, on this table's clock (None if nothing waits)."""
        return min((e.deadline for e in self._entries.values()), default=None)

    def stats(self) -> ReservationStats:
        quarantined = [e for e in self._entries.values() if e.quarantined]
        return ReservationStats(
            num_free_blocks=self.allocator.num_free_blocks,
            num_used_blocks=self.allocator.num_used_blocks,
            num_quarantined_blocks=sum(len(e.block_ids) for e in quarantined),
            num_live=len(self._entries) - len(quarantined),
            num_quarantined=len(quarantined),
            num_forced_releases=self._num_forced_releases)

    # -- transitions ---------------------------------------------------------------------
    def reserve(self, transfer_id: str, num_tokens: int, *, writer: str | None = None,
                timeout_s: float | None = None) -> list[int] | None:
        """Reserve blocks for ``num_tokens`` tokens; None when they are not free right now.

        ``writer`` names the prefill worker that will write, if known; ``timeout_s`` overrides
        the table's expiry for this reservation, counted from when its writer starts. Raises ValueError for a bad token count or
        timeout, or a transfer id that was already used.
        """
        timeout_s = self.reserve_timeout_s if timeout_s is None else timeout_s
        if timeout_s <= 0:
            raise ValueError(f"a reservation timeout must be positive, got {timeout_s}")
        if not isinstance(num_tokens, int) or isinstance(num_tokens, bool) or num_tokens <= 0:
            raise ValueError(f"num_tokens must be a positive integer, got {num_tokens!r}")
        if not isinstance(transfer_id, str) or not transfer_id:
            raise ValueError("transfer_id must be a non-empty string")
        if transfer_id in self._entries or transfer_id in self._ended:
            raise ValueError(f"transfer id {transfer_id!r} was already used; give every transfer a fresh id")
        num_blocks = num_blocks_for(num_tokens, self.allocator.block_size)
        if not self.allocator.can_allocate(num_blocks):
            return None
        block_ids = self.allocator.allocate(num_blocks)
        wait = timeout_s if self.start_timeout_s is None else max(self.start_timeout_s, timeout_s)
        self._entries[transfer_id] = _Reservation(block_ids, writer, self._clock() + wait, timeout_s)
        return list(block_ids)

    def complete(self, transfer_id: str) -> list[int]:
        """The KV has landed: hand the blocks to the caller, who frees them through the allocator.

        Raises KeyError if the reservation is not live.
        """
        if not self.is_live(transfer_id):
            raise KeyError(f"transfer {transfer_id!r} is not a live reservation")
        entry = self._entries.pop(transfer_id)
        self._remember(transfer_id)
        return entry.block_ids

    def writer_started(self, transfer_id: str) -> bool:
        """The writer began writing: the reservation's timeout counts from now. Only the first
        call counts; returns False (and changes nothing) if the id is not live."""
        entry = self._entries.get(transfer_id)
        if entry is None or entry.quarantined or entry.writer_started:
            return False
        entry.writer_started = True
        entry.deadline = self._clock() + entry.timeout_s
        return True

    def abort(self, transfer_id: str) -> bool:
        """Stop a live reservation. Its blocks are quarantined, or freed at once if its writer
        already finished. Returns False (and changes nothing) if the id is not live."""
        if not self.is_live(transfer_id):
            return False
        entry = self._entries[transfer_id]
        entry.quarantined = True
        entry.deadline = self._clock() + self.quarantine_timeout_s
        if entry.writer_done:
            self._release(transfer_id)
        return True

    def writer_finished(self, transfer_id: str) -> int:
        """No writer will touch this reservation's blocks again. A quarantined reservation is
        freed now (returns the number of blocks freed); a live one is freed as soon as it is
        aborted. Unknown ids are ignored."""
        entry = self._entries.get(transfer_id)
        if entry is None:
            return 0
        entry.writer_done = True
        return self._release(transfer_id) if entry.quarantined else 0

    def expire(self, now: float | None = None) -> Expiry:
        """Quarantine live reservations past their timeout and force-release quarantined ones
        past the quarantine timeout."""
        now = self._clock() if now is None else now
        expired, released = [], []
        for tid, entry in list(self._entries.items()):
            if entry.deadline > now:
                continue
            if entry.quarantined:
                logger.warning("transfer %s: no word from its writer in %.0fs; releasing its %d "
                               "quarantined blocks", tid, self.quarantine_timeout_s, len(entry.block_ids))
                self._num_forced_releases += 1
                self._release(tid)
                released.append(tid)
            else:
                self.abort(tid)
                expired.append(tid)
        return Expiry(expired, released)

    def _release(self, transfer_id: str) -> int:
        entry = self._entries.pop(transfer_id)
        self.allocator.free(entry.block_ids)
        self._remember(transfer_id)
        return len(entry.block_ids)

    def _remember(self, transfer_id: str) -> None:
        self._ended[transfer_id] = None
        if len(self._ended) > self._history:
            self._ended.popitem(last=False)
