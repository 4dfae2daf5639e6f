from kvtransfer.allocator import BlockAllocator
from models.sampler import SamplingParams
from prefill.scheduler import PrefillRequest, PrefillScheduler

GREEDY = SamplingParams(temperature=0.0)


def _request(rid, num_tokens, base=0):
    return PrefillRequest(rid=rid, transfer_id=f"t-{rid}", token_ids=list(range(base, base + num_tokens)),
                          sampling=GREEDY, dest={})


def test_budget_packs_prompts_in_arrival_order():
    sched = PrefillScheduler(BlockAllocator(64, 4), max_num_batched_tokens=16)
    for rid, n in (("a", 5), ("b", 7), ("c", 9)):
        sched.add(_request(rid, n))
    chunks = sched.schedule()
    assert [(c.request.rid, c.start, c.end, c.is_last) for c in chunks] == [
        ("a", 0, 5, True), ("b", 0, 7, True), ("c", 0, 4, False)]
    assert [c.request.block_ids for c in chunks] == [[0, 1], [2, 3], [4, 5, 6]]


def test_long_prompt_is_chunked_and_keeps_its_blocks():
    sched = PrefillScheduler(BlockAllocator(64, 4), max_num_batched_tokens=8)
    sched.add(_request("long", 20))
    spans = []
    while sched.has_work():
        (chunk,) = sched.schedule()
        spans.append((chunk.start, chunk.end))
        sched.complete(chunk)
    assert spans == [(0, 8), (8, 16), (16, 20)]
    request = sched.by_rid["long"]
    assert request.block_ids == [0, 1, 2, 3, 4]
    sched.release(request)
    assert sched.allocator.num_free_blocks == 64


def test_prefix_hit_skips_cached_blocks_but_always_computes_the_last_token():
    alloc = BlockAllocator(64, 4)
    sched = PrefillScheduler(alloc, max_num_batched_tokens=64)
    first = _request("first", 10)
    sched.add(first)
    (chunk,) = sched.schedule()
    sched.complete(chunk)
    sched.release(first)

    # Same 8-token prefix (two full blocks), different tail.
    second = PrefillRequest("second", "t2", list(range(8)) + [99, 98, 97], GREEDY, {})
    sched.add(second)
    (chunk,) = sched.schedule()
    assert second.num_prefix_hit == 8 and (chunk.start, chunk.end) == (8, 11)
    assert second.block_ids[:2] == [0, 1]

    # A prompt that is exactly the cached blocks still recomputes its last block.
    third = PrefillRequest("third", "t3", list(range(8)), GREEDY, {})
    sched.add(third)
    sched.complete(chunk)
    (chunk,) = sched.schedule()
    assert third.num_prefix_hit == 4 and (chunk.start, chunk.end) == (4, 8)




def test_waits_for_blocks_without_reordering():
    sched = PrefillScheduler(BlockAllocator(3, 4), max_num_batched_tokens=64)
    big, small = _request("big", 12), _request("small", 3, base=100)
    sched.add(big)
    sched.add(small)
    (chunk,) = sched.schedule()
    assert chunk.request is big
    sched.complete(chunk)
    assert sched.schedule() == []          # no block left for small until big is released
    sched.release(big)
    (chunk,) = sched.schedule()
    assert chunk.request is small and small.block_ids == [2]


def test_abort_removes_a_waiting_request():
    sched = PrefillScheduler(BlockAllocator(8, 4), max_num_batched_tokens=4)
    sched.add(_request("x", 10))
    (chunk,) = sched.schedule()
    request = sched.abort("x")
    sched.release(request)
    assert not sched.has_work() and sched.allocator.num_free_blocks == 8
    assert sched.abort("unknown") is None


def test_first_unscheduled_skips_requests_a_step_has_run():
    sched = PrefillScheduler(BlockAllocator(64, 4), max_num_batched_tokens=8)
    assert sched.first_unscheduled() is None
    sched.add(_request("long", 20))
    sched.add(_request("next", 4, base=100))
    assert sched.first_unscheduled() == "long"
    (chunk,) = sched.schedule()
    sched.complete(chunk)          # "long" is part-way: no longer untouched
    assert sched.first_unscheduled() == "next"
