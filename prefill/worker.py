"""The prefill worker process (role ``prefill``).

Rank 0 runs an asyncio loop: ``Prefill`` messages queue prompts, each model step runs on a
single model thread while the loop keeps serving sockets, and every finished prompt is
reported to the router as ``FirstToken`` (the KV and the first token have gone to the decode
worker's reserved blocks by then). Ranks 1..K-1 follow rank 0's plans on their own shard and
push their own kv-head shard of every layer.
"""
from __future__ import annotations

import asyncio
import logging
from functools import partial

from models.parallel import ParallelContext
from models.request_options import RequestOptions
from prefill.engine import Answer, PrefillEngine, RankTransfers, run_prefill_plan
from router import protocol as P
from worker import pause_points
from worker.options import WorkerOptions
from worker.process import run_worker
from worker.runner import build_runner, restrict, worker_info
from worker.step_loop import StepWorker
from worker.tp_group import TPGroup, follow_plans

log = logging.getLogger("pdserve.prefill")


def _make_transfers(opts: WorkerOptions, runner, ctx: ParallelContext) -> RankTransfers:
    from kvtransfer.sender import KVSender
    # The kv_in_flight pause point (worker/pause_points.py) holds the sender thread mid-transfer.
    after_layers = partial(pause_points.pause, "kv_in_flight") if "kv_in_flight" in pause_points.ARMED else None
    return RankTransfers(KVSender(runner.pool, sender_id=opts.worker_id, rank=ctx.rank,
                                  tp_size=ctx.world_size, after_layers=after_layers))


def rank_main(ctx: ParallelContext, options: dict) -> None:
    """Ranks 1..K-1: build the shard and its sender, then execute rank 0's plans."""
    opts = WorkerOptions(**options)
    runner = build_runner(opts, ctx)
    transfers = _make_transfers(opts, runner, ctx)
    try:
        follow_plans(ctx, lambda plan: run_prefill_plan(runner, transfers, plan))
    finally:
        transfers.close()
        runner.close()


class PrefillWorker(StepWorker):
    def __init__(self, opts: WorkerOptions, ctx: ParallelContext, runner, group: TPGroup):
        super().__init__(opts, ctx, group)
        self.transfers = _make_transfers(opts, runner, ctx)
        self.engine = PrefillEngine(runner, self.transfers,
                                    max_num_batched_tokens=opts.max_num_batched_tokens,
                                    max_num_seqs=opts.max_num_seqs)

    def info(self) -> dict:
        caps = restrict(self.transfers.sender.capabilities(), self.opts.kv_transport)
        return worker_info(self.opts, self.engine.runner, caps)

    def handle(self, msg: P.Message) -> None:
        if isinstance(msg, P.Prefill):
            try:
                self.engine.add(msg.rid, msg.transfer_id, list(msg.token_ids),
                                RequestOptions.from_wire(msg.sampling), msg.dest, msg.output_index)
            except ValueError as exc:
                self.link.send(P.WorkerError(msg.rid, msg.transfer_id, str(exc)))
                return
            self.wake.set()
        elif isinstance(msg, P.Free):
            self.publish(self.engine.abort(msg.rid))
            pause_points.note("free", msg.rid)
            self.wake.set()

    def queued_rid(self) -> str | None:
        return self.engine.scheduler.first_unscheduled()

    def on_router_lost(self) -> None:
        for rid in list(self.engine.scheduler.by_rid):
            self.publish(self.engine.abort(rid))
        self.wake.set()

    def publish(self, answers: list[Answer]) -> None:
        for answer in answers:
            request = answer.request
            if answer.error is None:
                self.link.send(P.FirstToken(request.rid, request.transfer_id, answer.result.token_id,
                                            answer.result.logprob, answer.finish_reason,
                                            request.num_prefix_hit, answer.result.top_logprobs))
            else:
                self.link.send(P.WorkerError(request.rid, request.transfer_id, answer.error))

    def after_step(self, output: dict) -> None:
        # Rank 0's transfers resolve on the sender thread; their outcome is booked on the loop.
        loop = asyncio.get_running_loop()

        def notify(future, transfer_id: str) -> None:
            if not loop.is_closed():      # after shutdown nobody is left to tell
                loop.call_soon_threadsafe(self._transfer_settled, transfer_id, future)

        for transfer_id, future in output["started"].items():
            future.add_done_callback(lambda fut, tid=transfer_id: notify(fut, tid))

    def _transfer_settled(self, transfer_id: str, future) -> None:
        error = future.exception()
        self.publish(self.engine.settle(transfer_id, None if error is None else str(error)))
        self.wake.set()   # its blocks may be free now

    def kv_stats(self) -> dict:
        return self.transfers.sender.stats()

    def thread_health(self) -> str | None:
        return None if self.transfers.sender.is_alive() else "the KV sender thread stopped"

    def close_transport(self) -> None:
        self.transfers.close()


def main(args) -> int:
    """Entry point of ``pdserve worker --role prefill``."""
    return run_worker(WorkerOptions.from_args(args), PrefillWorker, rank_main)
