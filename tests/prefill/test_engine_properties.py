"""Property test of the prefill engine's request bookkeeping: random interleavings of add,
cancel, step start and finish, transfer done, failed or never begun, and a dead decode peer.

Invariants: no exception; every block's reference count equals the number of live requests that
hold it (no block owned twice, none leaked); every request is answered at most once, and exactly
once unless it was cancelled first; at the end every block is free and no request is left.
"""
from collections import Counter
from concurrent.futures import Future

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models.batch import SampleResult
from models.request_options import RequestOptions
from prefill.engine import PrefillEngine
from tests.conftest import NUM_BLOCKS

OPS = ("add", "add", "cancel", "start", "finish", "finish", "done", "failed", "peer_dead")


class Harness:
    """Plays rank 0's event loop, with the model thread and the sender thread as test choices."""

    def __init__(self, engine: PrefillEngine):
        self.engine = engine
        self.plan = None                  # the step on the model thread, if any
        self.pending: dict[str, Future] = {}
        self.answers = Counter()
        self.cancelled_unanswered: set[str] = set()
        self.rids: list[str] = []

    def book(self, answers) -> None:
        for answer in answers:
            self.answers[answer.request.rid] += 1

    def add(self, n: int, seed: int) -> None:
        rid = f"r{len(self.rids)}"
        self.rids.append(rid)
        prompt = [(seed * 31 + i * 7) % 120 + 3 for i in range(n)]
        # No transfer is ever begun here (the test plays the sender), and a destination that
        # names no decode rank keeps the rejects of never-begun transfers off the network.
        self.engine.add(rid, f"t-{rid}", prompt, RequestOptions(temperature=0.0), {}, 0)

    def cancel(self, index: int) -> None:
        if self.rids:
            rid = self.rids[index % len(self.rids)]
            if self.answers[rid] == 0:
                self.cancelled_unanswered.add(rid)
            self.book(self.engine.abort(rid))

    def start(self) -> None:
        if self.plan is None:
            self.plan = self.engine.build_plan()
            if self.plan is not None and self.plan.chunks == ():
                assert self.plan.aborts     # a plan without chunks exists only to abort

    def finish(self, fail_begin: bool) -> None:
        if self.plan is None:
            return
        plan, self.plan = self.plan, None
        begun = [s.transfer_id for s in plan.sends if s.begin]
        failed = [[begun[0], "cannot begin"]] if fail_begin and begun else []
        started = {tid: Future() for tid in begun if [tid, "cannot begin"] not in failed}
        self.pending.update(started)
        self.book(self.engine.apply({"results": [SampleResult(5, -1.0) for _ in plan.chunks],
                                     "failed": failed, "started": started}))

    def resolve(self, index: int, error: str | None) -> None:
        if self.pending:
            tid = sorted(self.pending)[index % len(self.pending)]
            self.pending.pop(tid)
            self.book(self.engine.settle(tid, error))

    def peer_dead(self) -> None:
        for tid in sorted(self.pending):
            self.pending.pop(tid)
            self.book(self.engine.settle(tid, "decode worker died"))

    def check_ownership(self) -> None:
        alloc = self.engine.allocator
        owners = Counter(b for r in self.engine.scheduler.by_rid.values() for b in r.block_ids)
        for block in range(NUM_BLOCKS):
            assert alloc.ref_count(block) == owners[block], (block, alloc.ref_count(block), owners[block])

    def drain(self) -> None:
        for _ in range(200):
            self.finish(False)
            for tid in sorted(self.pending):
                self.pending.pop(tid)
                self.book(self.engine.settle(tid, None))
            self.start()
            if self.plan is None and not self.pending:
                break
            self.check_ownership()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 50), st.integers(1, 30)),
                    max_size=60))
def test_any_interleaving_keeps_the_books(prefill_parts, ops):
    runner, transfers = prefill_parts
    h = Harness(PrefillEngine(runner, transfers, max_num_batched_tokens=8, max_num_seqs=3))
    for op, index, size in ops:
        if op == "add":
            h.add(size, index)
        elif op == "cancel":
            h.cancel(index)
        elif op == "start":
            h.start()
        elif op == "finish":
            h.finish(fail_begin=index % 5 == 0)
        elif op in ("done", "failed"):
            h.resolve(index, None if op == "done" else "transfer failed")
        else:
            h.peer_dead()
        h.check_ownership()
    h.drain()
    assert max(h.answers.values(), default=0) <= 1, h.answers
    for rid in h.rids:
        assert h.answers[rid] == 1 or rid in h.cancelled_unanswered, rid
    assert h.engine.num_requests == 0 and not h.engine.scheduler.by_rid
    assert h.engine.allocator.num_free_blocks == NUM_BLOCKS
