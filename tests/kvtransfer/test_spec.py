"""The shared sizing rules of kvtransfer.spec: block rounding and the reservation size."""
from kvtransfer.spec import num_blocks_for, reservation_blocks


def test_num_blocks_for_rounds_up():
    assert [num_blocks_for(n, 4) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_reservation_blocks_covers_the_whole_life_of_a_request():
    # 10 context tokens + 6 to come - 1 never stored = 15 tokens = 4 blocks of 4
    assert reservation_blocks(10, 6, 0, 64, 4) == 4
    assert reservation_blocks(10, 6, 5, 64, 4) == 3      # resumed: 1 token to come -> 10 tokens
    assert reservation_blocks(60, 100, 0, 64, 4) == 16   # capped by the max model length
    assert reservation_blocks(1, 1, 0, 64, 4) == 1
