"""Rank 0's step loop, shared by every role.

Threads and ownership (see docs/architecture.md): the event-loop thread owns the router link,
the role's engine and its schedulers; it plans each step (``engine.build_plan``), hands the
plan to the single model thread, and books the result (``engine.apply``) when the model thread
returns it. The model thread broadcasts the plan to TP ranks 1..K-1 and runs it
(``engine.execute_plan``); it touches only the runner, the pool and the role's KV send side.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from models.parallel import ParallelContext
from router.payloads import HeartbeatStats
from worker import pause_points
from worker.options import WorkerOptions
from worker.step_plan import StepPlan
from worker.tp_group import TPGroup, broadcast


class StepWorker:
    """A role's worker on rank 0. A role sets ``self.engine`` (``build_plan() -> StepPlan | None``,
    ``execute_plan(plan)``, ``apply(output)``, ``stats() -> dict``) and implements ``publish``,
    ``handle``, ``info``, ``on_router_lost``; it may add ``background_tasks``, ``kv_stats``
    and ``thread_health``."""

    def __init__(self, opts: WorkerOptions, ctx: ParallelContext, group: TPGroup):
        self.opts = opts
        self.ctx = ctx
        self.group = group
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="pdserve-model")
        self.wake = asyncio.Event()
        self.link = None
        self.engine = None
        # Liveness from progress: steps completed (monotonic) and whether a step is planned or
        # running. Work with a frozen count means a stuck worker.
        self.num_steps = 0
        self.has_work = False

    def _execute(self, plan: StepPlan):
        broadcast(self.ctx, plan)
        return self.engine.execute_plan(plan)

    async def step_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if pause_points.ENABLED:
                rid = self.queued_rid()
                if rid is not None:
                    await pause_points.pause_async("prefill_queued", rid)
            plan = self.engine.build_plan()
            if plan is None:
                self.has_work = False
                self.wake.clear()
                await self.wake.wait()
                continue
            self.has_work = True
            output = await loop.run_in_executor(self.model_thread, self._execute, plan)
            self.num_steps += 1
            applied = self.engine.apply(output)
            if pause_points.ENABLED:
                rid = self.finishing_rid(applied)
                if rid is not None:
                    await pause_points.pause_async("finishing", rid)
            self.publish(applied)
            self.after_step(output)

    def publish(self, applied) -> None:
        raise NotImplementedError

    def queued_rid(self) -> str | None:
        """A prompt queued here that no step has run yet (the ``prefill_queued`` pause point)."""
        return None

    def finishing_rid(self, applied) -> str | None:
        """A request the applied step ended (the ``finishing`` pause point)."""
        return None

    def after_step(self, output) -> None:
        """Called with each step's raw output once it is applied and published."""

    def background_tasks(self) -> dict:
        """Coroutines that run beside the step loop, by name (e.g. a KV event listener)."""
        return {}

    def thread_health(self) -> str | None:
        """None when the role's own threads are fine, else a one-line reason."""
        return None

    def health(self) -> str | None:
        dead = self.group.dead_ranks()
        if dead:
            return f"TP rank(s) {dead} exited"
        return self.thread_health()

    def heartbeat_stats(self) -> dict:
        """The heartbeat's stats: the engine's load plus step progress and health."""
        stats = HeartbeatStats(**self.engine.stats(), num_steps=self.num_steps, has_work=self.has_work,
                               health=self.health(), kv=self.kv_stats())
        return stats.to_wire()

    def kv_stats(self) -> dict:
        """The role's KV transport counters (shown in status replies)."""
        return {}

    def close_transport(self) -> None:
        """Release the role's KV transport end (before the TP group and the pool go)."""

    def close(self, wait: bool = True) -> None:
        """Stop the model thread (``wait=False`` after a crash: it may be stuck) and release
        the transport, the TP group and the pool."""
        self.model_thread.shutdown(wait=wait, cancel_futures=True)
        self.close_transport()
        self.group.stop(self.ctx)
        self.engine.runner.close()
