"""The router's request state machine, driven message by message: real router, real client,
and WorkerLinks whose every message the test writes, so each step's effect is exact."""
import asyncio

import pytest

from router import protocol as P
from router.client import AsyncClient, InternalError
from router.worker_link import WorkerLink
from tests.router.helpers import FINGERPRINT, make_router
from tests.router.test_workers import info as worker_info

CAPS = {"transports": ["zmq"], "host": "h", "boot_id": "b", "shm_id": "s"}


async def register_pair(router):
    links = []
    for role, wid in (("prefill", "p0"), ("decode", "d0")):
        link = WorkerLink(router.config.backend, wid, worker_info(role, fingerprint=FINGERPRINT, transports=CAPS),
                          stats=dict, heartbeat_s=0.05)
        await link.connect()
        links.append(link)
    return links


async def recv(link):
    return await asyncio.wait_for(link.recv(), 10)


async def test_lifecycle_holds_early_tokens_and_frees_on_stop_string(tmp_path):
    thread = make_router(tmp_path)
    p0, d0 = await register_pair(thread)
    try:
        async with AsyncClient(thread.config.frontend, timeout=10) as client:
            stream = client.generate("hi", max_tokens=10, stop="cd", temperature=0, seed=3)
            alloc = await recv(d0)
            assert isinstance(alloc, P.Allocate) and alloc.rid == alloc.transfer_id
            assert (alloc.token_ids, alloc.output_index, alloc.transport, alloc.writer) == \
                ([256, ord("h"), ord("i")], 0, "zmq", "p0")
            assert alloc.sampling == {"max_tokens": 10, "temperature": 0.0, "top_p": 1.0, "top_k": 0,
                                      "seed": 3, "stop_token_ids": [], "ignore_eos": False}
            dest = {"transport": "zmq", "transfer_id": alloc.transfer_id, "ranks": []}
            d0.send(P.Allocated(alloc.rid, alloc.transfer_id, dest))
            prefill = await recv(p0)
            assert isinstance(prefill, P.Prefill) and prefill.dest == dest and prefill.token_ids == alloc.token_ids
            # The decode worker's tokens overtake the first token: held until it arrives.
            d0.send(P.Started(alloc.rid, alloc.transfer_id))
            d0.send(P.Tokens("d0", 1, [[alloc.rid, ord("b"), -0.1, None]]))
            await asyncio.sleep(0.1)
            p0.send(P.FirstToken(alloc.rid, alloc.transfer_id, ord("a"), -0.2))
            chunks = [await stream.__anext__(), await stream.__anext__()]
            assert [(c.token_ids, c.text) for c in chunks] == [([ord("a")], "a"), ([ord("b")], "b")]
            d0.send(P.Tokens("d0", 2, [[alloc.rid, ord("c"), -0.1, None], ["unknown", 5, 0.0, None], "junk"]))
            d0.send(P.Tokens("d0", 3, [[alloc.rid, ord("d"), -0.1, None]]))
            last = await stream.__anext__()   # "c" was held back as a possible start of "cd"
            assert (last.token_ids, last.text, last.finish_reason) == ([ord("c")], "", None)
            last = await stream.__anext__()
            assert (last.token_ids, last.text, last.finish_reason) == ([ord("d")], "", "stop")
            free = await recv(d0)              # stopped by the router: the decode worker is told
            assert free == P.Free(alloc.rid, P.FINISH_ABORT)
    finally:
        for link in (p0, d0):
            await link.close()
        thread.stop()


async def test_lost_handoffs_are_retried_with_new_ids_then_fail(tmp_path):
    thread = make_router(tmp_path, handoff_timeout_s=0.2, prefill_stall_timeout_s=0.3, max_attempts=2)
    p0, d0 = await register_pair(thread)
    try:
        async with AsyncClient(thread.config.frontend, timeout=10) as client:
            done = asyncio.ensure_future(client.complete(prompt_token_ids=[1, 2], max_tokens=3))
            first = await recv(d0)                                          # Allocated never comes
            assert await recv(d0) == P.Free(first.rid, P.FREE_UNWRITTEN)   # never handed to a writer
            second = await recv(d0)
            assert isinstance(second, P.Allocate) and second.rid != first.rid
            d0.send(P.Allocated(second.rid, second.transfer_id, {"transport": "zmq", "ranks": []}))
            assert isinstance(await recv(p0), P.Prefill)                    # FirstToken never comes
            assert await recv(d0) == P.Free(second.rid, P.FINISH_ABORT)
            assert await recv(p0) == P.Free(second.rid, P.FINISH_ABORT)
            with pytest.raises(InternalError, match="gave up after 2 attempts"):
                await done
    finally:
        for link in (p0, d0):
            await link.close()
        thread.stop()


async def test_decode_death_resumes_with_the_tokens_so_far(tmp_path):
    thread = make_router(tmp_path)
    p0, d0 = await register_pair(thread)
    spare = WorkerLink(thread.config.backend, "d1", worker_info("decode", fingerprint=FINGERPRINT, transports=CAPS),
                       stats=dict, heartbeat_s=0.05)
    try:
        async with AsyncClient(thread.config.frontend, timeout=10) as client:
            stream = client.generate(prompt_token_ids=[1, 2], max_tokens=4, ignore_eos=True, seed=9)
            alloc = await recv(d0)
            d0.send(P.Allocated(alloc.rid, alloc.transfer_id, {"transport": "zmq", "ranks": []}))
            await recv(p0)
            p0.send(P.FirstToken(alloc.rid, alloc.transfer_id, 7, 0.0))
            d0.send(P.Started(alloc.rid, alloc.transfer_id))
            d0.send(P.Tokens("d0", 1, [[alloc.rid, 8, 0.0, None]]))
            assert [(await stream.__anext__()).token_ids for _ in range(2)] == [[7], [8]]
            await spare.connect()
            await d0.close()  # the decode worker dies
            again = await recv(spare)
            assert (again.token_ids, again.output_index) == ([1, 2, 7, 8], 2)
            assert again.sampling["seed"] == 9 and again.rid != alloc.rid
            spare.send(P.Allocated(again.rid, again.transfer_id, {"transport": "zmq", "ranks": []}))
            assert (await recv(p0)).output_index == 2
            p0.send(P.FirstToken(again.rid, again.transfer_id, 9, 0.0))
            spare.send(P.Started(again.rid, again.transfer_id))
            spare.send(P.Tokens("d1", 1, [[again.rid, 10, 0.0, "length"]]))
            rest = [c async for c in stream]
            assert [c.token_ids for c in rest] == [[9], [10]] and rest[-1].finish_reason == "length"
            assert (await client.status())["router"]["failovers"] == 1
    finally:
        for link in (p0, d0, spare):
            await link.close()
        thread.stop()
