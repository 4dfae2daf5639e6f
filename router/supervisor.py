"""Supervision of a local cluster's workers (``pdserve serve``; ``--no-restart`` turns it off).

A thread polls every worker process and the router's view of it (its status) and:
- **restarts a worker that exited**, under the same worker id, after a backoff that doubles
  with each death in the last minute (``backoff_s`` up to ``max_backoff_s``), and logs one line
  per restart saying how it ended (exit code or signal);
- **gives up on a worker that keeps dying at start**: ``max_start_failures`` exits in a row
  before it ever registered (a bad model path, a missing GPU...). It logs why, with the
  worker's last line of output, and the router's status lists it under ``given_up``;
- **kills a worker the router declared dead while its process lives on** (silent, stuck or
  unhealthy: router/liveness.py) with SIGKILL to its process group (every TP rank), so that the
  exit above restarts it. Its requests were already failed over by the router.

Restart counts per worker id are published to the router (``Router.supervision``: ``restarts``
and ``gave_up``; ``Router.num_restarts`` is the total) and so appear in ``pdserve status``,
``Client.status()`` and the metrics. With the router in a separate process (``--router-process``)
restarts and kills still happen, but the counts stay local (``Supervisor.snapshot()``).
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from router.liveness import BROKEN, SILENT

if TYPE_CHECKING:
    from router.launcher import LocalCluster

log = logging.getLogger("pdserve.supervisor")
RECENT_DEATHS_S = 60.0


@dataclass(frozen=True)
class SupervisorConfig:
    """How the supervisor restarts workers; ValueError says what to change."""

    backoff_s: float = 0.5          # delay before the first restart
    max_backoff_s: float = 30.0     # the delay doubles with each recent death, up to this
    max_start_failures: int = 3     # exits in a row before ever registering: give up
    poll_s: float = 0.2

    def __post_init__(self) -> None:
        for name in ("backoff_s", "max_backoff_s", "poll_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"supervisor {name} must be a positive number of seconds, got {value!r}")
        if not isinstance(self.max_start_failures, int) or self.max_start_failures < 1:
            raise ValueError(f"max_start_failures must be a positive integer, got {self.max_start_failures!r}")


@dataclass
class Slot:
    """One worker id the supervisor keeps running."""

    worker_id: str
    role: str
    restarts: int = 0
    start_failures: int = 0         # exits in a row before registering
    registered: bool = False        # its current process has registered with the router
    gave_up: str | None = None
    restart_at: float | None = None  # when to start it again (None: running, or given up)
    killed_pid: int | None = None    # the process it was last told to kill (killed once)
    deaths: deque = field(default_factory=lambda: deque(maxlen=16))


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"


class Supervisor:
    """Keeps ``cluster``'s workers running. ``start()`` / ``stop()``; thread-safe snapshot()."""

    def __init__(self, cluster: "LocalCluster", config: SupervisorConfig | None = None,
                 publish: Callable[[dict], None] | None = None):
        self.cluster = cluster
        self.config = config or SupervisorConfig()
        self.publish = publish
        self.slots: dict[str, Slot] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pdserve-supervisor", daemon=True)

    def start(self) -> "Supervisor":
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop supervising (before the cluster stops its workers)."""
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)

    def snapshot(self) -> dict[str, dict]:
        """worker id -> {"restarts", "gave_up"} for every worker it has seen."""
        with self._lock:
            return {s.worker_id: {"restarts": s.restarts, "gave_up": s.gave_up} for s in self.slots.values()}

    @property
    def num_restarts(self) -> int:
        with self._lock:
            return sum(s.restarts for s in self.slots.values())

    # -- the loop ------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(self.config.poll_s):
            try:
                self.check(time.monotonic())
            except Exception:  # a bug here must not leave the cluster unsupervised silently
                log.exception("supervisor check failed; retrying")

    def check(self, now: float) -> None:
        """One pass over every worker (called by the thread; public for tests)."""
        status = self.cluster.router_status()
        records = {w["id"]: w for w in (status or {}).get("workers", [])}
        changed = False
        for proc in self.cluster.worker_processes():
            with self._lock:
                slot = self.slots.get(proc.worker_id)
                if slot is None:
                    slot = self.slots[proc.worker_id] = Slot(proc.worker_id, proc.role)
                    changed = True
            if slot.gave_up is not None or self._stop.is_set():
                continue
            code = proc.proc.poll()
            if code is None:
                self._watch_live(slot, proc, records.get(slot.worker_id))
                continue
            if slot.restart_at is None:
                changed |= self._on_exit(slot, proc, code, now)
            elif now >= slot.restart_at:
                self.cluster.start_worker(slot.role, slot.worker_id)
                with self._lock:
                    slot.restarts += 1
                    slot.registered = False
                    slot.restart_at = None
                changed = True
        if changed and self.publish is not None:
            self.publish(self.snapshot())

    def _watch_live(self, slot: Slot, proc, record: dict | None) -> None:
        if record is None or record.get("pid") != proc.proc.pid:
            return
        if record.get("alive"):
            slot.registered = True
            slot.start_failures = 0
            return
        rule = record.get("dead_rule")
        if (rule in BROKEN or rule == SILENT) and slot.killed_pid != proc.proc.pid:
            slot.killed_pid = proc.proc.pid
            log.warning("worker %s (pid %d) was declared dead by the router (%s) but its process lives: "
                        "killing it", slot.worker_id, proc.proc.pid, record.get("dead_reason"))
            try:
                os.killpg(proc.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def _on_exit(self, slot: Slot, proc, code: int, now: float) -> bool:
        how = describe_exit(code)
        if not slot.registered:
            slot.start_failures += 1
        if slot.start_failures >= self.config.max_start_failures:
            tail = proc.log_tail(1).strip() or "(no output)"
            with self._lock:
                slot.gave_up = (f"{how} before registering, {slot.start_failures} times in a row; "
                                f"its last output: {tail}")
            log.error("worker %s keeps failing at start: not restarting it: %s", slot.worker_id, slot.gave_up)
            return True
        slot.deaths.append(now)
        recent = sum(1 for t in slot.deaths if now - t < RECENT_DEATHS_S)
        delay = min(self.config.max_backoff_s, self.config.backoff_s * 2 ** (recent - 1))
        slot.restart_at = now + delay
        log.warning("worker %s (pid %d) %s; restarting it in %.1fs (restart %d)", slot.worker_id,
                    proc.proc.pid, how, delay, slot.restarts + 1)
        return False
