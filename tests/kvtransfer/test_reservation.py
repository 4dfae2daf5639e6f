"""The decode-side reservation table: exact block ids, quarantine, expiry (injected clock)."""
from __future__ import annotations

import pytest

from kvtransfer.allocator import BlockAllocator
from kvtransfer.reservation import ReservationTable


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def table(clock):
    return ReservationTable(BlockAllocator(8, 4), reserve_timeout_s=10, quarantine_timeout_s=20, clock=clock)


def test_reserve_takes_exact_blocks_and_never_more_than_free(table):
    assert table.reserve("a", 9) == [0, 1, 2]
    assert table.reserve("b", 20) == [3, 4, 5, 6, 7]
    assert table.reserve("c", 1) is None  # full: the caller queues instead
    assert table.stats().num_free_blocks == 0 and table.stats().num_live == 2


def test_bad_reservations_are_refused(table):
    with pytest.raises(ValueError, match="positive integer"):
        table.reserve("a", 0)
    with pytest.raises(ValueError, match="non-empty string"):
        table.reserve("", 4)
    table.reserve("a", 4)
    with pytest.raises(ValueError, match="already used"):
        table.reserve("a", 4)
    table.complete("a")
    with pytest.raises(ValueError, match="already used"):  # ended ids are remembered too
        table.reserve("a", 4)
    with pytest.raises(ValueError, match="timeout must be positive"):
        table.reserve("b", 4, timeout_s=0)


def test_complete_hands_the_blocks_over(table):
    table.reserve("a", 8)
    assert table.complete("a") == [0, 1]
    assert not table.is_live("a")
    assert table.allocator.num_free_blocks == 6  # the caller owns them now
    with pytest.raises(KeyError):
        table.complete("a")


def test_aborted_blocks_stay_quarantined_until_the_writer_finished(table):
    table.reserve("a", 8, writer="P1")
    assert table.abort("a")
    assert table.is_quarantined("a") and not table.is_live("a")
    stats = table.stats()
    assert (stats.num_quarantined, stats.num_quarantined_blocks, stats.num_free_blocks) == (1, 2, 6)
    assert table.allocator.free_block_ids() == [2, 3, 4, 5, 6, 7]  # 0 and 1 are not handed out
    assert table.reserve("b", 24) == [2, 3, 4, 5, 6, 7]
    assert table.reserve("c", 1) is None
    assert table.ids_of_writer("P1") == ["a"]
    assert table.writer_finished("a") == 2
    assert table.allocator.free_block_ids() == [1, 0]
    assert not table.abort("a") and table.writer_finished("a") == 0


def test_a_writer_that_finished_first_frees_the_abort_at_once(table):
    table.reserve("a", 8)
    assert table.writer_finished("a") == 0  # still live: nothing to free yet
    assert table.abort("a")
    assert table.stats().num_quarantined == 0 and table.allocator.num_free_blocks == 8


def test_expiry_quarantines_then_the_quarantine_timeout_releases(table, clock):
    table.reserve("a", 4)
    table.reserve("b", 4, timeout_s=50)
    assert table.next_deadline() == 110
    clock.now = 110
    expiry = table.expire()
    assert (expiry.expired, expiry.released) == (["a"], [])
    assert table.is_quarantined("a") and table.next_deadline() == 130
    clock.now = 129.9
    assert table.expire().released == []
    clock.now = 130
    expiry = table.expire()
    assert (expiry.expired, expiry.released) == ([], ["a"])
    assert table.stats().num_forced_releases == 1 and table.allocator.num_free_blocks == 7
    assert table.is_live("b")


def test_the_timeout_counts_from_when_the_writer_starts(clock):
    table = ReservationTable(BlockAllocator(8, 4), reserve_timeout_s=10, quarantine_timeout_s=20,
                             start_timeout_s=100, clock=clock)
    table.reserve("a", 4)
    assert table.next_deadline() == 200          # queued for prefill: only the start bound runs
    clock.now = 150
    assert table.writer_started("a") and table.next_deadline() == 160
    clock.now = 155
    assert not table.writer_started("a")         # only the first start counts
    assert table.expire().expired == [] and table.next_deadline() == 160
    clock.now = 160
    assert table.expire().expired == ["a"]
    assert not table.writer_started("a")         # not live any more
    with pytest.raises(ValueError, match="start_timeout_s"):
        ReservationTable(BlockAllocator(8, 4), start_timeout_s=0)
