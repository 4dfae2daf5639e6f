"""Time-based rules of the router, checked every tick.

- A hand-off (Allocate -> Allocated, FirstToken -> Started) takes milliseconds when workers are
  healthy; one that takes ``handoff_timeout_s`` was lost, and the request starts over rather than
  hang. A prefill can legitimately wait behind others, so a PREFILLING request is retried only
  when its prefill worker has produced no first token at all for ``prefill_stall_timeout_s``
  since the request was sent (the worker lost it, or is wedged while still heartbeating).
- While no live worker set can serve requests (no decode-capable worker, or decode workers but no
  prefill worker), queued requests wait; one that waited ``unavailable_timeout_s`` since the
  outage began (or since it was queued, if later) fails with ``unavailable``.

Worker liveness (heartbeat timeouts) is checked by the router itself (router/server.py).
"""
from __future__ import annotations

import logging

from router import protocol as P
from router.request import Request, State
from router.scheduler import RequestScheduler

log = logging.getLogger("pdserve.router")


class Watchdog:
    def __init__(self, scheduler: RequestScheduler, now: float):
        self.scheduler = scheduler
        self.config = scheduler.config
        self.unserveable_since: float | None = now

    def tick(self, now: float) -> None:
        sched = self.scheduler
        for req in [r for r in sched.requests.values() if self._stalled(r, now)]:
            worker = (req.prefill if req.state is State.PREFILLING else req.decode).worker_id
            log.warning("request %s: no progress from %s for %.0fs; retrying", req.rid, worker,
                        now - req.handoff_since)
            sched.retry(req, f"its hand-off to {worker} stalled")
        if self._can_serve():
            self.unserveable_since = None
            return
        if self.unserveable_since is None:
            self.unserveable_since = now
        bound = self.config.unavailable_timeout_s
        for req in [r for r in sched.waiting if now - max(r.queued_at, self.unserveable_since) > bound]:
            sched.fail(req, P.ERR_UNAVAILABLE, f"no worker could serve the request for {bound:g}s "
                                               "(a prefill or decode worker is missing); start workers and retry")

    def _stalled(self, req: Request, now: float) -> bool:
        if req.handoff_since is None:
            return False
        if req.state is State.PREFILLING:
            since = max(req.handoff_since, req.prefill.last_progress)
            return now - since > self.config.prefill_stall_timeout_s
        return now - req.handoff_since > self.config.handoff_timeout_s

    def _can_serve(self) -> bool:
        roles = {w.role for w in self.scheduler.registry.alive()}
        return "both" in roles or {"prefill", "decode"} <= roles
