"""What every worker role shares: its options, building its model shard, and running rank 0.

``run_worker`` spawns the TP group, builds rank 0's shard, connects to the router, and runs
the role's worker object on a uvloop event loop until SIGINT/SIGTERM or a router Shutdown.
A role's worker object provides ``handle(msg)``, ``step_loop()``, ``stats()``,
``on_router_lost()`` and ``close()``.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import socket
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from models.parallel import ParallelContext, broadcast_plan

log = logging.getLogger("pdserve.worker")

ROLES = ("prefill", "decode", "both")
TRANSPORTS = ("auto", "zmq", "shm", "nixl")


@dataclass(frozen=True)
class WorkerOptions:
    role: str
    router: str
    model: str
    tp: int = 1
    dtype: str = "auto"
    device: str = "cpu"
    max_model_len: int | None = None
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_memory: int | None = None          # bytes of KV pool per rank
    kv_transport: str = "auto"
    worker_id: str = ""
    curve_dir: str | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    heartbeat_s: float = 0.5
    kv_dir: str | None = None             # where ipc:// KV endpoints live

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"--role must be one of {ROLES}, got {self.role!r}")
        if self.kv_transport not in TRANSPORTS:
            raise ValueError(f"--kv-transport must be one of {TRANSPORTS}, got {self.kv_transport!r}")
        if not isinstance(self.tp, int) or self.tp < 1:
            raise ValueError(f"--tp must be a positive integer, got {self.tp!r}")
        if self.num_kv_blocks is not None and self.kv_memory is not None:
            raise ValueError("give --num-kv-blocks or --kv-memory, not both")
        if not self.worker_id:
            object.__setattr__(self, "worker_id", f"{self.role}-{socket.gethostname()}-"
                                                  f"{os.getpid()}-{uuid.uuid4().hex[:6]}")

    @classmethod
    def from_args(cls, args) -> "WorkerOptions":
        names = {f.name for f in dataclasses.fields(cls)}
        values = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
        from models.registry import resolve_model

        values["model"] = str(resolve_model(values.get("model")))
        return cls(**values)


class StepWorker:
    """Rank 0's step loop, shared by every role: plan on the event-loop thread, execute on the
    single model thread (after broadcasting the plan to the other ranks), then ``publish`` the
    applied result from the loop thread. A role sets ``self.engine`` (``build_plan``,
    ``execute_plan``, ``apply``) and implements ``publish``."""

    def __init__(self, opts: WorkerOptions, ctx: ParallelContext, group):
        self.opts = opts
        self.ctx = ctx
        self.group = group
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="pdserve-model")
        self.wake = asyncio.Event()
        self.link = None
        self.engine = None

    def _execute(self, plan: dict):
        broadcast_plan(self.ctx, plan)
        return self.engine.execute_plan(plan)

    async def step_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            plan = self.engine.build_plan()
            if plan is None:
                self.wake.clear()
                await self.wake.wait()
                continue
            output = await loop.run_in_executor(self.model_thread, self._execute, plan)
            self.publish(self.engine.apply(output))

    def publish(self, applied) -> None:
        raise NotImplementedError

    def close_transport(self) -> None:
        """Release the role's KV transport end (before the TP group and the pool go)."""

    def close(self) -> None:
        self.model_thread.shutdown(wait=True)
        self.close_transport()
        self.group.stop(self.ctx)
        self.engine.runner.close()


def build_runner(opts: WorkerOptions, ctx: ParallelContext):
    """This rank's model shard and KV pool. A CPU decode pool lives in shared memory so a
    prefill worker on this host can write straight into it."""
    import torch

    from models.runner import ModelRunner

    device = opts.device
    if device == "cuda" and ctx.world_size > 1:
        device = f"cuda:{torch.cuda.current_device()}"
    on_cuda = str(device).startswith("cuda")
    backend = "cuda" if on_cuda else ("shm" if opts.role == "decode" else "heap")
    torch.set_num_threads(num_threads(opts))
    return ModelRunner(opts.model, dtype=opts.dtype, device=device, tp=ctx,
                       block_size=opts.block_size, num_blocks=opts.num_kv_blocks,
                       kv_budget_bytes=opts.kv_memory, pool_backend=backend,
                       max_model_len=opts.max_model_len)


def num_threads(opts: WorkerOptions) -> int:
    """Threads for this rank's matmuls. The launcher knows how many worker processes share
    the host and says so in PDSERVE_NUM_THREADS; oversubscribed cores make small ops crawl."""
    value = os.environ.get("PDSERVE_NUM_THREADS")
    if value:
        try:
            return max(1, int(value))
        except ValueError:
            raise ValueError(f"PDSERVE_NUM_THREADS must be an integer, got {value!r}") from None
    return max(1, (os.cpu_count() or 1) // opts.tp)


def worker_info(opts: WorkerOptions, runner, transports: dict) -> dict:
    from models.config import model_fingerprint

    return {
        "role": opts.role,
        "tp_size": opts.tp,
        "kv_spec": runner.kv_spec.to_dict(),
        "fingerprint": model_fingerprint(opts.model),
        "model": os.path.basename(os.path.normpath(opts.model)),
        "model_dir": str(opts.model),
        "transports": transports,
        "max_model_len": runner.max_model_len,
        "num_blocks": runner.num_blocks,
        "block_size": runner.block_size,
        "vocab_size": runner.config.vocab_size,
        "eos_token_ids": list(runner.config.eos_token_ids),
        "pid": os.getpid(),
        "host": socket.gethostname(),
    }


def run_worker(opts: WorkerOptions, worker_cls, rank_main) -> int:
    from prefill.tp_group import TPGroup

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
    link = WorkerLink(opts.router, opts.worker_id, worker.info(), stats=worker.stats,
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
