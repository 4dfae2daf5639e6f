"""Rank 0 of a decode worker (or a colocated ``both`` worker): reservations, continuous
batching, and the plan each step executes.

Threading: every method except ``execute_plan`` runs on the worker's event-loop thread and
owns the schedulers; ``execute_plan`` runs on the model thread and touches only the runner.
A sequence freed while it is part of the step in flight keeps its blocks until that step
has been applied, so the model thread never writes into blocks someone else now owns.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from decode.scheduler import DecodeScheduler
from decode.sequence import DecodeSequence
from kvtransfer.allocator import BlockAllocator, NoFreeBlocks
from models.batch import SampleResult, SequenceChunk
from models.request_options import RequestOptions
from models.runner import ModelRunner
from prefill.scheduler import PrefillRequest, PrefillScheduler, ScheduledChunk
from router.payloads import TokenItem
from worker import pause_points
from worker.step_plan import PlanChunk, StepPlan


def run_step_plan(runner: ModelRunner, plan: StepPlan) -> list[SampleResult | None]:
    """Every rank: run the plan's chunks through the model (rank 0's results count)."""
    return runner.step(plan.sequence_chunks())


@dataclass
class StepOutput:
    items: list[TokenItem] = field(default_factory=list)          # -> Tokens
    # -> FirstToken: (rid, transfer_id, result, finish_reason)
    first_tokens: list[tuple[str, str, SampleResult, str | None]] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)             # rids whose blocks were freed
    num_cached: dict[str, int] = field(default_factory=dict)      # rid -> prefix-cache hit tokens


class DecodeEngine:
    def __init__(self, runner: ModelRunner, *, colocated: bool, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 2048):
        self.runner = runner
        self.colocated = colocated
        self.allocator = BlockAllocator(runner.num_blocks, runner.block_size,
                                        enable_prefix_cache=colocated)
        self.decode_scheduler = DecodeScheduler(self.allocator, max_model_len=runner.max_model_len,
                                      eos_token_ids=runner.config.eos_token_ids,
                                      max_num_seqs=max_num_seqs)
        self.prefill_scheduler = PrefillScheduler(self.allocator, max_num_batched_tokens=max_num_batched_tokens,
                                        max_num_seqs=max_num_seqs) if colocated else None
        self._in_flight: set[str] = set()
        self._deferred: list[list[int]] = []
        self._plan_state: tuple[list[DecodeSequence], list[ScheduledChunk]] | None = None

    # -- reservations (event-loop thread) ----------------------------------------------
    def reserve(self, rid: str, transfer_id: str, token_ids: list[int], options: RequestOptions,
                output_index: int) -> DecodeSequence:
        """Reserve blocks for a request's whole life. Raises NoFreeBlocks or ValueError."""
        num_blocks = self.decode_scheduler.num_blocks_needed(len(token_ids), options, output_index)
        hit: list[int] = []
        if self.colocated:
            hit = self.allocator.match_prefix(token_ids[:len(token_ids) - 1])
        if not self.allocator.can_allocate(num_blocks - len(hit)):
            self.allocator.free(hit)
            raise NoFreeBlocks(f"needs {num_blocks} blocks, {self.allocator.num_free_blocks} free")
        block_ids = hit + self.allocator.allocate(num_blocks - len(hit))
        try:
            seq = self.decode_scheduler.make_sequence(rid, transfer_id, token_ids, options, output_index, block_ids)
        except ValueError:
            self.allocator.free(block_ids)
            raise
        seq.num_prefix_hit = len(hit) * self.allocator.block_size
        return seq

    def prefill_local(self, rid: str, transfer_id: str) -> None:
        """Colocated: compute the reserved sequence's prompt KV into its own blocks."""
        seq = self.decode_scheduler.by_rid.get(rid)
        if seq is None or seq.transfer_id != transfer_id or self.prefill_scheduler is None:
            raise ValueError(f"no reservation {transfer_id} for request {rid} on this worker")
        num_hit = seq.num_prefix_hit
        request = PrefillRequest(rid=rid, transfer_id=transfer_id, token_ids=seq.token_ids[:],
                                 sampling=seq.sampling, dest={"transport": "local"},
                                 output_index=seq.output_index, block_ids=seq.block_ids,
                                 num_computed=num_hit, num_prefix_hit=num_hit)
        self.prefill_scheduler.add(request)

    def kv_arrived(self, transfer_id: str, rid: str, first_token: int) -> str | None:
        """Disaggregated: the sequence's KV landed; returns a finish reason if already done."""
        seq = self.decode_scheduler.by_rid.get(rid)
        if seq is None or seq.transfer_id != transfer_id or seq.started:
            return None
        reason = self.decode_scheduler.start(seq, first_token)
        if reason is not None:
            self.free(rid)
        return reason

    def free(self, rid: str) -> bool:
        """Forget a request (finish or abort) and release its blocks once no step uses them."""
        seq = self.decode_scheduler.remove(rid)
        if self.prefill_scheduler is not None:
            self.prefill_scheduler.abort(rid)
            self.prefill_scheduler.by_rid.pop(rid, None)
        if seq is None:
            return False
        if rid in self._in_flight:
            self._deferred.append(seq.block_ids)
        else:
            self.allocator.free(seq.block_ids)
        seq.block_ids = []
        return True

    # -- steps -------------------------------------------------------------------------
    def has_work(self) -> bool:
        return bool(self.decode_scheduler.running) or (self.prefill_scheduler is not None and self.prefill_scheduler.has_work())

    def build_plan(self) -> StepPlan | None:
        seqs, chunks = self.decode_scheduler.schedule()
        prefill_chunks: list[ScheduledChunk] = []
        if self.prefill_scheduler is not None and self.prefill_scheduler.has_work():
            budget = self.prefill_scheduler.max_num_batched_tokens
            self.prefill_scheduler.max_num_batched_tokens = max(budget - len(chunks), self.allocator.block_size)
            try:
                prefill_chunks = self.prefill_scheduler.schedule()
            finally:
                self.prefill_scheduler.max_num_batched_tokens = budget
            for pc in prefill_chunks:
                r = pc.request
                chunks.append(SequenceChunk(r.token_ids[pc.start:pc.end], pc.start, r.block_ids,
                                            r.sampling if pc.is_last else None, r.output_index))
        if not chunks:
            return None
        self._plan_state = (seqs, prefill_chunks)
        self._in_flight = {s.rid for s in seqs} | {pc.request.rid for pc in prefill_chunks}
        return StepPlan(tuple(PlanChunk.of(c) for c in chunks))

    def execute_plan(self, plan: StepPlan) -> list[SampleResult | None]:
        if pause_points.ENABLED:   # the model thread: _plan_state is set until apply
            seqs, prefill_chunks = self._plan_state
            pause_points.pause_chunks(prefill_chunks)
            if seqs:
                pause_points.pause("decoding", seqs[0].rid)
        return run_step_plan(self.runner, plan)

    def apply(self, results: list[SampleResult | None]) -> StepOutput:
        seqs, prefill_chunks = self._plan_state
        self._plan_state = None
        out = StepOutput()
        finished_first: list[str] = []
        out.items = self.decode_scheduler.update(seqs, results[:len(seqs)])
        for pc, result in zip(prefill_chunks, results[len(seqs):]):
            rid = pc.request.rid
            if self.prefill_scheduler.by_rid.get(rid) is not pc.request:
                continue  # freed while its chunk ran
            self.prefill_scheduler.complete(pc)
            if pc.is_last:
                self.prefill_scheduler.by_rid.pop(rid, None)  # blocks belong to the decode sequence
                reason = self.decode_scheduler.start(self.decode_scheduler.by_rid[rid], result.token_id)
                out.first_tokens.append((rid, pc.request.transfer_id, result, reason))
                out.num_cached[rid] = pc.request.num_prefix_hit
                if reason is not None:
                    finished_first.append(rid)
        self._in_flight = set()
        for block_ids in self._deferred:
            self.allocator.free(block_ids)
        self._deferred.clear()
        done = [item.rid for item in out.items if item.finish_reason is not None] + finished_first
        for rid in done:
            self.free(rid)
        out.finished = done
        return out

    def stats(self) -> dict:
        return {
            "num_blocks": self.allocator.num_blocks,
            "free_blocks": self.allocator.num_free_blocks,
            "running": self.decode_scheduler.num_running,
            "reserved": len(self.decode_scheduler.by_rid) - self.decode_scheduler.num_running,
            "waiting_tokens": self.prefill_scheduler.num_waiting_tokens if self.prefill_scheduler else 0,
        }
