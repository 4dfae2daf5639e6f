"""Property test of the decode engine's request bookkeeping, disaggregated and colocated: random
interleavings of reserve, KV arrival, transfer failure, cancel, a dead prefill peer, and step
start and finish.

Invariants: no exception; every block's reference count equals its owners (live sequences, and
a step still in flight for freed ones); a request ends exactly once (a finish reason, a failure
or a cancel) and gets no token after it ends; at the end every block is free.
"""
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from decode.engine import DecodeEngine
from kvtransfer.allocator import NoFreeBlocks
from models.batch import SampleResult
from models.request_options import RequestOptions
from tests.conftest import NUM_BLOCKS

EOS = 2
OPS = ("reserve", "reserve", "arrive", "fail", "cancel", "peer_dead", "start", "finish", "finish")


class Harness:
    def __init__(self, engine: DecodeEngine):
        self.engine = engine
        self.colocated = engine.colocated
        self.plan = None
        self.rids: list[str] = []
        self.waiting_kv: list[str] = []     # disaggregated: reserved, KV not arrived
        self.ended = Counter()

    def end(self, rid: str) -> None:
        self.ended[rid] += 1

    def reserve(self, n: int, max_tokens: int) -> None:
        rid = f"r{len(self.rids)}"
        prompt = [(len(self.rids) * 13 + i * 5) % 120 + 3 for i in range(n)]
        try:
            self.engine.reserve(rid, f"t-{rid}", prompt, RequestOptions(temperature=0.0,
                                                                        max_tokens=max_tokens), 0)
        except NoFreeBlocks:
            return   # refused at Allocate: the router queues it; nothing is held here
        self.rids.append(rid)
        if self.colocated:
            self.engine.prefill_local(rid, f"t-{rid}")
        else:
            self.waiting_kv.append(rid)

    def arrive(self, index: int, token: int) -> None:
        if self.waiting_kv:
            rid = self.waiting_kv.pop(index % len(self.waiting_kv))
            if self.engine.kv_arrived(f"t-{rid}", rid, token) is not None:
                self.end(rid)

    def fail(self, index: int) -> None:
        if self.waiting_kv:
            rid = self.waiting_kv.pop(index % len(self.waiting_kv))
            if self.engine.free(rid):
                self.end(rid)

    def cancel(self, index: int) -> None:
        if self.rids:
            rid = self.rids[index % len(self.rids)]
            if rid in self.waiting_kv:
                self.waiting_kv.remove(rid)
            if self.engine.free(rid):
                self.end(rid)

    def peer_dead(self) -> None:
        while self.waiting_kv:
            self.fail(0)

    def start(self) -> None:
        if self.plan is None:
            self.plan = self.engine.build_plan()

    def finish(self, token: int) -> None:
        if self.plan is None:
            return
        plan, self.plan = self.plan, None
        out = self.engine.apply([SampleResult(token if i % 2 else 7, -1.0) for i in range(len(plan.chunks))])
        for rid, _, _, reason in out.first_tokens:
            assert self.ended[rid] == 0, f"first token of ended {rid}"
            if reason is not None:
                self.end(rid)
        for item in out.items:
            assert self.ended[item.rid] == 0, f"token of ended {item.rid}"
            if item.finish_reason is not None:
                self.end(item.rid)

    def check_ownership(self) -> None:
        alloc = self.engine.allocator
        owners = Counter(b for s in self.engine.decode_scheduler.by_rid.values() for b in s.block_ids)
        owners.update(b for blocks in self.engine._deferred for b in blocks)
        for block in range(NUM_BLOCKS):
            assert alloc.ref_count(block) == owners[block], (block, alloc.ref_count(block), owners[block])

    def drain(self) -> None:
        self.peer_dead()
        for rid in self.rids:
            if self.ended[rid] == 0 and self.plan is None and self.engine.free(rid):
                self.end(rid)
        for _ in range(3):
            self.finish(EOS)
            self.start()
        self.finish(EOS)
        for rid in self.rids:
            if self.engine.free(rid):
                self.end(rid)


@pytest.mark.parametrize("colocated", [False, True])
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 40), st.integers(1, 24)),
                    max_size=60))
def test_any_interleaving_keeps_the_books(tiny_runner, colocated, ops):
    h = Harness(DecodeEngine(tiny_runner, colocated=colocated, max_num_seqs=4, max_num_batched_tokens=8))
    for op, index, size in ops:
        if op == "reserve":
            h.reserve(size, 1 + index % 6)
        elif op == "arrive":
            h.arrive(index, EOS if index % 7 == 0 else 9)
        elif op == "fail":
            h.fail(index)
        elif op == "cancel":
            h.cancel(index)
        elif op == "peer_dead":
            h.peer_dead()
        elif op == "start":
            h.start()
        else:
            h.finish(EOS if index % 5 == 0 else 11)
        h.check_ownership()
    h.drain()
    h.check_ownership()
    assert all(h.ended[rid] == 1 for rid in h.rids), h.ended
    assert not h.engine.decode_scheduler.by_rid
    assert h.engine.allocator.num_free_blocks == NUM_BLOCKS
