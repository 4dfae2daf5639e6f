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


@dataclass
class PrefillRequest:
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
        """
        request = chunk.request
        request.num_computed = chunk.end
        if chunk.is_last:
            self.waiting.remove(request)
            self.allocator.cache_blocks(request.block_ids, request.token_ids)

    def release(self, request: PrefillRequest) -> None:
        """Free the request's local blocks (cached prefix blocks stay matchable)."""
        self.by_rid.pop(request.rid, None)
        if request.block_ids:
            self.allocator.free(request.block_ids)
            request.block_ids = []

    def abort(self, rid: str) -> PrefillRequest | None:
        """Drop a request wherever it is; its blocks are freed by the caller via ``release``."""
        request = self.by_rid.get(rid)
        if request is not None and request in self.waiting:
            self.waiting.remove(request)
        return request
