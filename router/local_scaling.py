"""Scaling a local cluster (``pdserve serve``, router in this process): the router's ``Scaler``
(router/scaling.py) for ``LocalCluster``.

New workers are new ``pdserve worker`` processes under new ids (``decode-2``, ...): they register
and take load like any other, and the supervisor, if any, restarts them like any other. Removed
workers (the newest of the role first) drain; once drained they are retired: taken off the
cluster's worker list (so nothing restarts them), told to shut down by the router, and, should
they not exit within the cluster's grace period, stopped with SIGTERM then SIGKILL. A removed
worker that has not registered yet (still loading its model) is retired at once; should it
register in that moment, the router forgets it once its process is gone, failing over what it
took. A retired worker never comes back: ids are not reused. ``LocalCluster.stop`` stops
retired processes too.
"""
from __future__ import annotations

import logging
import re
import signal
import threading
from typing import TYPE_CHECKING

from router.scaling import check_counts

if TYPE_CHECKING:
    from router.launcher import LocalCluster, WorkerProcess
    from router.runtime import RouterThread
    from router.server import Router

log = logging.getLogger("pdserve.launcher")


def _index(worker_id: str) -> int:
    match = re.search(r"-(\d+)$", worker_id)
    return int(match.group(1)) if match else -1


class LocalScaler:
    """Starts and drains ``cluster``'s workers; every method runs on the router's loop."""

    def __init__(self, cluster: LocalCluster, router_thread: RouterThread, drain_timeout_s: float = 60.0):
        self.cluster = cluster
        self.router_thread = router_thread
        self.drain_timeout_s = drain_timeout_s
        self.counts = {role: cluster.roles.count(role) for role in ("prefill", "decode")}
        self._next_index = dict(self.counts)
        self._draining: set[str] = set()

    def scale(self, num_prefill: int | None, num_decode: int | None) -> dict:
        """Start or drain workers so that each role has its count (None: unchanged)."""
        check_counts(num_prefill, num_decode)
        if self.cluster.mode != "disagg":
            raise ValueError("a --mode colocated cluster cannot be scaled (a scale request counts prefill "
                             "and decode workers); restart it with another --workers")
        router = self.router_thread.router
        added, draining = [], []
        for role, n in (("prefill", num_prefill), ("decode", num_decode)):
            if n is None:
                continue
            active = sorted((w.worker_id for w in self.cluster.worker_processes()
                             if w.role == role and w.worker_id not in self._draining), key=_index)
            for _ in range(n - len(active)):
                worker_id = f"{role}-{self._next_index[role]}"
                self._next_index[role] += 1
                self.cluster.start_worker(role, worker_id)
                added.append(worker_id)
            for worker_id in reversed(active[n:]):  # the newest go first
                self._draining.add(worker_id)
                draining.append(worker_id)
                try:
                    router.drainer.drain(worker_id, self.drain_timeout_s, self._drained)
                except ValueError:  # not registered (yet, or now: restarting): it holds nothing
                    self._retire(worker_id, 0.0)
            self.counts[role] = n
        if added or draining:
            log.info("scaled to %d prefill + %d decode: added %s, draining %s", self.counts["prefill"],
                     self.counts["decode"], added or "-", draining or "-")
        return {"added": added, "draining": draining, **self.counts}

    def _drained(self, worker_id: str) -> None:
        self._retire(worker_id, self.cluster.grace_s)

    def _retire(self, worker_id: str, grace_s: float) -> None:
        self._draining.discard(worker_id)
        worker = self.cluster.retire_worker(worker_id)
        if worker is not None:
            threading.Thread(target=self._stop, args=(worker, grace_s), name=f"pdserve-retire-{worker_id}",
                             daemon=True).start()

    def _stop(self, worker: WorkerProcess, grace_s: float) -> None:
        """A drained worker exits on the router's Shutdown; one that does not (it never
        registered, or hangs) gets SIGTERM, then SIGKILL. Then the router forgets it, even if it
        registered meanwhile (failing over anything it took)."""
        from router.launcher import _signal_group, _wait_all

        _wait_all([worker.proc], grace_s)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            _signal_group(worker.proc, sig)
            _wait_all([worker.proc], self.cluster.grace_s)
        worker.proc.wait()
        try:
            self.router_thread.post(lambda router: _forget(router, worker.worker_id))
        except RuntimeError:  # the router has stopped: nothing to forget
            pass


def _forget(router: Router, worker_id: str) -> None:
    record = router.registry.by_id.get(worker_id)
    if record is None:
        return
    if record.alive:
        router.declare_dead(record, "drained", "removed by a scale-down")
    del router.registry.by_id[worker_id]
