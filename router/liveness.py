"""Worker liveness: a worker is alive while it makes progress, not merely while its loop runs.

Three rules, checked every router tick (router/server.py):
- **silent**: nothing arrived from the worker for ``heartbeat_timeout_s`` (a killed, stopped or
  wedged process; its connection may not even drop).
- **stuck**: its heartbeats say it has work (``has_work``) but its step counter (``num_steps``,
  monotonic) has not advanced for ``stuck_timeout_s`` past the slowest step it has shown. Rank 0's
  event loop still heartbeats while a TP rank hangs in a collective or the model thread waits
  forever; only the step counter tells. Idle time never counts.
- **unhealthy**: a heartbeat reports a ``health`` problem (a one-line reason; None when every
  thread and TP rank is fine), e.g. a dead KV receiver thread or an exited TP rank.

A worker declared dead by any rule is failed over exactly as if it had been killed. A worker
declared stuck or unhealthy may not register again from the same process (it is broken; the
supervisor, or its operator, restarts it); a silent one may, once it speaks again.

Heartbeat stats arrive as ``router.payloads.HeartbeatStats`` (checked on decode).
"""
from __future__ import annotations

from dataclasses import dataclass

from router.payloads import HeartbeatStats

SILENT = "silent"
STUCK = "stuck"
UNHEALTHY = "unhealthy"
DISCONNECTED = "disconnected"
# Declared dead for one of these, the process is broken: refuse it until it restarts.
BROKEN = (STUCK, UNHEALTHY)


@dataclass
class Progress:
    """What the router knows about one worker's progress (kept on its WorkerRecord)."""

    num_steps: int | None = None     # last reported step counter (None: no heartbeat yet)
    has_work: bool = False           # last reported: a step is planned or running
    last_step_at: float = 0.0        # when the counter last moved, or the worker was last idle
    slowest_step_s: float = 0.0      # the longest time the counter took to move while busy
    health: str | None = None        # None when healthy, else what is wrong

    def observe(self, stats: HeartbeatStats, now: float) -> None:
        """Fold one heartbeat's stats in."""
        if stats.num_steps != self.num_steps:
            if self.num_steps is not None and self.has_work:
                self.slowest_step_s = max(self.slowest_step_s, now - self.last_step_at)
            self.num_steps = stats.num_steps
            self.last_step_at = now
        self.has_work = stats.has_work
        if not self.has_work:
            self.last_step_at = now  # idle: the next step's clock starts now
        self.health = stats.health[:400] if stats.health else None

    def stuck_for(self, now: float, timeout_s: float) -> float | None:
        """Seconds without a step while busy, if past the bound; else None."""
        if self.num_steps is None or not self.has_work:
            return None
        waited = now - self.last_step_at
        return waited if waited > timeout_s + self.slowest_step_s else None


def verdict(progress: Progress, last_seen: float, now: float, heartbeat_timeout_s: float,
            stuck_timeout_s: float) -> tuple[str, str] | None:
    """(rule, reason) if the worker must be declared dead now, else None."""
    silent = now - last_seen
    if silent > heartbeat_timeout_s:
        return SILENT, f"sent nothing for {silent:.1f}s"
    if progress.health is not None:
        return UNHEALTHY, f"reported itself unhealthy: {progress.health}"
    stuck = progress.stuck_for(now, stuck_timeout_s)
    if stuck is not None:
        return STUCK, (f"had work but completed no step for {stuck:.1f}s (bound: {stuck_timeout_s:g}s past "
                       f"its slowest step of {progress.slowest_step_s:.1f}s)")
    return None
