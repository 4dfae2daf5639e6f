import json
import os
import subprocess
import sys

import pytest

from kvtransfer import allocator as allocator_module
from kvtransfer.allocator import BlockAllocator, NoFreeBlocks, block_hashes

BS = 4


def tokens(n: int, start: int = 100) -> list[int]:
    return list(range(start, start + n))


def state(alloc: BlockAllocator) -> tuple:
    return alloc.free_block_ids(), [alloc.ref_count(b) for b in range(alloc.num_blocks)]


# -- free list and ref counts ---------------------------------------------------------------
def test_allocate_hands_out_ids_in_order():
    alloc = BlockAllocator(6, BS)
    assert alloc.allocate(2) == [0, 1]
    assert alloc.allocate(0) == []
    assert alloc.allocate(3) == [2, 3, 4]
    assert alloc.free_block_ids() == [5]
    assert (alloc.num_free_blocks, alloc.num_used_blocks) == (1, 5)
    assert [alloc.ref_count(b) for b in range(6)] == [1, 1, 1, 1, 1, 0]


def test_free_releases_in_reverse_and_reuses_lru_first():
    alloc = BlockAllocator(6, BS)
    first, second = alloc.allocate(3), alloc.allocate(2)
    alloc.free(first)  # [0, 1, 2] -> appended as 2, 1, 0
    assert alloc.free_block_ids() == [5, 2, 1, 0]
    alloc.free(second)
    assert alloc.free_block_ids() == [5, 2, 1, 0, 4, 3]
    assert alloc.allocate(4) == [5, 2, 1, 0]
    assert alloc.num_free_blocks == 2


def test_incref_and_free_count_references():
    alloc = BlockAllocator(3, BS)
    ids = alloc.allocate(2)
    alloc.incref(ids)
    alloc.incref([ids[0]])
    assert [alloc.ref_count(b) for b in ids] == [3, 2]
    alloc.free(ids)
    assert alloc.free_block_ids() == [2]
    alloc.free(ids)
    assert alloc.free_block_ids() == [2, 1]
    alloc.free([ids[0]])
    assert alloc.free_block_ids() == [2, 1, 0]
    assert alloc.num_free_blocks == alloc.num_blocks


def test_double_free_and_bad_ids_change_nothing():
    alloc = BlockAllocator(4, BS)
    ids = alloc.allocate(2)
    alloc.free([ids[1]])
    before = state(alloc)
    with pytest.raises(ValueError, match="freed twice"):
        alloc.free(ids)  # block 0 is fine, block 1 is already free
    with pytest.raises(ValueError, match="freed twice"):
        alloc.free([0, 0])  # one reference, freed twice in one call
    with pytest.raises(ValueError, match="not in this pool"):
        alloc.free([0, -1])  # -1 must not alias block 3
    with pytest.raises(ValueError, match="not in this pool"):
        alloc.incref([4])
    with pytest.raises(ValueError, match="is free"):
        alloc.incref([0, 1])
    assert state(alloc) == before


def test_no_free_blocks():
    alloc = BlockAllocator(3, BS)
    alloc.allocate(2)
    before = state(alloc)
    assert not alloc.can_allocate(2) and alloc.can_allocate(1)
    with pytest.raises(NoFreeBlocks, match="asked for 2 blocks, 1 free"):
        alloc.allocate(2)
    with pytest.raises(ValueError):
        alloc.allocate(-1)
    assert state(alloc) == before


def test_constructor_validation():
    with pytest.raises(ValueError):
        BlockAllocator(0, BS)
    with pytest.raises(ValueError):
        BlockAllocator(4, 0)


# -- prefix cache ---------------------------------------------------------------------------
def test_block_hashes_cover_full_blocks_and_chain():
    assert block_hashes(tokens(3), BS) == []
    hashes = block_hashes(tokens(11), BS)
    assert len(hashes) == 2
    assert hashes == block_hashes(tokens(8), BS)
    # The same block content after a different prefix hashes differently.
    a = block_hashes([1, 2, 3, 4] + [9, 9, 9, 9], BS)
    b = block_hashes([5, 6, 7, 8] + [9, 9, 9, 9], BS)
    assert a[1] != b[1]


def test_block_hashes_are_identical_in_every_process():
    code = ("import json; from kvtransfer.allocator import block_hashes; "
            "print(json.dumps(block_hashes(list(range(100, 140)), 4)))")
    for seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, timeout=60, check=True).stdout
        assert json.loads(out) == block_hashes(tokens(40), BS)


def test_prefix_hit_after_free_and_partial_block_not_cached():
    alloc = BlockAllocator(8, BS)
    prompt = tokens(10)  # two full blocks and a partial one
    ids = alloc.allocate(3)
    alloc.cache_blocks(ids, prompt)
    alloc.free(ids)
    assert alloc.free_block_ids() == [3, 4, 5, 6, 7, 2, 1, 0]
    # Block 2 held only a partial block when cached, so it is not a hit even though the
    # request's third block starts with its tokens.
    assert alloc.match_prefix(tokens(12)) == [0, 1]
    assert [alloc.ref_count(b) for b in (0, 1, 2)] == [1, 1, 0]
    assert alloc.free_block_ids() == [3, 4, 5, 6, 7, 2]


def test_prefix_match_stops_at_first_difference_and_shares_used_blocks():
    alloc = BlockAllocator(8, BS)
    prompt = tokens(12)
    ids = alloc.allocate(3)
    alloc.cache_blocks(ids, prompt)
    assert alloc.match_prefix(prompt[:7]) == [0]  # only one full block asked for
    assert alloc.match_prefix(prompt[:4] + [0] * 8) == [0]
    assert alloc.match_prefix([0] + prompt[1:]) == []
    assert alloc.match_prefix(prompt) == [0, 1, 2]
    assert [alloc.ref_count(b) for b in ids] == [4, 2, 2]


def test_hash_collision_with_different_tokens_is_not_a_hit(monkeypatch):
    def colliding_hashes(token_ids, block_size):
        return list(range(len(token_ids) // block_size))  # ignores the tokens

    monkeypatch.setattr(allocator_module, "block_hashes", colliding_hashes)
    alloc = BlockAllocator(4, BS)
    prompt = tokens(8)
    ids = alloc.allocate(2)
    alloc.cache_blocks(ids, prompt)
    alloc.free(ids)
    other = tokens(8, start=500)
    assert colliding_hashes(other, BS) == colliding_hashes(prompt, BS)
    assert alloc.match_prefix(other) == []
    assert alloc.match_prefix(prompt[:4] + other[4:]) == [0]
    assert alloc.match_prefix(prompt) == [0, 1]


def test_reused_blocks_are_evicted_lru_prefix_survives():
    alloc = BlockAllocator(4, BS)
    prompt = tokens(8)
    ids = alloc.allocate(2)
    alloc.cache_blocks(ids, prompt)
    alloc.free(ids)
    assert alloc.free_block_ids() == [2, 3, 1, 0]
    taken = alloc.allocate(3)  # reuses block 1, which loses its cached tokens
    assert taken == [2, 3, 1]
    assert alloc.match_prefix(prompt) == [0]
    alloc.free([0])
    # Block 1 now holds other tokens; caching them replaces nothing of the old prefix.
    other = tokens(8, start=900)
    alloc.cache_blocks([0, 1], prompt[:4] + other[4:])
    assert alloc.match_prefix(prompt) == [0]
    assert alloc.match_prefix(prompt[:4] + other[4:]) == [0, 1]


def test_cache_keeps_first_owner_of_a_hash():
    alloc = BlockAllocator(6, BS)
    prompt = tokens(8)
    a, b = alloc.allocate(2), alloc.allocate(2)
    alloc.cache_blocks(a, prompt)
    alloc.cache_blocks(b, prompt)  # same tokens computed twice: the first copy stays
    alloc.free(b)
    alloc.allocate(4)  # reuses b's blocks and the rest; a's blocks are in use
    assert alloc.match_prefix(prompt) == a


def test_prefix_cache_disabled():
    alloc = BlockAllocator(4, BS, enable_prefix_cache=False)
    ids = alloc.allocate(2)
    alloc.cache_blocks(ids, tokens(8))
    alloc.free(ids)
    assert alloc.match_prefix(tokens(8)) == []
    assert alloc.num_free_blocks == 4
