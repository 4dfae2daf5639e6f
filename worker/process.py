"""A worker process: ``run_worker`` spawns the TP group, builds rank 0's shard, connects to the
router, and runs the role's ``StepWorker`` on a uvloop event loop until SIGINT/SIGTERM or a
router ``Shutdown``.

Crash = exit: an exception escaping the step loop (the model thread's included), the router
link or a background task, a TP rank that exits, or a KV thread that stops ends the process with
exit code 1 and one line on stderr saying why. A worker never lingers alive but useless; its
supervisor restarts it and the router fails its requests over.
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
EXIT_CONFIG = 2     # a configuration error, before serving
EXIT_CRASH = 1      # something failed while serving


class WorkerCrashed(RuntimeError):
    """Why a serving worker must exit (one line)."""


def run_worker(opts: WorkerOptions, worker_cls, rank_main) -> int:
    """Run one worker until it is told to stop. ``worker_cls(opts, ctx, runner, group)`` is the
    role's ``StepWorker``; ``rank_main(ctx, options)`` runs on TP ranks 1..K-1. Returns the exit
    code: 0 after a clean stop, EXIT_CONFIG or EXIT_CRASH with one line on stderr."""
    logging.basicConfig(level=os.environ.get("PDSERVE_LOG", "INFO"),
                        format=f"%(asctime)s {opts.role}[{opts.worker_id[-6:]}] %(levelname)s %(message)s")
    from router.worker_link import check_admission
    try:
        check_admission(opts.router, opts.curve_dir)  # before the ranks start and the model loads
    except ValueError as exc:
        _config_error(exc)
        return EXIT_CONFIG
    group = TPGroup(opts.tp, rank_main, dataclasses.asdict(opts))
    worker = None
    try:
        ctx = group.join()
        worker = worker_cls(opts, ctx, build_runner(opts, ctx), group)
        try:
            import uvloop
            run = uvloop.run
        except ImportError:
            run = asyncio.run
        run(_serve(worker, opts))
    except WorkerCrashed as exc:
        print(f"pdserve worker {opts.worker_id} exits: {exc}", file=sys.stderr, flush=True)
        try:
            worker.close(wait=False)   # the model thread may be stuck: do not wait for it
        finally:
            logging.shutdown()
            os._exit(EXIT_CRASH)      # no stuck thread may keep a crashed worker alive
    except ValueError as exc:
        _config_error(exc)
        if worker is not None:
            worker.close()
        else:
            group.stop(None)
        return EXIT_CONFIG
    except BaseException:
        if worker is not None:
            worker.close(wait=False)
        else:
            group.stop(None)
        raise
    worker.close()
    return 0


def _config_error(exc: ValueError) -> None:
    # One write per line: a TP group's ranks share stderr, and print() writes the text and its
    # newline apart, so two ranks' lines could interleave.
    print(f"pdserve worker: {exc}\n", end="", file=sys.stderr, flush=True)


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

    async def watch_health() -> None:
        while True:
            await asyncio.sleep(opts.heartbeat_s)
            reason = worker.health()
            if reason is not None:
                raise WorkerCrashed(reason)

    tasks = {"the router link": receive(), "the step loop": worker.step_loop(),
             "the health watch": watch_health()}
    tasks.update(worker.background_tasks())
    running = {asyncio.create_task(coro): name for name, coro in tasks.items()}
    waiter = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([waiter, *running], return_when=asyncio.FIRST_COMPLETED)
    for task in (waiter, *running):
        task.cancel()
    await link.close()
    for task in done:
        if task is waiter or task.cancelled() or task.exception() is None:
            continue
        exc = task.exception()
        if not isinstance(exc, WorkerCrashed):
            log.error("%s failed", running[task], exc_info=exc)
            cause = await _health_cause(worker)
            if cause is not None:  # e.g. a collective broken by a TP rank that died first
                raise WorkerCrashed(cause)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WorkerCrashed(f"{running[task]} failed: {reason}" if not isinstance(exc, WorkerCrashed)
                            else reason)


async def _health_cause(worker, within_s: float = 1.0) -> str | None:
    """The health reason (a dead TP rank, a stopped thread) that may explain a failure, given
    ``within_s`` to show: a rank's process is reaped a moment after its sockets close."""
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        reason = worker.health()
        if reason is not None or asyncio.get_running_loop().time() >= deadline:
            return reason
        await asyncio.sleep(0.05)
