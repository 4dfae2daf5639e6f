"""Rank 0 of a prefill worker: batches prompts into steps, moves each request's one state record
(``prefill.scheduler.PrefillRequest``) through its transitions, and says what to tell the router.

Every transition runs on the event-loop thread, is idempotent, and is valid in any order:
- ``add``: queued.
- ``build_plan``: a chunk of it goes in flight; its first chunk begins its transfer.
- ``apply``: the chunk is back; a request still wanted records it, and after its last chunk its
  first token (every rank is then finishing the transfer).
- ``settle(transfer_id, error)``: rank 0's transfer let go of the source blocks, done or failed.
- ``abort(rid)``: the router freed it (cancel, failover, finish) or the router was lost.
A request is answered at most once: ``Answer.first`` when its transfer settled fine after its
last chunk, ``Answer.error`` when its transfer failed first; a cancelled one gets nothing. Its
blocks are released once no step and no transfer uses them and it is answered or cancelled.
The model thread runs ``execute_plan`` only (``prefill.rank_step``) and never waits on the network.
"""
from __future__ import annotations

from typing import NamedTuple

from kvtransfer.allocator import BlockAllocator
from models.batch import SampleResult, SequenceChunk
from models.request_options import RequestOptions, StopRules
from models.runner import ModelRunner
from models.sampler import SamplingParams
from prefill.rank_step import RankTransfers, run_prefill_plan
from prefill.scheduler import (TRANSFER_NONE, TRANSFER_OPEN, TRANSFER_SETTLED, PrefillRequest,
                               PrefillScheduler, ScheduledChunk)
from worker import pause_points
from worker.step_plan import KVSend, PlanChunk, StepPlan

__all__ = ["Answer", "PrefillEngine", "RankTransfers", "run_prefill_plan"]


class Answer(NamedTuple):
    """What to tell the router about one request: its first token (``error`` None) or why it
    failed (``result`` None)."""
    request: PrefillRequest
    result: SampleResult | None
    finish_reason: str | None
    error: str | None


class PrefillEngine:
    def __init__(self, runner: ModelRunner, transfers: RankTransfers, *,
                 max_num_batched_tokens: int = 2048, max_num_seqs: int = 64):
        self.runner = runner
        self.transfers = transfers
        self.allocator = BlockAllocator(runner.num_blocks, runner.block_size)
        self.scheduler = PrefillScheduler(self.allocator, max_num_batched_tokens=max_num_batched_tokens,
                                          max_num_seqs=max_num_seqs)
        self._by_transfer: dict[str, PrefillRequest] = {}   # until released
        self._aborts: list[str] = []                         # transfer ids for the next plan
        self._in_flight: list[ScheduledChunk] = []
        self._answers: list[Answer] = []

    # -- transitions ----------------------------------------------------------------------
    def add(self, rid: str, transfer_id: str, token_ids: list[int], options: RequestOptions,
            dest: dict, output_index: int) -> None:
        """Queue a prompt. Raises ValueError for a malformed or duplicate request."""
        stop = StopRules.of(options, eos_token_ids=self.runner.config.eos_token_ids,
                            max_model_len=self.runner.max_model_len)
        if not token_ids or len(token_ids) >= self.runner.max_model_len:
            raise ValueError(f"a prompt of {len(token_ids)} tokens does not fit "
                             f"max model length {self.runner.max_model_len}")
        if transfer_id in self._by_transfer:
            raise ValueError(f"transfer {transfer_id} is already being prefilled")
        request = PrefillRequest(rid=rid, transfer_id=transfer_id, token_ids=list(token_ids),
                                 sampling=SamplingParams(**options.sampling_fields), dest=dest,
                                 output_index=output_index, stop=stop)
        self.scheduler.add(request)
        self._by_transfer[transfer_id] = request

    def abort(self, rid: str) -> list[Answer]:
        """The router is done with the request: stop it wherever it is. Idempotent."""
        request = self.scheduler.by_rid.get(rid)
        if request is not None and not request.cancelled:
            request.cancelled = True
            self.scheduler.remove_waiting(request)
            if request.transfer == TRANSFER_NONE:
                # No rank ever began writing: the decode side may reuse the blocks at once.
                try:
                    self.transfers.sender.reject(request.dest)
                except ValueError:
                    pass  # a malformed destination was never going to be written either
                request.transfer = TRANSFER_SETTLED
            elif request.transfer == TRANSFER_OPEN:
                self._abort_on_every_rank(request)
            self._advance(request)
        return self._take_answers()

    def build_plan(self) -> StepPlan | None:
        chunks = self.scheduler.schedule()
        if not chunks and not self._aborts:
            return None
        sends = []
        for c in chunks:
            r = c.request
            r.in_flight = True
            if r.transfer == TRANSFER_OPEN:
                sends.append(KVSend(r.transfer_id, False, c.is_last, c.start, c.end))
            else:
                # The first chunk also ships the blocks found in the prefix cache; the destination
                # holds blocks for the whole sequence, the prompt fills the first.
                sends.append(KVSend(r.transfer_id, True, c.is_last, 0, c.end, r.dest, r.block_ids,
                                    r.num_tokens))
                r.transfer = TRANSFER_OPEN
        plan_chunks = tuple(PlanChunk.of(SequenceChunk(c.request.token_ids[c.start:c.end], c.start,
                                                       c.request.block_ids,
                                                       c.request.sampling if c.is_last else None,
                                                       c.request.output_index)) for c in chunks)
        self._in_flight = chunks
        plan = StepPlan(plan_chunks, tuple(sends), tuple(self._aborts))
        self._aborts = []
        return plan

    def execute_plan(self, plan: StepPlan) -> dict:
        if pause_points.ENABLED:
            pause_points.pause_chunks(self._in_flight)
        return run_prefill_plan(self.runner, self.transfers, plan)

    def apply(self, output: dict) -> list[Answer]:
        """Book the step the model thread ran (``run_prefill_plan``'s output). The caller watches
        ``output["started"]`` (transfer id -> future) and calls ``settle`` when each resolves."""
        could_not_begin = dict(output["failed"])
        for chunk, result in zip(self._in_flight, output["results"]):
            request = chunk.request
            request.in_flight = False
            if request.transfer_id in could_not_begin:
                request.transfer = TRANSFER_SETTLED          # the decode side was told
                self._fail(request, could_not_begin[request.transfer_id])
            elif not request.cancelled and request.transfer_error is None:
                self.scheduler.complete(chunk)
                if chunk.is_last:
                    # The decode worker applies the same rules to the same token and frees itself.
                    reason = request.stop.check(result.token_id, request.output_index + 1,
                                                request.num_tokens + 1)
                    request.first = (result, reason)
            self._advance(request)
        self._in_flight = []
        return self._take_answers()

    def settle(self, transfer_id: str, error: str | None) -> list[Answer]:
        """Rank 0's transfer of ``transfer_id`` let go of its source blocks (``error`` None: the
        decode side has every layer and the first token). Idempotent."""
        request = self._by_transfer.get(transfer_id)
        if request is not None and request.transfer == TRANSFER_OPEN:
            request.transfer = TRANSFER_SETTLED
            if error is not None:
                self._fail(request, error)
            self._advance(request)
        return self._take_answers()

    # -- the record's invariants ----------------------------------------------------------
    def _fail(self, request: PrefillRequest, error: str) -> None:
        request.transfer_error = request.transfer_error or error
        self.scheduler.remove_waiting(request)
        self._abort_on_every_rank(request)   # other ranks' transfers may still be open

    def _abort_on_every_rank(self, request: PrefillRequest) -> None:
        if request.transfer_id not in self._aborts:
            self._aborts.append(request.transfer_id)

    def _advance(self, request: PrefillRequest) -> None:
        """Answer and release what the record's state allows (never while a chunk is in flight)."""
        if request.in_flight:
            return
        if (request.transfer == TRANSFER_SETTLED and request.first is None and not request.cancelled
                and request.transfer_error is None):
            self._fail(request, "the KV transfer ended before the prompt was computed")
        if not request.answered and not request.cancelled:
            if request.transfer_error is not None:
                self._answers.append(Answer(request, None, None, request.transfer_error))
                request.answered = True
            elif request.transfer == TRANSFER_SETTLED and request.first is not None:
                result, reason = request.first
                self._answers.append(Answer(request, result, reason, None))
                request.answered = True
        if (request.answered or request.cancelled) and request.transfer != TRANSFER_OPEN:
            self._by_transfer.pop(request.transfer_id, None)
            self.scheduler.release(request)

    def _take_answers(self) -> list[Answer]:
        answers, self._answers = self._answers, []
        return answers

    # -- queries ----------------------------------------------------------------------------
    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self._aborts)

    @property
    def num_requests(self) -> int:
        """Requests that still hold state here (queued, computing, or their KV on its way)."""
        return len(self._by_transfer)

    def stats(self) -> dict:
        return {"num_blocks": self.allocator.num_blocks, "free_blocks": self.allocator.num_free_blocks,
                "waiting": len(self.scheduler.waiting),
                "waiting_tokens": self.scheduler.num_waiting_tokens}
