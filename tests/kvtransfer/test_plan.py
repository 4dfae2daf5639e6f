"""Re-sharding plans and block-run coalescing (pure functions, exact expectations)."""
from __future__ import annotations

import pytest

from kvtransfer.plan import HeadSlice, block_runs, block_span, group_runs, head_slices, sources_for


def test_equal_degrees_pair_rank_i_with_rank_i():
    assert head_slices(4, 2, 0, 2) == [HeadSlice(0, (0, 2), (0, 2))]
    assert head_slices(4, 2, 1, 2) == [HeadSlice(1, (0, 2), (0, 2))]
    assert sources_for(4, 2, 2, 1) == frozenset({1})


def test_two_prefill_ranks_into_one_decode_rank():
    assert head_slices(4, 2, 0, 1) == [HeadSlice(0, (0, 2), (0, 2))]
    assert head_slices(4, 2, 1, 1) == [HeadSlice(0, (0, 2), (2, 4))]
    assert sources_for(4, 2, 1, 0) == frozenset({0, 1})


def test_one_prefill_rank_into_two_decode_ranks():
    assert head_slices(4, 1, 0, 2) == [HeadSlice(0, (0, 2), (0, 2)), HeadSlice(1, (2, 4), (0, 2))]
    assert sources_for(4, 1, 2, 1) == frozenset({0})


def test_replicated_heads_have_one_source_each():
    # One kv head, replicated on both prefill ranks: only rank 0 sends it to a single decode rank.
    assert head_slices(1, 2, 0, 1) == [HeadSlice(0, (0, 1), (0, 1))]
    assert head_slices(1, 2, 1, 1) == []
    assert sources_for(1, 2, 1, 0) == frozenset({0})
    # Equal degrees with replication still pair rank i with rank i.
    assert head_slices(1, 2, 1, 2) == [HeadSlice(1, (0, 1), (0, 1))]
    # Two heads over TP=4 prefill (2 replicas each) into TP=1 decode: ranks 0 and 2 send.
    assert [bool(head_slices(2, 4, p, 1)) for p in range(4)] == [True, False, True, False]
    assert head_slices(2, 4, 2, 1) == [HeadSlice(0, (0, 1), (1, 2))]
    # One prefill rank into replicated decode ranks: every decode rank gets the head.
    assert head_slices(1, 1, 0, 2) == [HeadSlice(0, (0, 1), (0, 1)), HeadSlice(1, (0, 1), (0, 1))]


def test_every_decode_head_has_exactly_one_source():
    for heads, p_tp, d_tp in [(8, 2, 4), (8, 4, 2), (2, 4, 8), (4, 8, 1), (1, 4, 2)]:
        for d_rank in range(d_tp):
            covered = []
            for p in range(p_tp):
                for s in head_slices(heads, p_tp, p, d_tp):
                    if s.d_rank == d_rank:
                        assert s.src[1] - s.src[0] == s.dst[1] - s.dst[0]
                        covered += list(range(*s.dst))
            assert sorted(covered) == list(range(max(1, heads // d_tp)))


def test_block_runs_coalesce_only_when_both_sides_are_consecutive():
    assert block_runs([10, 11, 12, 3, 20, 21, 8], [30, 31, 32, 5, 17, 19, 2]) == [
        (10, 30, 3), (3, 5, 1), (20, 17, 1), (21, 19, 1), (8, 2, 1)]
    assert block_runs([0, 1, 2, 3, 4], [5, 6, 7, 8, 9], max_blocks=2) == [(0, 5, 2), (2, 7, 2), (4, 9, 1)]
    assert block_runs([], []) == []
    with pytest.raises(ValueError, match="3 source blocks but 2"):
        block_runs([1, 2, 3], [1, 2])


def test_group_runs_keeps_long_runs_alone_and_batches_short_ones():
    runs = [(0, 9, 1), (5, 2, 1), (10, 20, 8), (40, 3, 2), (7, 0, 1), (50, 60, 4)]
    assert group_runs(runs, min_alone=4) == [
        [(0, 9, 1), (5, 2, 1)], [(10, 20, 8)], [(40, 3, 2), (7, 0, 1)], [(50, 60, 4)]]
    assert group_runs(runs, min_alone=1) == [[r] for r in runs]


def test_block_span_of_a_token_range():
    assert block_span(0, 16, 4) == (0, 4)
    assert block_span(14, 38, 4) == (3, 10)
    with pytest.raises(ValueError):
        block_span(5, 5, 4)
