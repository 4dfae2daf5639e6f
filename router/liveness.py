"""Worker liveness: a worker is alive while it makes progress, not merely while its loop runs.

Three rules, checked every router tick (router/server.py):
- **silent**: nothing arrived from the worker for ``heartbeat_timeout_s`` (a killed, stopped or
  wedged process; its connection may not even drop).
- **stuck**: its heartbeats say it has work (``has_work``) but its step counter (``num_steps``,
  monotonic) has not advanced for ``stuck_timeout_s`` past the slowest step it has shown. Rank 0's
  event loop still heartbeats while a TP rank hangs in a collective or the model thread waits
  forever; only the step counter tells. Idle time never counts.
- **unhealthy**: a heartbeat reports a ``health`` other than ``"ok"`` (a string, or a mapping of
  thread / rank name to its state), e.g. a dead KV receiver thread.

A worker declared dead by any rule is failed over exactly as if it had been killed. A worker
declared stuck or unhealthy may not register again from the same process (it is broken; the
supervisor, or its operator, restarts it); a silent one may, once it speaks again.

Workers that send no ``num_steps`` (older builds) are checked by the silent rule only.
"""
from __future__ import annotations

from dataclasses import dataclass

SILENT = "silent"
STUCK = "stuck"
UNHEALTHY = "unhealthy"
DISCONNECTED = "disconnected"
# Declared dead for one of these, the process is broken: refuse it until it restarts.
BROKEN = (STUCK, UNHEALTHY)


@dataclass
class Progress:
    """What the router knows about one worker's progress (kept on its WorkerRecord)."""

    num_steps: int | None = None     # last reported step counter (None: not reported)
    has_work: bool = False           # last reported: a step is planned or running
    last_step_at: float = 0.0        # when the counter last moved, or the worker was last idle
    slowest_step_s: float = 0.0      # the longest time the counter took to move while busy
    health: str | None = None        # None when healthy, else what is wrong

    def observe(self, stats: dict, now: float) -> None:
        """Fold one heartbeat's stats in (malformed fields are ignored, never trusted)."""
        steps = stats.get("num_steps")
        if isinstance(steps, int) and not isinstance(steps, bool):
            if steps != self.num_steps:
                if self.num_steps is not None and self.has_work:
                    self.slowest_step_s = max(self.slowest_step_s, now - self.last_step_at)
                self.num_steps = steps
                self.last_step_at = now
            self.has_work = stats.get("has_work") is True
            if not self.has_work:
                self.last_step_at = now  # idle: the next step's clock starts now
        self.health = _health_problem(stats.get("health"))

    def stuck_for(self, now: float, timeout_s: float) -> float | None:
        """Seconds without a step while busy, if past the bound; else None."""
        if self.num_steps is None or not self.has_work:
            return None
        waited = now - self.last_step_at
        return waited if waited > timeout_s + self.slowest_step_s else None


def _health_problem(health) -> str | None:
    """None for "ok" (or no report), else a short description of what is not ok."""
    if health is None or health == "ok":
        return None
    if isinstance(health, dict):
        bad = [f"{name}: {state}" for name, state in health.items() if state != "ok"]
        return "; ".join(str(b)[:200] for b in bad[:8]) or None
    return str(health)[:400]


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
