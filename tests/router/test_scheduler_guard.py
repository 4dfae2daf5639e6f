"""A defect while placing one request fails that request alone; the queue behind it goes on."""
import asyncio

from router import protocol as P
from tests.router.test_scheduler_properties import Harness, RecordingOutbox

POISON = 7  # prompt token whose Allocate the outbox below cannot send


class PoisonOutbox(RecordingOutbox):
    """Raises, as an encoding failure would, for the Allocate of any request carrying POISON."""

    def to_worker(self, worker, msg):
        if isinstance(msg, P.Allocate) and POISON in msg.token_ids:
            raise OverflowError("int too big to convert")
        super().to_worker(worker, msg)


def test_a_request_that_cannot_be_placed_fails_alone_and_the_queue_goes_on():
    async def run():
        harness = Harness()
        harness.outbox = harness.sched.outbox = PoisonOutbox()
        sched = harness.sched
        sched.submit(b"c0", P.Generate("bad", None, [POISON] * 4, {"max_tokens": 2}, False))
        sched.submit(b"c0", P.Generate("good", None, [5] * 4, {"max_tokens": 2}, False))
        sched.submit(b"c1", P.Generate("bad2", None, [5, POISON], {"max_tokens": 2}, False))
        sched.submit(b"c1", P.Generate("good2", None, [5] * 3, {"max_tokens": 2}, False))
        answers = harness.outbox.answers
        assert answers[(b"c0", "bad")] == [("error", P.ERR_INTERNAL)]
        assert answers[(b"c1", "bad2")] == [("error", P.ERR_INTERNAL)]
        placed = sorted(m.token_ids for _, m in harness.outbox.to_workers
                        if isinstance(m, P.Allocate))
        assert placed == [[5] * 3, [5] * 4]  # both good requests reached a decode worker
        assert sorted(r.client_rid for r in sched.requests.values()) == ["good", "good2"]
        assert not sched.waiting
        # Nothing of the failed ones is charged to any worker.
        charged = sum(w.reserved_blocks for w in harness.workers.values())
        assert charged == sum(r.num_blocks for r in sched.requests.values()) > 0
        assert sched.counters["failed"] == 2

    asyncio.run(run())
