"""Liveness from progress: the rules on their own, then a real router declaring a worker that
heartbeats with work but no steps dead, failing its request over, and refusing that process."""
import asyncio

import pytest

from router import protocol as P
from router.client import AsyncClient, Unavailable
from router.liveness import Progress, verdict
from router.payloads import HeartbeatStats
from router.worker_link import RegistrationRefused, WorkerLink
from tests.router.helpers import FINGERPRINT, make_router
from tests.router.test_workers import info as worker_info

CAPS = {"transports": ["zmq"], "host": "h", "boot_id": "b", "shm_id": "s"}


def beat(num_steps, has_work, health=None):
    return HeartbeatStats(num_blocks=10, free_blocks=10, num_steps=num_steps, has_work=has_work, health=health)


def test_progress_counts_only_busy_time_and_learns_the_slowest_step():
    p = Progress()
    p.observe(beat(0, False), 0.0)
    p.observe(beat(0, False), 50.0)   # idle for long: never stuck
    assert p.stuck_for(60.0, 5.0) is None
    p.observe(beat(0, True), 51.0)
    p.observe(beat(1, True), 54.0)    # a 4 s step (since idle at 50)
    assert p.slowest_step_s == 4.0
    assert p.stuck_for(62.9, 5.0) is None                  # 8.9 s < 5 s past the slowest 4 s
    assert p.stuck_for(63.5, 5.0) == pytest.approx(9.5)
    assert verdict(p, 64.0, 64.0, 5.0, 5.0)[0] == "stuck"
    p.observe(beat(2, True, "the KV receiver thread died: EOF"), 65.0)
    assert verdict(p, 65.0, 65.0, 5.0, 5.0) == ("unhealthy", "reported itself unhealthy: the KV receiver "
                                                             "thread died: EOF")
    assert verdict(Progress(), 0.0, 6.0, 5.0, 5.0) == ("silent", "sent nothing for 6.0s")
    assert verdict(Progress(), 0.0, 6.0, 7.0, 5.0) is None  # no heartbeat yet: the silent rule only


async def test_a_worker_with_work_and_no_steps_is_declared_stuck_and_its_requests_fail_over(tmp_path):
    thread = make_router(tmp_path, stuck_timeout_s=0.3, heartbeat_timeout_s=30.0)
    steps = {"d0": {"num_steps": 5, "has_work": False}, "d1": {"num_steps": 0, "has_work": False}}
    links = {}
    for wid, role in (("p0", "prefill"), ("d0", "decode"), ("d1", "decode")):
        links[wid] = WorkerLink(thread.config.backend, wid,
                                worker_info(role, fingerprint=FINGERPRINT, transports=CAPS, pid=100 + len(links),
                                            num_blocks=100 if wid != "d1" else 10),
                                stats=(lambda w=wid: dict(steps.get(w, {}))), heartbeat_s=0.05)
        await links[wid].connect()
    p0, d0, d1 = links.values()
    try:
        async with AsyncClient(thread.config.frontend, timeout=30) as client:
            stream = client.generate(prompt_token_ids=[1, 2, 3], max_tokens=20, ignore_eos=True)
            alloc = await asyncio.wait_for(d0.recv(), 10)   # d0: the most free blocks
            steps["d0"]["has_work"] = True                  # ... and then no step completes
            again = await asyncio.wait_for(d1.recv(), 10)   # failed over after the stuck bound
            assert again.token_ids == alloc.token_ids and again.rid != alloc.rid
            status = await client.status()
            (dead,) = [w for w in status["workers"] if w["id"] == "d0"]
            assert (dead["alive"], dead["dead_rule"]) == (False, "stuck")
            assert dead["dead_reason"].startswith("had work but completed no step for")
            assert status["router"]["failovers"] == 1
            await stream.aclose()
        # The stuck process speaks again: told it is unknown, it registers again and is refused.
        with pytest.raises(RegistrationRefused, match=r"pid 101\) was declared dead: stuck: had work"):
            await asyncio.wait_for(d0.recv(), 10)
    finally:
        for link in links.values():
            await link.close()
        thread.stop()
    assert isinstance(alloc, P.Allocate)


async def test_a_stopped_prefill_workers_request_moves_to_the_live_one_then_its_kill_changes_nothing(tmp_path):
    """A SIGSTOPped prefill worker keeps its connection but neither heartbeats nor answers: the
    silence rule declares it dead and its request completes on the other prefill worker, well
    before ``unavailable_timeout_s``; the later SIGKILL (its connection drops) changes nothing.
    With every prefill worker dead or stopped, ``unavailable`` is the right answer: that, not a
    router gap, is what striking the running worker rather than the stopped one produces."""
    thread = make_router(tmp_path, heartbeat_timeout_s=0.5, unavailable_timeout_s=1.5, stuck_timeout_s=30.0)
    links = {}
    for wid, role in (("p0", "prefill"), ("p1", "prefill"), ("d0", "decode")):
        links[wid] = WorkerLink(thread.config.backend, wid,
                                worker_info(role, fingerprint=FINGERPRINT, transports=CAPS, pid=200 + len(links)),
                                stats=lambda: {"num_steps": 0, "has_work": False}, heartbeat_s=0.05)
        await links[wid].connect()
    p0, p1, d0 = links.values()

    async def hand_off(prefill_link):
        alloc = await asyncio.wait_for(d0.recv(), 10)
        assert isinstance(alloc, P.Allocate)
        d0.send(P.Allocated(alloc.rid, alloc.transfer_id, {"blocks": [0]}))
        prefill = await asyncio.wait_for(prefill_link.recv(), 10)
        assert isinstance(prefill, P.Prefill) and prefill.transfer_id == alloc.transfer_id
        return alloc

    try:
        p0._heartbeat_task.cancel()  # SIGSTOP: the socket stays connected, nothing more is said
        async with AsyncClient(thread.config.frontend, timeout=30) as client:
            done = asyncio.ensure_future(client.complete(prompt_token_ids=[1, 2, 3], max_tokens=2,
                                                         ignore_eos=True))
            first = await hand_off(p0)  # p0 (ties go to the lower id) sits on it
            # p0 declared silent: d0 hears that its writer is dead, and the attempt ends.
            assert await asyncio.wait_for(d0.recv(), 10) == P.PeerDead("p0")
            assert await asyncio.wait_for(d0.recv(), 10) == P.Free(first.rid)
            again = await hand_off(p1)
            assert again.token_ids == first.token_ids and again.rid != first.rid
            await p0.close()  # SIGKILL: the connection drops; nothing depends on p0 any more
            p1.send(P.FirstToken(again.rid, again.transfer_id, 7, -0.5))
            d0.send(P.Started(again.rid, again.transfer_id))
            d0.send(P.Tokens("d0", 1, [[again.rid, 8, -0.5, "length"]]))
            result = await asyncio.wait_for(done, 10)
            assert result.token_ids == [7, 8]
            status = await client.status()
            (dead,) = [w for w in status["workers"] if w["id"] == "p0"]
            assert (dead["alive"], dead["dead_rule"]) == (False, "silent")
            assert status["router"]["failovers"] == 1
            # No live prefill worker at all (p1 killed too): after the wait, unavailable.
            await p1.close()
            with pytest.raises(Unavailable, match="no worker could serve the request for 1.5s"):
                await client.complete(prompt_token_ids=[1, 2, 3], max_tokens=2)
    finally:
        for link in links.values():
            await link.close()
        thread.stop()
