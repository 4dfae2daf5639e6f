"""Block allocator: free list, reference counts, and a prefix cache over full blocks.

Pure Python (no torch) so the router can compute the same prefix hashes for routing.

Invariants:
- a block is in ``_free`` iff its ref count is 0;
- ``_free`` is in LRU order: ``allocate`` takes from the front, ``free`` appends at the back,
  so a freed block that still holds a cached prefix survives as long as possible;
- a block is in ``_hash_to_block`` only while it holds the tokens it was hashed from; it leaves
  the table when it is handed out again by ``allocate``.
"""
from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Sequence


class NoFreeBlocks(RuntimeError):
    """Raised when an allocation asks for more blocks than are free."""


def block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """Chained hashes of every *full* block of ``token_ids``.

    Block i's hash covers all tokens up to the end of block i, so equal hashes mean equal
    prefixes (up to hash collisions, which ``BlockAllocator.match_prefix`` rules out by
    comparing the stored tokens). Python's hash of a tuple of ints does not depend on
    PYTHONHASHSEED, so every process computes the same values.
    """
    hashes: list[int] = []
    parent = 0
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash((parent, *token_ids[start:start + block_size]))
        hashes.append(parent)
    return hashes


class BlockAllocator:
    """Hands out block ids of one KV pool. Not thread-safe: one owner per pool."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_cache: bool = True):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_cache = enable_prefix_cache
        self._ref_counts = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._block_hash: list[int | None] = [None] * num_blocks
        self._block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self._hash_to_block: dict[int, int] = {}

    # -- queries -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def free_block_ids(self) -> list[int]:
        """Free blocks in the order ``allocate`` will hand them out."""
        return list(self._free)

    # -- allocation ----------------------------------------------------------------------
    def allocate(self, num_blocks: int) -> list[int]:
        """Take ``num_blocks`` free blocks (ref count 1 each). Raises NoFreeBlocks."""
        if num_blocks < 0:
            raise ValueError(f"cannot allocate {num_blocks} blocks")
        if num_blocks > len(self._free):
            raise NoFreeBlocks(f"asked for {num_blocks} blocks, {len(self._free)} free")
        block_ids = []
        for _ in range(num_blocks):
            block_id, _ = self._free.popitem(last=False)
            self._evict(block_id)
            self._ref_counts[block_id] = 1
            block_ids.append(block_id)
        return block_ids

    def incref(self, block_ids: Sequence[int]) -> None:
        """Share blocks that are already in use (ref count > 0) with one more owner.

        Raises ValueError, changing nothing, if a block id is out of range or free.
        """
        self._check_ids(block_ids)
        for block_id in block_ids:
            if self._ref_counts[block_id] <= 0:
                raise ValueError(f"block {block_id} is free; only used blocks can be shared")
        for block_id in block_ids:
            self._ref_counts[block_id] += 1

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference to each block; a block whose count reaches 0 becomes free.

        Blocks are released in reverse so that a sequence's last blocks are reused first
        and its prefix blocks stay cached longest. Raises ValueError, changing nothing, if a
        block id is out of range or would be freed more times than it is referenced.
        """
        self._check_ids(block_ids)
        for block_id, num_refs in Counter(block_ids).items():
            if num_refs > self._ref_counts[block_id]:
                raise ValueError(f"block {block_id} freed twice (ref count "
                                 f"{self._ref_counts[block_id]}, freed {num_refs} times)")
        for block_id in reversed(block_ids):
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                self._free[block_id] = None

    # -- prefix cache --------------------------------------------------------------------
    def match_prefix(self, token_ids: Sequence[int]) -> list[int]:
        """Longest run of cached full blocks that holds a prefix of ``token_ids``.

        The returned blocks gain one reference each (the caller frees them like any other).
        A hash hit counts only if the block still stores exactly those tokens.
        """
        if not self.enable_prefix_cache:
            return []
        matched: list[int] = []
        bs = self.block_size
        for i, h in enumerate(block_hashes(token_ids, bs)):
            block_id = self._hash_to_block.get(h)
            if block_id is None or self._block_tokens[block_id] != tuple(token_ids[i * bs:(i + 1) * bs]):
                break
            if self._ref_counts[block_id] == 0:
                del self._free[block_id]
            self._ref_counts[block_id] += 1
            matched.append(block_id)
        return matched

    def cache_blocks(self, block_ids: Sequence[int], token_ids: Sequence[int]) -> None:
        """Record that ``block_ids`` (a sequence's block table) hold ``token_ids``.

        Only full blocks are cached; a hash already owned by another block is left alone.
        """
        if not self.enable_prefix_cache:
            return
        bs = self.block_size
        for i, h in enumerate(block_hashes(token_ids, bs)):
            if i >= len(block_ids):
                break
            block_id = block_ids[i]
            if self._block_hash[block_id] == h:
                continue
            if h in self._hash_to_block:
                continue
            self._evict(block_id)
            self._block_hash[block_id] = h
            self._block_tokens[block_id] = tuple(token_ids[i * bs:(i + 1) * bs])
            self._hash_to_block[h] = block_id

    def _check_ids(self, block_ids: Sequence[int]) -> None:
        # A negative id would silently alias a block at the end of the pool.
        for block_id in block_ids:
            if not isinstance(block_id, int) or not 0 <= block_id < self.num_blocks:
                raise ValueError(f"block id {block_id!r} is not in this pool of "
                                 f"{self.num_blocks} blocks")

    def _evict(self, block_id: int) -> None:
        h = self._block_hash[block_id]
        if h is not None:
            if self._hash_to_block.get(h) == block_id:
                del self._hash_to_block[h]
            self._block_hash[block_id] = None
            self._block_tokens[block_id] = None
