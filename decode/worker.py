"""The decode worker process (role ``decode``), and the colocated worker (role ``both``).

Rank 0 runs an asyncio loop: router messages and KV completions are handled on the loop
thread, each model step runs on a single model thread (so socket I/O never waits on the
model), and one ``Tokens`` message per step carries every sequence's new token. Ranks
1..K-1 (``--tp K``) only follow rank 0's step plans on their own shard.
"""
from __future__ import annotations

import logging

from decode.engine import DecodeEngine, run_step_plan
from kvtransfer.allocator import NoFreeBlocks
from kvtransfer.transport import TransferDone
from models.parallel import ParallelContext
from models.request_options import RequestOptions
from router import protocol as P
from worker import pause_points
from worker.options import WorkerOptions
from worker.process import run_worker
from worker.runner import build_runner, restrict, worker_info
from worker.step_loop import StepWorker
from worker.tp_group import TPGroup, follow_plans

log = logging.getLogger("pdserve.decode")
RESERVATION_START_TIMEOUT_S = 600.0


def rank_main(ctx: ParallelContext, options: dict) -> None:
    """Ranks 1..K-1: build the shard, then execute rank 0's plans."""
    opts = WorkerOptions(**options)
    runner = build_runner(opts, ctx)
    receiver = None
    if opts.role == "decode":
        from decode.kv_receive import make_receiver
        receiver = make_receiver(opts, runner, ctx)
    try:
        follow_plans(ctx, lambda plan: run_step_plan(runner, plan))
    finally:
        if receiver is not None:
            receiver.close()
        runner.close()


class DecodeWorker(StepWorker):
    def __init__(self, opts: WorkerOptions, ctx: ParallelContext, runner, group: TPGroup):
        super().__init__(opts, ctx, group)
        self.engine = DecodeEngine(runner, colocated=opts.role == "both",
                                   max_num_seqs=opts.max_num_seqs,
                                   max_num_batched_tokens=opts.max_num_batched_tokens)
        self.receiver = self.coordinator = None
        self._rid_of: dict[str, str] = {}    # transfer id -> rid, while KV is on its way
        if opts.role == "decode":
            from decode.kv_receive import coordinator_endpoint, make_receiver
            from kvtransfer.coordinator import KVCoordinator
            # Time queued for prefill must not expire a reservation: its timeout runs from the
            # writer's start; a writer that dies first is reported (PeerDead) long before this.
            self.coordinator = KVCoordinator(self.engine.allocator, endpoint=coordinator_endpoint(opts),
                                             tp_size=ctx.world_size, start_timeout_s=RESERVATION_START_TIMEOUT_S)
            self.receiver = make_receiver(opts, runner, ctx)
            self.coordinator.wait_ready()
        self.num_tokens_messages = 0   # Tokens.step: counts the messages, not the model steps

    # -- router messages ------------------------------------------------------------------
    def handle(self, msg: P.Message) -> None:
        self._handle(msg)
        self.drain_kv_events()

    def _handle(self, msg: P.Message) -> None:
        if isinstance(msg, P.Allocate):
            self._allocate(msg)
        elif isinstance(msg, P.Prefill):
            try:
                self.engine.prefill_local(msg.rid, msg.transfer_id)
                self.wake.set()
            except ValueError as exc:
                self.link.send(P.WorkerError(msg.rid, msg.transfer_id, str(exc)))
        elif isinstance(msg, P.PeerDead):
            if self.coordinator is not None:
                self.coordinator.peer_dead(msg.worker_id)
        elif isinstance(msg, P.Free):
            self._free(msg.rid, published=msg.reason != P.FREE_UNWRITTEN)
            pause_points.note("free", msg.rid)

    def _allocate(self, msg: P.Allocate) -> None:
        token_ids = list(msg.token_ids)
        try:
            options = RequestOptions.from_wire(msg.sampling)
            if self.coordinator is None or msg.transport == "local":
                if self.coordinator is not None:
                    raise ValueError("a decode worker cannot prefill locally; route prefill elsewhere")
                self.engine.reserve(msg.rid, msg.transfer_id, token_ids, options, msg.output_index)
                dest = {"transport": "local", "transfer_id": msg.transfer_id}
            else:
                dest = self._reserve_remote(msg, token_ids, options)
        except (NoFreeBlocks, ValueError) as exc:
            self.link.send(P.Allocated(msg.rid, msg.transfer_id, None, str(exc)))
            return
        pause_points.pause("allocate", msg.rid)
        self.link.send(P.Allocated(msg.rid, msg.transfer_id, dest))

    def _reserve_remote(self, msg: P.Allocate, token_ids: list[int], options: RequestOptions) -> dict:
        # Blocks for the sequence's whole life; the prefill side writes the prompt's share.
        num_blocks = self.engine.decode_scheduler.num_blocks_needed(len(token_ids), options, msg.output_index)
        dest = self.coordinator.reserve(msg.transfer_id, num_blocks * self.engine.allocator.block_size,
                                        transport=msg.transport or None, writer=msg.writer or None)
        if dest is None:
            raise NoFreeBlocks(f"needs {num_blocks} KV blocks, "
                               f"{self.engine.allocator.num_free_blocks} free")
        try:
            self.engine.decode_scheduler.make_sequence(msg.rid, msg.transfer_id, token_ids, options,
                                             msg.output_index, list(dest["ranks"][0]["block_ids"]))
        except ValueError:
            self.coordinator.abort(msg.transfer_id)
            raise
        self._rid_of[msg.transfer_id] = msg.rid
        return dest

    def _free(self, rid: str, published: bool = True) -> None:
        seq = self.engine.decode_scheduler.by_rid.get(rid)
        if seq is not None and self.coordinator is not None and not seq.started:
            # KV may still be in flight: the coordinator quarantines the blocks until every
            # writer is done (or dead), then returns them to the allocator itself.
            self.engine.decode_scheduler.remove(rid)
            self._rid_of.pop(seq.transfer_id, None)
            self.coordinator.abort(seq.transfer_id, published=published)
            return
        self.engine.free(rid)

    async def kv_events(self) -> None:
        """Completions and failures of KV transfers, awaited (no polling in the step loop).

        The coordinator's socket is also used synchronously (reserve, abort), which can consume
        the edge-triggered wake-up of the awaiting poller; ``drain_kv_events`` after each such
        call and a bounded wait here make sure no event is left waiting.
        """
        while True:
            self.dispatch_kv_events(await self.coordinator.wait_events(timeout_s=0.05))

    def drain_kv_events(self) -> None:
        if self.coordinator is not None:
            self.dispatch_kv_events(self.coordinator.poll(0.0))

    def dispatch_kv_events(self, events) -> None:
        for event in events:
            rid = self._rid_of.pop(event.transfer_id, None)
            if rid is None:
                continue
            if isinstance(event, TransferDone):
                reason = self.engine.kv_arrived(event.transfer_id, rid, event.first_token_id)
                self.link.send(P.Started(rid, event.transfer_id))
                if reason is None:
                    self.wake.set()
            else:
                seq = self.engine.decode_scheduler.remove(rid)
                if seq is not None:
                    self.link.send(P.WorkerError(rid, event.transfer_id,
                                                 f"KV transfer failed: {event.reason}"))

    def queued_rid(self) -> str | None:
        scheduler = self.engine.prefill_scheduler
        return scheduler.first_unscheduled() if scheduler is not None else None

    def finishing_rid(self, out) -> str | None:
        for item in out.items:
            if item.finish_reason is not None:
                return item.rid
        return next((rid for rid, _, _, reason in out.first_tokens if reason is not None), None)

    def on_router_lost(self) -> None:
        """Abort everything: no one is left to stream the tokens to."""
        for rid in list(self.engine.decode_scheduler.by_rid):
            self._free(rid)

    def publish(self, out) -> None:
        for rid, transfer_id, result, reason in out.first_tokens:
            self.link.send(P.FirstToken(rid, transfer_id, result.token_id, result.logprob, reason,
                                        out.num_cached.get(rid, 0), result.top_logprobs))
        if out.items:
            self.num_tokens_messages += 1
            self.link.send(P.Tokens(self.opts.worker_id, self.num_tokens_messages,
                                    [item.to_wire() for item in out.items]))

    def info(self) -> dict:
        transports = {}
        if self.coordinator is not None:
            transports = restrict(self.coordinator.describe()["capabilities"], self.opts.kv_transport)
        return worker_info(self.opts, self.engine.runner, transports)

    def background_tasks(self) -> list:
        return {"the KV event listener": self.kv_events()} if self.coordinator is not None else {}

    def thread_health(self) -> str | None:
        if self.receiver is not None and not self.receiver.is_alive():
            return "the KV receiver thread stopped"
        return None

    def kv_stats(self) -> dict:
        if self.coordinator is None:
            return {}
        kv = self.coordinator.stats()
        return {"quarantined_blocks": kv.get("num_quarantined_blocks", 0),
                "kv_transfers_done": kv.get("transfers_done"), "kv_by_transport": kv.get("by_transport"),
                "kv_transfers_failed": kv.get("transfers_failed"),
                "reservations_expired": kv.get("reservations_expired")}

    def close_transport(self) -> None:
        if self.receiver is not None:
            self.receiver.close()
            self.coordinator.close()


def main(args) -> int:
    """Entry point of ``pdserve worker --role decode|both``."""
    return run_worker(WorkerOptions.from_args(args), DecodeWorker, rank_main)
