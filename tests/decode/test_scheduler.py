import pytest

from decode.scheduler import DecodeScheduler
from kvtransfer.allocator import BlockAllocator
from models.batch import SampleResult
from models.request_options import RequestOptions

EOS = 2


def _scheduler(max_model_len=64):
    return DecodeScheduler(BlockAllocator(32, 4), max_model_len=max_model_len, eos_token_ids=[EOS])


def _seq(sched, rid, prompt, **options):
    options.setdefault("temperature", 0.0)
    options = RequestOptions(**options)
    n = sched.num_blocks_needed(len(prompt), options, 0)
    return sched.make_sequence(rid, f"t-{rid}", prompt, options, 0, sched.allocator.allocate(n))


def test_blocks_cover_the_whole_life_of_a_sequence():
    sched = _scheduler(max_model_len=20)
    # 6 prompt tokens + 8 new: the 14th token's K/V is never written, so 13 slots -> 4 blocks.
    assert sched.num_blocks_needed(6, RequestOptions(max_tokens=8), 0) == 4
    # Capped by the max model length: 19 slots -> 5 blocks.
    assert sched.num_blocks_needed(6, RequestOptions(max_tokens=500), 0) == 5
    # After a failover 5 tokens were generated already; 3 remain.
    assert sched.num_blocks_needed(11, RequestOptions(max_tokens=8), 5) == 4


def test_steps_feed_the_last_token_and_stop_on_max_tokens():
    sched = _scheduler()
    seq = _seq(sched, "a", [5, 6, 7], max_tokens=3)
    assert sched.start(seq, 10) is None
    seqs, chunks = sched.schedule()
    assert [(c.token_ids, c.num_cached, c.output_index) for c in chunks] == [([10], 3, 1)]
    assert chunks[0].block_table == seq.block_ids
    (item,) = sched.update(seqs, [SampleResult(11, -0.5)])
    assert (item.rid, item.token_id, item.finish_reason) == ("a", 11, None)
    (item,) = sched.update(*_step(sched, 12))
    assert item.finish_reason == "length" and sched.num_running == 0
    assert seq.token_ids == [5, 6, 7, 10, 11, 12]


def _step(sched, token):
    seqs, chunks = sched.schedule()
    return seqs, [SampleResult(token, 0.0)] * len(seqs)


def test_eos_and_stop_token_ids_and_ignore_eos():
    sched = _scheduler()
    a = _seq(sched, "a", [1], max_tokens=10)
    b = _seq(sched, "b", [1], max_tokens=10, ignore_eos=True)
    c = _seq(sched, "c", [1], max_tokens=10, stop_token_ids=[9])
    for seq in (a, b, c):
        sched.start(seq, 4)
    items = sched.update(*_step(sched, EOS))
    assert [(i.rid, i.finish_reason) for i in items] == [("a", "stop"), ("b", None), ("c", "stop")]
    (item,) = sched.update(*_step(sched, 9))
    assert (item.rid, item.finish_reason) == ("b", None)


def test_first_token_can_finish_the_request():
    sched = _scheduler()
    seq = _seq(sched, "a", [1, 2, 3], max_tokens=1)
    assert sched.start(seq, 7) == "length"
    assert sched.num_running == 0


def test_removed_sequence_drops_its_in_flight_token():
    sched = _scheduler()
    seq = _seq(sched, "a", [1], max_tokens=5)
    sched.start(seq, 4)
    seqs, _ = sched.schedule()
    assert sched.remove("a") is seq
    assert sched.update(seqs, [SampleResult(3, 0.0)]) == []


def test_bad_requests_are_refused():
    sched = _scheduler(max_model_len=8)
    with pytest.raises(ValueError, match="max model length"):
        sched.make_sequence("x", "t", list(range(8)), RequestOptions(max_tokens=1), 0, [])
    with pytest.raises(ValueError, match="unknown sampling options"):
        sched.make_sequence("y", "t", [1], RequestOptions.from_wire({"beam_width": 2}), 0, [])
    _seq(sched, "z", [1])
    with pytest.raises(ValueError, match="already"):
        _seq(sched, "z", [1])
