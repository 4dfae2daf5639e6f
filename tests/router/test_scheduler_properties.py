"""Property test of the router's request state machine (router/scheduler.py).

Hypothesis drives the scheduler through random interleavings of client and worker events:
requests added and cancelled, reservations granted or refused, first tokens, Started, decode
tokens (with or without a finish), worker errors, workers dying and coming back, stalled
hand-offs, clients disconnecting, and time passing for the retry timers. Workers answer any
message they ever received, late or not, as real ones may. Invariants:
- no exception, and the load accounting always equals the sum over live requests;
- every request is answered exactly once (an error, or a chunk with a finish reason), unless
  its client disconnected; nothing is answered twice;
- once every request is over, nothing is left in any table, no worker is charged for anything,
  and every worker that was handed a request was told to free it or ended it itself.
The Outbox records instead of sending: the sockets are tested elsewhere (test_router.py).
"""
import asyncio
import time
from collections import defaultdict

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router import protocol as P
from router.config import RouterConfig
from router.request import State
from router.scheduler import RequestScheduler
from router.watchdog import Watchdog
from router.workers import WorkerRegistry
from tests.router.helpers import FINGERPRINT, model_info
from tests.router.test_workers import info as worker_info

CAPS = {"transports": ["zmq"], "host": "h", "boot_id": "b", "shm_id": "s"}
WORKERS = [("p0", "prefill"), ("p1", "prefill"), ("d0", "decode"), ("d1", "decode")]
CLIENTS = [b"c0", b"c1"]


class RecordingOutbox:
    """What the scheduler sends: per-worker messages and per-request client answers."""

    def __init__(self):
        self.to_workers: list[tuple[object, P.Message]] = []
        self.answers: dict[tuple[bytes, str], list] = defaultdict(list)

    def to_worker(self, worker, msg):
        self.to_workers.append((worker, msg))

    def chunk(self, req, token_ids, text, finish_reason):
        if finish_reason is not None:
            self.answers[(req.client, req.client_rid)].append(("chunk", finish_reason))
        return True

    def error(self, client, client_rid, code, message):
        self.answers[(client, client_rid)].append(("error", code))


_progress = [  # the happy path, drawn more often than the faults
    st.tuples(st.just("add"), st.integers(0, 1), st.integers(1, 40), st.integers(1, 6), st.booleans()),
    st.tuples(st.just("allocated"), st.integers(0, 6), st.booleans()),
    st.tuples(st.just("started"), st.integers(0, 6)),
    st.tuples(st.just("first"), st.integers(0, 6), st.sampled_from([None, None, "stop", "length"])),
    st.tuples(st.just("tokens"), st.integers(0, 6), st.sampled_from([None, None, "stop", "length"])),
]
_faults = [
    st.tuples(st.just("cancel"), st.integers(0, 50)),
    st.tuples(st.just("worker_error"), st.integers(0, 6)),
    st.tuples(st.just("dead"), st.integers(0, 3)),
    st.tuples(st.just("revive"), st.integers(0, 3)),
    st.tuples(st.just("stall")),
    st.tuples(st.just("client_gone"), st.integers(0, 1)),
    st.tuples(st.just("sleep")),
]
ops = st.one_of(*_progress, *_progress, *_progress, *_faults)


class Harness:
    def __init__(self):
        self.config = RouterConfig(frontend="ipc:///tmp/unused-c.ipc", backend="ipc:///tmp/unused-w.ipc",
                                   max_queue=16, max_attempts=4)
        self.registry = WorkerRegistry(FINGERPRINT)
        self.outbox = RecordingOutbox()
        self.sched = RequestScheduler(self.config, self.registry, self.outbox, model_info())
        self.watchdog = Watchdog(self.sched, time.monotonic())
        self.workers = {}
        for wid, role in WORKERS:
            self.register(wid, role)
        self.sent: list[tuple[bytes, str]] = []
        self.gone: set[bytes] = set()
        self.holds: set[tuple[int, str]] = set()  # (worker, rid) a worker holds state for
        self._seen = 0

    def register(self, wid: str, role: str) -> None:
        info = worker_info(role, fingerprint=FINGERPRINT, transports=CAPS, num_blocks=24)
        self.workers[wid] = self.registry.register(wid.encode() + str(time.monotonic_ns()).encode(), wid, info,
                                                   time.monotonic())
        self.sched.on_capacity(self.workers[wid])

    def target(self, kind, index, states, role="decode"):
        """(worker, msg) for a worker event: mostly a live attempt in one of ``states`` (the
        worker it is on, and the message that worker got for it); with ``index`` 6, any message
        of type ``kind`` some worker ever got, however stale. None if there is none."""
        if index < 6:
            live = [r for r in self.sched.requests.values() if r.state in states and getattr(r, role)]
            if not live:
                return None
            req = live[index % len(live)]
            worker = getattr(req, role)
            return worker, kind(req.transfer_id, req.transfer_id, [], {}, {}) if kind is P.Prefill \
                else P.Allocate(req.transfer_id, req.transfer_id, [], {})
        msgs = [(w, m) for w, m in self.outbox.to_workers if isinstance(m, kind)]
        return msgs[len(self.sent) % len(msgs)] if msgs else None

    async def apply(self, op) -> None:
        sched, name = self.sched, op[0]
        if name == "add":
            _, c, n, max_tokens, stream = op
            rid = f"r{len(self.sent)}"
            self.sent.append((CLIENTS[c], rid))
            sched.submit(CLIENTS[c], P.Generate(rid, None, [5] * n, {"max_tokens": max_tokens}, stream))
        elif name == "cancel" and self.sent:
            client, rid = self.sent[op[1] % len(self.sent)]
            sched.cancel(client, rid)
        elif name == "allocated":
            got = self.target(P.Allocate, op[1], {State.ALLOCATING})
            if got and got[0].alive:
                w, m = got
                dest = {"transport": "zmq", "ranks": []} if op[2] else None
                if not op[2]:
                    self.holds.discard((id(w), m.rid))  # a refusing worker keeps nothing
                sched.on_allocated(w, P.Allocated(m.rid, m.transfer_id, dest, None if op[2] else "full"))
        elif name == "started":
            got = self.target(P.Allocate, op[1], {State.PREFILLING, State.DECODING})
            if got and got[0].alive:
                sched.on_started(got[0], P.Started(got[1].rid, got[1].transfer_id))
        elif name == "first":
            got = self.target(P.Prefill, op[1], {State.PREFILLING}, "prefill")
            if got and got[0].alive:
                self.holds.discard((id(got[0]), got[1].rid))  # prefill is done with it
                sched.on_first_token(got[0], P.FirstToken(got[1].rid, got[1].transfer_id, 9, 0.0, op[2]))
        elif name == "tokens":
            got = self.target(P.Allocate, op[1], {State.PREFILLING, State.DECODING})
            if got and got[0].alive:
                if op[2] is not None:
                    self.holds.discard((id(got[0]), got[1].rid))  # it ended the request itself
                sched.on_tokens(got[0], P.Tokens(got[0].worker_id, 1, [[got[1].rid, 10, 0.0, op[2]]]))
        elif name == "worker_error":
            got = self.target(P.Allocate, op[1], {State.ALLOCATING, State.PREFILLING, State.DECODING},
                              "prefill" if op[1] % 2 else "decode")
            if got and got[0].alive:
                sched.on_worker_error(got[0], P.WorkerError(got[1].rid, got[1].transfer_id, "boom"))
        elif name == "dead":
            w = self.workers[WORKERS[op[1]][0]]
            if self.registry.mark_dead(w):
                self.holds = {h for h in self.holds if h[0] != id(w)}  # its process is gone
                sched.on_worker_dead(w)
        elif name == "revive":
            wid, role = WORKERS[op[1]]
            if not self.workers[wid].alive:
                self.register(wid, role)
        elif name == "stall":
            self.watchdog.tick(time.monotonic() + 1000)  # every hand-off and wait is overdue
        elif name == "client_gone":
            self.gone.add(CLIENTS[op[1]])
            sched.client_gone(CLIENTS[op[1]])
        elif name == "sleep":
            await asyncio.sleep(0.03)  # refusal retry timers fire

    def track_holds(self) -> None:
        for w, m in self.outbox.to_workers[self._seen:]:
            if isinstance(m, (P.Allocate, P.Prefill)):
                self.holds.add((id(w), m.rid))
            elif isinstance(m, P.Free):
                self.holds.discard((id(w), m.rid))
        self._seen = len(self.outbox.to_workers)

    def check_accounting(self) -> None:
        self.track_holds()
        sched = self.sched
        live = list(sched.requests.values())
        assert {r.rid for r in sched.waiting} == {r.rid for r in live if r.state is State.QUEUED}
        assert len(sched.waiting) == len({id(r) for r in sched.waiting})
        assert set(sched.attempts.values()) <= set(live)
        for w in self.workers.values():
            assert w.reserved_blocks == sum(r.num_blocks for r in live if r.decode is w)
            assert w.outstanding_tokens == sum(r.prefill_tokens for r in live if r.prefill is w)
            assert w.reserved_blocks >= 0 and w.num_decoding >= 0 and w.num_prefilling >= 0
        for key, answers in self.outbox.answers.items():
            assert len(answers) == 1, f"{key} answered {answers}"


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ops, max_size=60))
def test_every_request_is_answered_once_and_nothing_is_left(script):
    async def run():
        h = Harness()
        for op in script:
            await h.apply(op)
            h.check_accounting()
        for client, rid in h.sent:   # drain: every request still live is cancelled
            h.sched.cancel(client, rid)
        h.check_accounting()
        sched = h.sched
        assert not sched.requests and not sched.waiting and not sched.attempts and not sched.by_client
        assert len(sched.tokenizer) == 0
        for w in h.workers.values():
            assert (w.reserved_blocks, w.num_decoding, w.outstanding_tokens, w.num_prefilling) == (0, 0, 0, 0)
        for client, rid in h.sent:
            answers = h.outbox.answers.get((client, rid), [])
            assert len(answers) == (0 if client in h.gone and not answers else 1), (rid, answers)
        assert not h.holds, "workers still hold requests nobody will free"

    asyncio.run(run())
