"""Scaling a running cluster: the ``Scaler`` a launcher provides, and draining removed workers.

A scale request (``ScaleRequest``, ``pdserve scale``, ``Client.scale``) reaches the router,
which hands it to its launcher's ``Scaler`` (only a launcher that can start workers has one).
The scaler starts new workers, which register and take load like any other, and picks the
workers to remove, which it passes to ``Drainer.drain``.

Draining invariants (no request fails because of a scale-down):
- a draining worker gets no new request (``router.policy`` skips it), and every request it
  already holds runs to its end there;
- once it holds nothing, the router tells it to shut down, forgets it (status no longer lists
  it), and calls the launcher's
  ``on_drained(worker_id)`` (which stops its process for good);
- past the drain deadline, whatever it still holds fails over exactly as if it had died
  (re-prefilled elsewhere, output kept), then it is shut down the same way;
- a draining worker that dies meanwhile is failed over as usual and counts as drained.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

from router import protocol as P

if TYPE_CHECKING:
    from router.server import Router
    from router.workers import WorkerRecord

log = logging.getLogger("pdserve.router")
# A bound on the workers of one role (at start or by a scale request), far above any real
# cluster: a typo (an extra zero, a count meant for tokens) must be refused, not start
# thousands of workers.
MAX_WORKERS_PER_ROLE = 256


def check_count(flag: str, n: object) -> None:
    """Raise ValueError, naming ``flag``, unless ``n`` is an int in 1..MAX_WORKERS_PER_ROLE."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"{flag} must be a positive integer (a role needs at least one worker), got {n!r}")
    if n > MAX_WORKERS_PER_ROLE:
        raise ValueError(f"{flag} {n} is over the {MAX_WORKERS_PER_ROLE} workers per role a cluster may "
                         "have; ask for fewer")


def check_counts(num_prefill: object, num_decode: object) -> None:
    """``check_count`` for a scale request's counts (None: unchanged, accepted). The client
    checks before sending, the router again on receipt."""
    for flag, n in (("--prefill", num_prefill), ("--decode", num_decode)):
        if n is not None:
            check_count(flag, n)


class Scaler(Protocol):
    """What a launcher gives the router so that clients can scale the cluster."""

    def scale(self, num_prefill: int | None, num_decode: int | None) -> dict:
        """Start or drain workers until each role has its count (None: unchanged).
        Called on the router's event loop; must not block. Returns the ``ScaleReply`` result.
        Raises ValueError for a count it cannot run."""


@dataclass
class _Drain:
    worker: WorkerRecord
    deadline: float
    on_drained: Callable[[str], None]


class Drainer:
    """The router's draining workers, checked every router tick."""

    def __init__(self, router: Router):
        self.router = router
        self._draining: dict[str, _Drain] = {}

    @property
    def worker_ids(self) -> list[str]:
        return list(self._draining)

    def drain(self, worker_id: str, timeout_s: float, on_drained: Callable[[str], None]) -> None:
        """Stop sending ``worker_id`` requests and shut it down once it holds none (see the
        module docstring). Raises ValueError if no live worker has that id."""
        worker = self.router.registry.by_id.get(worker_id)
        if worker is None or not worker.alive:
            raise ValueError(f"no live worker {worker_id!r} to drain")
        worker.draining = True
        self._draining[worker_id] = _Drain(worker, time.monotonic() + timeout_s, on_drained)
        log.info("draining worker %s (deadline %.0fs)", worker_id, timeout_s)

    def holds(self, worker: WorkerRecord) -> int:
        """Live requests that still need ``worker`` (decoding there, or waiting for its KV)."""
        return sum(1 for req in self.router.scheduler.requests.values()
                   if req.decode is worker or (req.prefill is worker and (req.prefill_holds or not req.started)))

    def tick(self, now: float) -> None:
        for worker_id, entry in list(self._draining.items()):
            worker = entry.worker
            if worker.alive and self.holds(worker):
                if now < entry.deadline:
                    continue
                log.warning("worker %s still holds %d requests at its drain deadline: failing them over",
                            worker_id, self.holds(worker))
            self._finish(worker_id, entry)

    def _finish(self, worker_id: str, entry: _Drain) -> None:
        del self._draining[worker_id]
        worker = entry.worker
        if worker.alive:
            self.router.to_worker(worker, P.Shutdown("drained: the cluster was scaled down"))
            # Fails over anything it still holds past the deadline.
            self.router.declare_dead(worker, "drained", "removed by a scale-down")
            log.info("worker %s drained", worker_id)
        if self.router.registry.by_id.get(worker_id) is worker:
            del self.router.registry.by_id[worker_id]  # removed on purpose: not a dead worker to show
        try:
            entry.on_drained(worker_id)
        except Exception:  # the launcher's problem must not stop the router's tick
            log.exception("stopping drained worker %s", worker_id)
