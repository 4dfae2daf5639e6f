"""Rank 0 of a prefill worker: batches prompts into steps and streams each layer's K/V out.

Every rank executes the same plan (``run_prefill_plan``) on its own shard: it runs the
chunks through its model and, from the runner's per-layer hook, pushes that layer's K/V for
every chunk's blocks to the destination the decode worker reserved. A request's local
blocks are released only after its transfer has let go of them (``KVSender`` reports it).
"""
from __future__ import annotations

from decode.engine import chunk_to_wire, chunk_from_wire
from decode.sequence import parse_request_options
from kvtransfer.allocator import BlockAllocator
from models.batch import SampleResult, SequenceChunk
from models.runner import ModelRunner
from models.sampler import SamplingParams
from prefill.scheduler import PrefillRequest, PrefillScheduler, ScheduledChunk


def run_prefill_plan(runner: ModelRunner, sender, plan: dict) -> list[SampleResult | None]:
    """Every rank: abort, begin, compute with layer-wise sends, finish."""
    for transfer_id in plan["aborts"]:
        sender.abort(transfer_id)
    sends = plan["sends"]
    for send in sends:
        if send["begin"]:
            sender.begin(send["transfer_id"], send["dest"])

    def on_layer_done(layer: int) -> None:
        for send in sends:
            sender.send_layer(send["transfer_id"], layer, send["src"], send["dst"])

    results = runner.step([chunk_from_wire(c) for c in plan["chunks"]], on_layer_done)
    for send, result in zip(sends, results):
        if send["last"]:
            sender.finish(send["transfer_id"], result.token_id, result.logprob)
    return results


def _blocks_touched(block_ids: list[int], start: int, end: int, block_size: int) -> list[int]:
    return block_ids[start // block_size:(end - 1) // block_size + 1]


class PrefillEngine:
    def __init__(self, runner: ModelRunner, sender, *, max_num_batched_tokens: int = 2048,
                 max_num_seqs: int = 64):
        self.runner = runner
        self.sender = sender
        self.allocator = BlockAllocator(runner.num_blocks, runner.block_size)
        self.scheduler = PrefillScheduler(self.allocator, max_num_batched_tokens=max_num_batched_tokens,
                                          max_num_seqs=max_num_seqs)
        self._aborts: list[str] = []
        self._in_flight: list[ScheduledChunk] = []
        self._sending: dict[str, PrefillRequest] = {}   # transfer_id -> request, until released

    def add(self, rid: str, transfer_id: str, token_ids: list[int], sampling: dict,
            dest: dict, output_index: int) -> None:
        """Queue a prompt. Raises ValueError for a malformed request."""
        params, _ = parse_request_options(sampling, eos_token_ids=(), max_model_len=self.runner.max_model_len)
        if not token_ids or len(token_ids) >= self.runner.max_model_len:
            raise ValueError(f"a prompt of {len(token_ids)} tokens does not fit "
                             f"max model length {self.runner.max_model_len}")
        request = PrefillRequest(rid=rid, transfer_id=transfer_id, token_ids=list(token_ids),
                                 sampling=params, dest=dest, output_index=output_index)
        request.options = sampling
        self.scheduler.add(request)

    def abort(self, rid: str) -> None:
        request = self.scheduler.abort(rid)
        if request is None:
            return
        if request.block_ids and request.num_computed > request.num_prefix_hit \
                or request.transfer_id in self._sending:
            self._aborts.append(request.transfer_id)   # every rank stops its transfer
        if all(c.request is not request for c in self._in_flight):
            self._release(request)

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self._aborts)

    def build_plan(self) -> dict | None:
        chunks = self.scheduler.schedule()
        if not chunks and not self._aborts:
            return None
        bs = self.runner.block_size
        sends = []
        for c in chunks:
            r = c.request
            begin = c.start == r.num_prefix_hit
            # The first chunk also ships the prefix-cache hit blocks.
            first = 0 if begin else c.start
            src = _blocks_touched(r.block_ids, first, c.end, bs)
            dst_all = r.dest["ranks"][0]["block_ids"] if "ranks" in r.dest else []
            dst = dst_all[first // bs:(c.end - 1) // bs + 1]
            sends.append({"transfer_id": r.transfer_id, "dest": r.dest if begin else None,
                          "src": src, "dst": dst, "begin": begin, "last": c.is_last})
            if begin:
                self._sending[r.transfer_id] = r
        wire = [chunk_to_wire(SequenceChunk(c.request.token_ids[c.start:c.end], c.start,
                                            c.request.block_ids,
                                            c.request.sampling if c.is_last else None,
                                            c.request.output_index)) for c in chunks]
        self._in_flight = chunks
        plan = {"op": "step", "chunks": wire, "sends": sends, "aborts": self._aborts}
        self._aborts = []
        return plan

    def execute_plan(self, plan: dict) -> list[SampleResult | None]:
        return run_prefill_plan(self.runner, self.sender, plan)

    def apply(self, results: list[SampleResult | None]) -> list[tuple[PrefillRequest, SampleResult, str | None]]:
        """Book the step; returns (request, first token, finish reason) for finished prompts."""
        finished = []
        for chunk, result in zip(self._in_flight, results):
            request = chunk.request
            if self.scheduler.by_rid.get(request.rid) is not request:
                self._release(request)      # aborted while its chunk ran
                continue
            self.scheduler.complete(chunk)
            if chunk.is_last:
                _, stop = parse_request_options(request.options,
                                                eos_token_ids=self.runner.config.eos_token_ids,
                                                max_model_len=self.runner.max_model_len)
                reason = stop.check(result.token_id, request.output_index + 1, request.num_tokens + 1)
                finished.append((request, result, reason))
        self._in_flight = []
        return finished

    def transfer_released(self, transfer_id: str) -> None:
        """The sender no longer reads this transfer's source blocks: free them."""
        request = self._sending.pop(transfer_id, None)
        if request is not None:
            self._release(request)

    def _release(self, request: PrefillRequest) -> None:
        self.scheduler.release(request)

    def stats(self) -> dict:
        return {"num_blocks": self.allocator.num_blocks, "free_blocks": self.allocator.num_free_blocks,
                "waiting": len(self.scheduler.waiting),
                "waiting_tokens": self.scheduler.num_waiting_tokens}
