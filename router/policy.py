"""Routing policies: which decode worker holds a request, which prefill worker computes it.

Workers being drained (scale-down) get nothing new.

- decode: among workers that can still hold the request's KV, the one with the fewest
  sequences assigned, then the most free blocks (router-side accounting, corrected by heartbeats
  and by ``Allocated`` refusals).
- prefill: the least outstanding prompt tokens, counting a cached prefix as work already done:
  a worker's cost is ``outstanding tokens + prompt tokens - tokens it has cached``. Prompts that
  share a prefix therefore go to the worker that computed it, unless it is much busier.
  The router remembers the block hashes (``kvtransfer.allocator.block_hashes``) of the prompts
  it sent to each prefill worker in a bounded ``PrefixIndex``.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Iterable, Sequence

if TYPE_CHECKING:
    from router.workers import WorkerRecord


class PrefixIndex:
    """The most recent block hashes sent to one prefill worker, at most ``capacity`` (LRU)."""

    def __init__(self, capacity: int):
        if capacity <= 0:
            raise ValueError(f"prefix index capacity must be positive, got {capacity}")
        self.capacity = capacity
        self._hashes: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._hashes)

    def add(self, hashes: Iterable[int]) -> None:
        for h in hashes:
            self._hashes[h] = None
            self._hashes.move_to_end(h)
        while len(self._hashes) > self.capacity:
            self._hashes.popitem(last=False)

    def num_matched(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of a prompt (given its chained hashes) are cached."""
        n = 0
        for h in hashes:
            if h not in self._hashes:
                break
            n += 1
        return n


def pick_decode(workers: Iterable[WorkerRecord], num_blocks: int) -> WorkerRecord | None:
    """The least loaded live decode-capable worker that can hold ``num_blocks`` more blocks."""
    best = None
    best_key = None
    for w in workers:
        if not (w.alive and w.can_decode and not w.is_full and not w.draining
                and w.free_blocks_estimate >= num_blocks):
            continue
        key = (w.num_decoding, -w.free_blocks_estimate, w.worker_id)
        if best_key is None or key < best_key:
            best, best_key = w, key
    return best


def pick_prefill(workers: Iterable[WorkerRecord], num_tokens: int, hashes: Sequence[int],
                 block_size: int) -> WorkerRecord | None:
    """The live prefill worker with the least work once this prompt is added (see module doc)."""
    best = None
    best_key = None
    for w in workers:
        if not (w.alive and w.role == "prefill" and not w.draining):
            continue
        cached = min(w.prefix.num_matched(hashes) * block_size, num_tokens)
        key = (w.outstanding_tokens + num_tokens - cached, w.outstanding_tokens, w.worker_id)
        if best_key is None or key < best_key:
            best, best_key = w, key
    return best
