"""Rank 0 of a prefill worker: batches prompts into steps and streams each layer's K/V out.

Every rank executes the same plan (``run_prefill_plan``) on its own shard: it runs the
chunks through its model and, from the runner's per-layer hook, pushes that layer's K/V for
every chunk's blocks to the destination the decode worker reserved. A request's local
blocks are released only once every rank's transfer has let go of them: ranks wait for the
transfers that finish (or abort) in a step before reporting the step done.
"""
from __future__ import annotations

from kvtransfer.allocator import BlockAllocator
from models.batch import SequenceChunk
from models.request_options import RequestOptions, StopRules
from models.runner import ModelRunner
from models.sampler import SamplingParams
from prefill.scheduler import PrefillRequest, PrefillScheduler, ScheduledChunk
from worker.step_plan import KVSend, PlanChunk, StepPlan


class RankTransfers:
    """One rank's transfers in progress, by transfer id (each rank sends its own shard)."""

    def __init__(self, sender, wait_timeout_s: float = 30.0):
        self.sender = sender
        self.wait_timeout_s = wait_timeout_s
        self.active: dict = {}

    def close(self) -> None:
        for transfer in self.active.values():
            transfer.abort("prefill worker shutting down")
        self.active.clear()
        self.sender.close()


def run_prefill_plan(runner: ModelRunner, transfers: RankTransfers, plan: StepPlan) -> dict:
    """Every rank: abort, begin, compute with layer-wise sends, finish and wait.

    Finished and aborted transfers are waited for before returning, so once rank 0 has the
    step's result no rank reads those source blocks any more and they can be reused.
    Returns ``{"results": [...], "failed": [[transfer_id, reason], ...]}``.
    """
    failed: list[list[str]] = []
    for transfer_id in plan.aborts:
        transfer = transfers.active.pop(transfer_id, None)
        if transfer is not None:
            transfer.abort()
            _settle(transfer, transfers.wait_timeout_s)
    sends = plan.sends
    for send in sends:
        if send.begin:
            try:
                transfers.active[send.transfer_id] = transfers.sender.start(send.dest, send.src,
                                                                            send.num_tokens)
            except ValueError as exc:
                failed.append([send.transfer_id, str(exc)])

    def on_layer_done(layer: int) -> None:
        for send in sends:
            transfer = transfers.active.get(send.transfer_id)
            if transfer is not None:
                transfer.send_layer(layer, send.start, send.stop)

    results = runner.step(plan.sequence_chunks(), on_layer_done)
    for send, result in zip(sends, results):
        transfer = transfers.active.get(send.transfer_id) if send.last else None
        if transfer is None:
            continue
        del transfers.active[send.transfer_id]
        transfer.finish(result.token_id, result.logprob)
        error = _settle(transfer, transfers.wait_timeout_s)
        if error is not None:
            failed.append([send.transfer_id, error])
    return {"results": results, "failed": failed}


def _settle(transfer, timeout_s: float) -> str | None:
    try:
        transfer.wait(timeout_s)
    except TimeoutError:
        transfer.abort("timed out")
        return f"KV transfer did not finish within {timeout_s}s"
    except Exception as exc:    # TransferError: the decode side refused, died or expired it
        return str(exc)
    return None


class PrefillEngine:
    def __init__(self, runner: ModelRunner, transfers: RankTransfers, *,
                 max_num_batched_tokens: int = 2048, max_num_seqs: int = 64):
        self.runner = runner
        self.transfers = transfers
        self.allocator = BlockAllocator(runner.num_blocks, runner.block_size)
        self.scheduler = PrefillScheduler(self.allocator, max_num_batched_tokens=max_num_batched_tokens,
                                          max_num_seqs=max_num_seqs)
        self._aborts: list[str] = []        # transfer ids to abort in the next plan
        self._plan_aborts: list[str] = []   # ... and in the plan in flight
        self._in_flight: list[ScheduledChunk] = []
        self._sending: dict[str, PrefillRequest] = {}   # transfer_id -> request, until released

    def add(self, rid: str, transfer_id: str, token_ids: list[int], options: RequestOptions,
            dest: dict, output_index: int) -> None:
        """Queue a prompt. Raises ValueError for a malformed request."""
        stop = StopRules.of(options, eos_token_ids=self.runner.config.eos_token_ids,
                            max_model_len=self.runner.max_model_len)
        if not token_ids or len(token_ids) >= self.runner.max_model_len:
            raise ValueError(f"a prompt of {len(token_ids)} tokens does not fit "
                             f"max model length {self.runner.max_model_len}")
        request = PrefillRequest(rid=rid, transfer_id=transfer_id, token_ids=list(token_ids),
                                 sampling=SamplingParams(**options.sampling_fields), dest=dest, output_index=output_index, stop=stop)
        self.scheduler.add(request)

    def abort(self, rid: str) -> None:
        request = self.scheduler.abort(rid)
        if request is None:
            return
        if request.transfer_id in self._sending:
            self._aborts.append(request.transfer_id)   # every rank stops its transfer first
            return
        # No rank ever started writing: the decode side may reuse the blocks at once.
        try:
            self.transfers.sender.reject(request.dest)
        except ValueError:
            pass  # a malformed destination was never going to be written either
        self.scheduler.release(request)

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self._aborts)

    def build_plan(self) -> StepPlan | None:
        chunks = self.scheduler.schedule()
        if not chunks and not self._aborts:
            return None
        sends = []
        for c in chunks:
            r = c.request
            if r.transfer_id in self._sending:
                sends.append(KVSend(r.transfer_id, False, c.is_last, c.start, c.end))
            else:
                # The first chunk also ships the blocks found in the prefix cache; the destination
                # holds blocks for the whole sequence, the prompt fills the first.
                sends.append(KVSend(r.transfer_id, True, c.is_last, 0, c.end, r.dest, r.block_ids,
                                    r.num_tokens))
                self._sending[r.transfer_id] = r
        plan_chunks = tuple(PlanChunk.of(SequenceChunk(c.request.token_ids[c.start:c.end], c.start,
                                                       c.request.block_ids,
                                                       c.request.sampling if c.is_last else None,
                                                       c.request.output_index)) for c in chunks)
        self._in_flight = chunks
        plan = StepPlan(plan_chunks, tuple(sends), tuple(self._aborts))
        self._plan_aborts, self._aborts = self._aborts, []
        return plan

    def execute_plan(self, plan: StepPlan) -> dict:
        return run_prefill_plan(self.runner, self.transfers, plan)

    def apply(self, output: dict) -> tuple[list, list]:
        """Book the step. Returns (finished, failed): ``(request, first token, finish reason)``
        for each prompt whose KV has landed, ``(request, reason)`` for each failed transfer."""
        failed_ids = dict(output["failed"])
        finished, failed = [], []
        for chunk, result in zip(self._in_flight, output["results"]):
            request = chunk.request
            error = failed_ids.get(request.transfer_id)
            if self.scheduler.by_rid.get(request.rid) is not request or error is not None:
                # Aborted while its chunk ran, or its transfer failed. A transfer still
                # active on the ranks keeps reading the blocks until the next plan aborts it.
                self.scheduler.abort(request.rid)
                if request.transfer_id not in self._aborts:
                    self._forget(request)
                if error is not None:
                    failed.append((request, error))
                continue
            self.scheduler.complete(chunk)
            if chunk.is_last:
                # The decode worker applies the same rules to the same token and frees itself.
                reason = request.stop.check(result.token_id, request.output_index + 1, request.num_tokens + 1)
                finished.append((request, result, reason))
                self._forget(request)
        for transfer_id in self._plan_aborts:
            request = self._sending.get(transfer_id)
            if request is not None and all(c.request is not request for c in self._in_flight):
                self._forget(request)
        self._in_flight, self._plan_aborts = [], []
        return finished, failed

    def _forget(self, request: PrefillRequest) -> None:
        self._sending.pop(request.transfer_id, None)
        self.scheduler.release(request)

    def stats(self) -> dict:
        return {"num_blocks": self.allocator.num_blocks, "free_blocks": self.allocator.num_free_blocks,
                "waiting": len(self.scheduler.waiting),
                "waiting_tokens": self.scheduler.num_waiting_tokens}
