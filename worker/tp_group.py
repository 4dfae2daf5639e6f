"""The TP ranks of one worker: rank 0 spawns ranks 1..K-1 and drives them with step plans.

Every rank is its own process with its own model shard, KV pool shard and KV transport end.
Rank 0 owns the sockets; for each step it broadcasts a ``StepPlan`` (``broadcast``) and every
rank executes the same plan on its shard (``follow_plans``). Both roles use this module.

A rank that loses its parent dies with it (PR_SET_PDEATHSIG on Linux), so a SIGKILLed
worker never leaves shards running.

Under a cluster manager (the Ray launcher: one actor per rank) rank 0 spawns nothing: each
rank is its own ``pdserve worker --tp-rank R`` started by the manager, and all meet at the
rendezvous named by ``$PDSERVE_TP_INIT`` (``run_rank`` on ranks 1..K-1).
"""
from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import sys
import tempfile
from typing import Any, Callable

from models.parallel import ParallelContext, broadcast_plan, init_tensor_parallel
from worker.step_plan import STOP_PLAN, StepPlan

TP_INIT_ENV = "PDSERVE_TP_INIT"  # set: ranks 1..K-1 are started elsewhere and meet here


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def run_rank(rank_main: Callable[[ParallelContext, dict], None], rank: int, tp_size: int,
             init_method: str, options: dict) -> None:
    """Run TP rank ``rank`` (1..K-1) of a worker until rank 0 sends the stop plan."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 decides when the group stops
    ctx = init_tensor_parallel(rank, tp_size, init_method)
    try:
        rank_main(ctx, options)
    except ValueError as exc:  # a configuration error (rank 0 says it too): one line, as rank 0
        print(f"pdserve worker rank {rank}: {exc}\n", end="", file=sys.stderr, flush=True)  # one write
        sys.exit(2)


class TPGroup:
    """Rank 0's view of its worker's TP group.

    ``rank_main(ctx, options)`` runs on ranks 1..K-1 (a module-level function: it is
    imported by name in the spawned process); it should build its shard and then call
    ``follow_plans``. ``join()`` on rank 0 makes rank 0's own ``ParallelContext``.
    """

    def __init__(self, tp_size: int, rank_main: Callable[[ParallelContext, dict], None],
                 options: dict):
        if not isinstance(tp_size, int) or tp_size < 1:
            raise ValueError(f"--tp must be a positive integer, got {tp_size!r}")
        self.tp_size = tp_size
        self.processes: list[mp.Process] = []
        self._tmp = tempfile.mkdtemp(prefix="pdserve-tp-")
        self.init_method = f"file://{os.path.join(self._tmp, 'init')}"
        if tp_size > 1 and os.environ.get(TP_INIT_ENV):
            self.init_method = os.environ[TP_INIT_ENV]  # the manager started the other ranks
            return
        spawn = mp.get_context("spawn")
        for rank in range(1, tp_size):
            proc = spawn.Process(target=run_rank, name=f"pdserve-tp{rank}",
                                 args=(rank_main, rank, tp_size, self.init_method, options))
            proc.start()
            self.processes.append(proc)

    def join(self) -> ParallelContext:
        return init_tensor_parallel(0, self.tp_size, self.init_method) if self.tp_size > 1 \
            else ParallelContext()

    def dead_ranks(self) -> list[int]:
        return [i + 1 for i, p in enumerate(self.processes) if not p.is_alive()]

    def stop(self, ctx: ParallelContext | None, timeout: float = 5.0) -> None:
        """Tell the other ranks to exit (if they can still hear), then make sure they do."""
        if ctx is not None and ctx.world_size > 1 and not self.dead_ranks():
            try:
                broadcast(ctx, STOP_PLAN)
            except Exception:
                pass
        for proc in self.processes:
            proc.join(timeout)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout)
        try:
            os.unlink(os.path.join(self._tmp, "init"))
        except OSError:
            pass
        try:
            os.rmdir(self._tmp)
        except OSError:
            pass


def broadcast(ctx: ParallelContext, plan: StepPlan) -> StepPlan:
    """Rank 0: send ``plan`` to ranks 1..K-1 (nothing to send with TP=1)."""
    if ctx.world_size > 1:
        broadcast_plan(ctx, plan.to_wire())
    return plan


def follow_plans(ctx: ParallelContext, execute: Callable[[StepPlan], Any]) -> None:
    """Ranks 1..K-1: execute rank 0's plans until it sends the stop plan."""
    while True:
        plan = StepPlan.from_wire(broadcast_plan(ctx))
        if plan.stop:
            return
        execute(plan)
