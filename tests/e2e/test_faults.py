"""Issue 6 through real processes that are really killed: failover without lost or duplicated
tokens, a missing role, router death, an abort storm, and no leaked KV after any of them."""
import asyncio
import random
import signal
import time

import pytest

from router.client import AsyncClient, Client, Unavailable
from router.launcher import LocalCluster
from tests.e2e.helpers import greedy_reference, unrestarted_workers, wait_all_blocks_free, wait_kv_free_after

pytestmark = pytest.mark.slow

LAYOUTS = {"disagg": {"mode": "disagg", "num_prefill": 1, "num_decode": 2},
           "colocated": {"mode": "colocated", "num_workers": 2}}
NUM_STREAMS = 64
MAX_TOKENS = 96  # long enough that a fault lands while every stream is running
CLIENT_TIMEOUT_S = 120  # past the router's 30 s hand-off retry, well short of a hang


def workload():
    rng = random.Random(6)
    prompts = [[rng.randrange(32, 127) for _ in range(rng.randrange(4, 60))] for _ in range(NUM_STREAMS)]
    # Half greedy, half seeded sampling: both must resume exactly after a failover.
    params = [{"temperature": 0} if i % 2 == 0 else {"temperature": 0.8, "seed": 1000 + i}
              for i in range(NUM_STREAMS)]
    return prompts, params


async def run_streams(endpoint, prompts, params, fault=None, fault_after_tokens=0):
    """Stream every request; once ``fault_after_tokens`` tokens arrived in total, call ``fault``."""
    received = 0
    fired = asyncio.Event()

    async def one(client, prompt, p):
        nonlocal received
        tokens = []
        async for chunk in client.generate(prompt_token_ids=prompt, max_tokens=MAX_TOKENS,
                                           ignore_eos=True, **p):
            tokens += chunk.token_ids
            received += len(chunk.token_ids)
            if fault is not None and not fired.is_set() and received >= fault_after_tokens:
                fired.set()
                await asyncio.get_running_loop().run_in_executor(None, fault)
        return tokens

    async with AsyncClient(endpoint, timeout=CLIENT_TIMEOUT_S) as client:
        results = await asyncio.gather(*(one(client, pr, p) for pr, p in zip(prompts, params)))
    assert fault is None or fired.is_set()
    return results


def kill_busiest(cluster, role, killed: list):
    """SIGKILL the live worker of ``role`` with the most requests assigned right now."""
    with Client(cluster.endpoint, timeout=30) as client:
        workers = [w for w in client.status()["workers"] if w["alive"] and w["role"] == role]
    victim = max(workers, key=lambda w: w["assigned"])
    assert victim["assigned"] > 0, "the fault came too late: nothing in flight"
    cluster.kill_worker(victim["id"], signal.SIGKILL)
    killed.append(victim["id"])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_killed_decode_worker_loses_and_duplicates_nothing(layout, tiny_model):
    prompts, params = workload()
    greedy = greedy_reference(tiny_model, prompts[::2], MAX_TOKENS, stop_ids=())
    role = "decode" if layout == "disagg" else "both"
    with LocalCluster(str(tiny_model), num_kv_blocks=1024, **LAYOUTS[layout]) as cluster:
        undisturbed = asyncio.run(run_streams(cluster.endpoint, prompts, params))
        assert undisturbed[::2] == greedy
        killed = []
        disturbed = asyncio.run(run_streams(cluster.endpoint, prompts, params,
                                            fault=lambda: kill_busiest(cluster, role, killed),
                                            fault_after_tokens=NUM_STREAMS * 2))
        (victim,) = killed
        assert disturbed == undisturbed  # every token once, in order, greedy and seeded alike
        with Client(cluster.endpoint, timeout=30) as client:
            status = client.status()
            assert status["router"]["failovers"] > 0
            assert [w["alive"] for w in status["workers"] if w["id"] == victim] == [False]
            wait_all_blocks_free(client)
            # The restarted worker registers again and takes load.
            cluster.start_worker(role, victim)
            cluster.wait_for_workers(len(cluster.roles), 120)
            again = asyncio.run(run_streams(cluster.endpoint, prompts[:16], params[:16]))
            assert again == undisturbed[:16]
            (back,) = [w for w in client.status()["workers"] if w["id"] == victim and w["alive"]]
            assert back["num_decoded"] > 0
            wait_all_blocks_free(client)


@pytest.mark.parametrize("transport", ["zmq", "shm", "nixl"])
def test_killed_prefill_worker_loses_nothing(transport, tiny_model):
    if transport == "nixl":
        pytest.importorskip("nixl")
    prompts, params = workload()
    prompts = [p * 4 for p in prompts]  # long prompts keep the prefill workers busy
    # A small prefill budget spreads the prompts over many steps, so the kill lands mid-prefill.
    with LocalCluster(str(tiny_model), num_kv_blocks=2048, mode="disagg", num_prefill=2,
                      num_decode=1, kv_transport=transport, max_num_batched_tokens=128) as cluster:
        undisturbed = asyncio.run(run_streams(cluster.endpoint, prompts, params))
        killed = []
        disturbed = asyncio.run(run_streams(cluster.endpoint, prompts, params,
                                            fault=lambda: kill_busiest(cluster, "prefill", killed),
                                            fault_after_tokens=1))
        assert len(killed) == 1
        assert disturbed == undisturbed
        with Client(cluster.endpoint, timeout=30) as client:
            wait_all_blocks_free(client)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_requests_wait_for_a_missing_role_then_fail_clearly(layout, tiny_model):
    options = dict(LAYOUTS[layout], num_decode=1) if layout == "disagg" else dict(LAYOUTS[layout], num_workers=1)
    role = "decode" if layout == "disagg" else "both"
    with LocalCluster(str(tiny_model), num_kv_blocks=256, router_options={"unavailable_timeout_s": 1.0},
                      **options) as cluster:
        cluster.kill_worker(f"{role}-0")
        with Client(cluster.endpoint, timeout=60) as client:
            start = time.monotonic()
            with pytest.raises(Unavailable, match="no worker could serve the request for 1s"):
                client.complete(prompt_token_ids=[1, 2, 3], max_tokens=4)
            assert time.monotonic() - start >= 1.0
            cluster.start_worker(role, f"{role}-0")
            cluster.wait_for_workers(len(cluster.roles), 120)
            assert len(client.complete(prompt_token_ids=[1, 2, 3], max_tokens=4).token_ids) == 4


def test_router_death_is_noticed_by_clients_and_workers(tiny_model):
    with LocalCluster(str(tiny_model), num_kv_blocks=256, mode="colocated", num_workers=1,
                      router_in_process=False) as cluster:
        with Client(cluster.endpoint, timeout=60) as client:
            stream = client.generate(prompt_token_ids=list(range(1, 40)), max_tokens=5000, ignore_eos=True)
            next(stream)
            cluster.kill_router(signal.SIGKILL)
            with pytest.raises(Unavailable, match="lost the connection to the router"):
                for _ in stream:
                    pass
        cluster.start_router()
        cluster.wait_for_workers(1, 60)  # the worker aborted everything and registered again
        with Client(cluster.endpoint, timeout=60) as client:
            (worker,) = wait_all_blocks_free(client)
            assert worker["running"] == 0
            assert len(client.complete(prompt_token_ids=[5, 6], max_tokens=3, ignore_eos=True).token_ids) == 3


STORM_SIZE = 1000
STORM_BUDGET = 64  # max_num_batched_tokens: prompts up to 3x this run as several chunks
STORM_ARRIVALS_S = 4.0  # requests arrive over this long, so cancels land at every stage
FRESH = list(range(40, 140))  # longer than the budget: 2 chunks


def storm_plan(seed: int) -> list[tuple[float, list[int], str, float]]:
    """Per request: when it starts, its prompt, and when to cancel it: after ``n`` chunks
    ("chunks") or ``t`` seconds after its start ("seconds"; it may have finished by then)."""
    rng = random.Random(seed)
    plan = []
    for _ in range(STORM_SIZE):
        start = rng.uniform(0.0, STORM_ARRIVALS_S)
        prompt = [rng.randrange(32, 127) for _ in range(rng.randrange(2, 3 * STORM_BUDGET))]
        plan.append((start, prompt, "chunks", rng.randrange(0, 8)) if rng.random() < 0.5
                    else (start, prompt, "seconds", 10 ** rng.uniform(-3, 0.5)))  # 1 ms to 3 s
    return plan


@pytest.mark.parametrize("layout", ["disagg", "colocated"])
def test_abort_storm_leaks_no_kv(layout, tiny_model):
    """1,000 requests (a fixed seed) of random lengths, many over the prefill budget, cancelled
    at random moments: afterwards no worker exited, the KV is all free and a fresh request exact."""
    options = {"mode": "disagg"} if layout == "disagg" else {"mode": "colocated", "num_workers": 1}
    (fresh,) = greedy_reference(tiny_model, [FRESH], 12, stop_ids=())

    async def one(client, start, prompt, when, amount):
        await asyncio.sleep(start)
        stream = client.generate(prompt_token_ids=prompt, max_tokens=40, ignore_eos=True)
        if when == "seconds":
            await asyncio.sleep(amount)
        else:
            for _ in range(amount):
                if (await stream.__anext__()).finish_reason:
                    return
        await stream.aclose()

    async def storm(endpoint):
        async with AsyncClient(endpoint, timeout=CLIENT_TIMEOUT_S) as client:
            await asyncio.gather(*(one(client, *planned) for planned in storm_plan(1000)))

    with LocalCluster(str(tiny_model), num_kv_blocks=512, max_num_batched_tokens=STORM_BUDGET,
                      supervise=True, **options) as cluster:
        with Client(cluster.endpoint, timeout=30) as client:
            pids = {w["id"]: w["pid"] for w in wait_all_blocks_free(client)}  # after a first heartbeat
            asyncio.run(storm(cluster.endpoint))
            # A fresh request is exact, and the KV is free in heartbeats sent after it ran.
            steps = {w["id"]: w["stats"]["num_steps"] for w in unrestarted_workers(client.status(), pids)}
            assert client.complete(prompt_token_ids=FRESH, max_tokens=12, ignore_eos=True,
                                   temperature=0).token_ids == fresh
            router = wait_kv_free_after(client, pids, steps, timeout_s=60)["router"]
            assert router["active"] == 0 and router["queued"] == 0
            assert router["aborted"] + router["finished"] == STORM_SIZE + 1
