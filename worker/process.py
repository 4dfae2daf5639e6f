"""A worker process: ``run_worker`` spawns the TP group, builds rank 0's shard, connects to the
router, and runs the role's ``StepWorker`` on a uvloop event loop until SIGINT/SIGTERM or a
router ``Shutdown``.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import sys

from worker.options import WorkerOptions
from worker.runner import build_runner
from worker.tp_group import TPGroup

log = logging.getLogger("pdserve.worker")


def run_worker(opts: WorkerOptions, worker_cls, rank_main) -> int:
    """Run one worker until it is told to stop. ``worker_cls(opts, ctx, runner, group)`` is the
    role's ``StepWorker``; ``rank_main(ctx, options)`` runs on TP ranks 1..K-1. Returns the exit
    code (2 for a configuration error, printed as one line)."""
    logging.basicConfig(level=os.environ.get("PDSERVE_LOG", "INFO"),
                        format=f"%(asctime)s {opts.role}[{opts.worker_id[-6:]}] %(levelname)s %(message)s")
    group = TPGroup(opts.tp, rank_main, dataclasses.asdict(opts))
    worker = None
    try:
        ctx = group.join()
        worker = worker_cls(opts, ctx, build_runner(opts, ctx), group)
        try:
            import uvloop
            uvloop.run(_serve(worker, opts))
        except ImportError:
            asyncio.run(_serve(worker, opts))
        return 0
    except ValueError as exc:
        print(f"pdserve worker: {exc}", file=sys.stderr)
        return 2
    finally:
        if worker is not None:
            worker.close()
        else:
            group.stop(None)


async def _serve(worker, opts: WorkerOptions) -> None:
    from router import protocol as P
    from router.worker_link import WorkerLink

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    link = WorkerLink(opts.router, opts.worker_id, worker.info(), stats=worker.heartbeat_stats,
                      on_router_lost=worker.on_router_lost, heartbeat_s=opts.heartbeat_s,
                      curve_dir=opts.curve_dir)
    worker.link = link
    await link.connect()
    log.info("registered with router %s", opts.router)

    async def receive() -> None:
        while True:
            msg = await link.recv()
            if isinstance(msg, P.Shutdown):
                stop.set()
                return
            worker.handle(msg)

    tasks = [asyncio.create_task(receive()), asyncio.create_task(worker.step_loop())]
    tasks += [asyncio.create_task(t) for t in worker.background_tasks()]
    waiter = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
    for task in (waiter, *tasks):
        task.cancel()
    for task in done:
        if task is not waiter and not task.cancelled() and task.exception() is not None:
            log.error("worker task failed", exc_info=task.exception())
    await link.close()
