"""Prefill batching: FIFO over prompts, a token budget per step, chunking for long prompts,
and prefix reuse over the prefill worker's own KV pool.

A request's blocks in the local pool are taken when it is first scheduled (prefix-cache hits
first, then fresh blocks for the rest of the prompt) and kept until its KV has been shipped.
Each step takes, in arrival order, the next chunk of every request that fits the budget.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from kvtransfer.allocator import BlockAllocator
from kvtransfer.spec import num_blocks_for
from models.request_options import StopRules
from models.sampler import SamplingParams


TRANSFER_NONE = "none"          # no rank has begun sending
TRANSFER_OPEN = "open"          # begun; every rank is sending or will finish/abort it
TRANSFER_SETTLED = "settled"    # rank 0's transfer let go of the source blocks (done or failed)


@dataclass
class PrefillRequest:
    """One request on a prefill worker: the one record of its state, owned by the event loop.

    ``in_flight``: a chunk of it is in the step on the model thread. ``transfer``: TRANSFER_*.
    ``cancelled``: the router freed it (nothing more is sent for it). ``transfer_error``: why
    its transfer failed. ``answered``: its
    ``FirstToken`` or ``WorkerError`` was sent. ``first``: the first token and finish reason,
    once the last chunk ran. Its blocks are released once no step and no transfer uses them and
    it is answered or cancelled (``PrefillEngine._settle_record``).
    """
    rid: str
    transfer_id: str
    token_ids: list[int]
    sampling: SamplingParams
    dest: dict
    output_index: int = 0
    block_ids: list[int] = field(default_factory=list)   # in the local pool
    num_computed: int = 0        # prompt tokens whose KV is in the local pool
    num_prefix_hit: int = 0      # of which came from the prefix cache
    arrival: float = field(default_factory=time.monotonic)
    stop: StopRules | None = None   # decides whether the first token already ends it
    in_flight: bool = False
    transfer: str = TRANSFER_NONE
    cancelled: bool = False
    answered: bool = False
    first: tuple | None = None      # (SampleResult, finish reason | None)
    transfer_error: str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class ScheduledChunk:
    """Tokens ``[start, end)`` of ``request`` run this step; ``is_last`` samples the first token."""
    request: PrefillRequest
    start: int
    end: int

    @property
    def is_last(self) -> bool:
        return self.end == self.request.num_tokens


class PrefillScheduler:
    def __init__(self, allocator: BlockAllocator, *, max_num_batched_tokens: int = 2048,
                 max_num_seqs: int = 64):
        if max_num_batched_tokens < allocator.block_size:
            raise ValueError("max_num_batched_tokens must be at least one block")
        self.allocator = allocator
        self.block_size = allocator.block_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[PrefillRequest] = deque()   # arrival order; head may be part-way
        self.by_rid: dict[str, PrefillRequest] = {}

    @property
    def num_waiting_tokens(self) -> int:
        return sum(r.num_tokens - r.num_computed for r in self.waiting)

    def add(self, request: PrefillRequest) -> None:
        if request.rid in self.by_rid:
            raise ValueError(f"request {request.rid} is already being prefilled")
        self.waiting.append(request)
        self.by_rid[request.rid] = request

    def has_work(self) -> bool:
        return bool(self.waiting)

    def first_unscheduled(self) -> str | None:
        """The rid of the first waiting request no step has computed any of yet, if any."""
        return next((r.rid for r in self.waiting if r.num_computed == r.num_prefix_hit), None)

    def schedule(self) -> list[ScheduledChunk]:
        """Chunks for one forward pass, at most ``max_num_batched_tokens`` tokens in all."""
        budget = self.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        for request in self.waiting:
            if budget <= 0 or len(chunks) >= self.max_num_seqs:
                break
            if not request.block_ids and not self._take_blocks(request):
                break  # FIFO: a later request must not overtake one waiting for blocks
            start = request.num_computed
            end = min(request.num_tokens, start + budget)
            chunks.append(ScheduledChunk(request, start, end))
            budget -= end - start
        return chunks

    def _take_blocks(self, request: PrefillRequest) -> bool:
        # At least the last prompt token is always computed: its logits give the first token.
        hit = self.allocator.match_prefix(request.token_ids[:request.num_tokens - 1])
        num_blocks = num_blocks_for(request.num_tokens, self.block_size)
        if not self.allocator.can_allocate(num_blocks - len(hit)):
            self.allocator.free(hit)
            return False
        request.block_ids = hit + self.allocator.allocate(num_blocks - len(hit))
        request.num_prefix_hit = request.num_computed = len(hit) * self.block_size
        return True

    def complete(self, chunk: ScheduledChunk) -> None:
        """Record that a chunk ran; a request whose prompt is done leaves the queue.

        Its blocks stay allocated (the transfer may still be reading them) until ``release``.
        Only for a request still waiting (the engine never completes a cancelled one).
        """
        request = chunk.request
        request.num_computed = chunk.end
        if chunk.is_last:
            self.waiting.remove(request)
            self.allocator.cache_blocks(request.block_ids, request.token_ids)

    def remove_waiting(self, request: PrefillRequest) -> None:
        """Take a request out of the queue (cancel, failure); no-op if it is not there."""
        if request in self.waiting:
            self.waiting.remove(request)

    def release(self, request: PrefillRequest) -> None:
        """Forget the request and free its local blocks (cached prefix blocks stay matchable).
        Idempotent."""
        self.by_rid.pop(request.rid, None)
        if request.block_ids:
            self.allocator.free(request.block_ids)
            request.block_ids = []

    def abort(self, rid: str) -> PrefillRequest | None:
        """Drop a request from the queue; its blocks are freed by the caller via ``release``."""
        request = self.by_rid.get(rid)
        if request is not None:
            self.remove_waiting(request)
        return request
