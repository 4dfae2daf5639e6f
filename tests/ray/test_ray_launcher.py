"""``--launcher ray`` on a real multi-node Ray cluster (tests/ray/conftest.py): parity across
nodes, transport by node identity, a killed actor and a killed node under load, scale up and
drain on scale-down while serving, and off-loopback without keys refused.

The tests share one cluster and run in file order: each leaves it serving 1 prefill + 1 decode.
"""
import asyncio
import random
import subprocess
import sys
import time

import pytest

ray = pytest.importorskip("ray", reason="the Ray launcher tests need Ray: pip install 'pdserve[ray]'")

from router.client import AsyncClient, Client  # noqa: E402
from router.ray_launcher import RayCluster, RayOptions  # noqa: E402
from router.status_table import format_status  # noqa: E402
from tests.e2e.helpers import greedy_reference, pid_alive, wait_all_blocks_free  # noqa: E402

pytestmark = pytest.mark.slow

NUM_STREAMS = 12
MAX_TOKENS = 128  # long enough that a fault lands while the streams run, even on a fast machine
TIMEOUT_S = 180  # past Ray's node-death detection and a worker's restart, well short of a hang


@pytest.fixture(scope="module")
def workload(tiny_model):
    rng = random.Random(14)
    prompts = [[rng.randrange(32, 127) for _ in range(rng.randrange(4, 40))] for _ in range(NUM_STREAMS)]
    return prompts, greedy_reference(tiny_model, prompts, MAX_TOKENS, stop_ids=())


async def _streams(endpoint, prompts, during=None, after_tokens=NUM_STREAMS, max_tokens=MAX_TOKENS):
    """Stream every prompt greedily; once ``after_tokens`` tokens arrived, run ``during()`` (in a
    thread) while the streams go on. Returns each stream's tokens."""
    received = 0
    fired = asyncio.Event()
    background = []

    async def one(client, prompt):
        nonlocal received
        tokens = []
        async for chunk in client.generate(prompt_token_ids=prompt, max_tokens=max_tokens,
                                           ignore_eos=True, temperature=0):
            tokens += chunk.token_ids
            received += len(chunk.token_ids)
            if during is not None and not fired.is_set() and received >= after_tokens:
                fired.set()
                background.append(asyncio.get_running_loop().run_in_executor(None, during))
        return tokens

    async with AsyncClient(endpoint, timeout=TIMEOUT_S) as client:
        results = await asyncio.gather(*(one(client, p) for p in prompts))
    assert during is None or fired.is_set(), "the fault came too late: every stream had finished"
    await asyncio.gather(*background)
    return results


def streams(cluster, prompts, during=None, after_tokens=NUM_STREAMS, max_tokens=MAX_TOKENS):
    return asyncio.run(_streams(cluster.endpoint, prompts, during, after_tokens, max_tokens))


SHORT_TOKENS = 24  # streams that need no fault to land while they run
LONG_TOKENS = 600  # a node's death takes a moment to take effect: streams long enough to outlast it


def status(cluster) -> dict:
    with Client(cluster.endpoint, timeout=60) as client:
        return client.status()


def live(cluster, role=None) -> list[dict]:
    return [w for w in status(cluster)["workers"] if w["alive"] and role in (None, w["role"])]


def wait_until(predicate, what, timeout_s=TIMEOUT_S):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s}s"
        time.sleep(0.1)


def settled(cluster, num_prefill=1, num_decode=1):
    """Wait until exactly these workers are live and every KV block is free again."""
    wait_until(lambda: (len(live(cluster, "prefill")), len(live(cluster, "decode"))) == (num_prefill, num_decode),
               f"{num_prefill} prefill + {num_decode} decode live")
    with Client(cluster.endpoint, timeout=60) as client:
        return wait_all_blocks_free(client, timeout_s=60)


def test_greedy_parity_with_prefill_and_decode_on_different_nodes(pd_cluster, workload):
    prompts, reference = workload
    assert streams(pd_cluster, prompts) == reference
    report = status(pd_cluster)
    print(format_status(report))
    nodes = {w["id"]: w["node"] for w in report["workers"]}
    assert nodes == {"prefill-0": pd_cluster.node_of("prefill-0"), "decode-0": pd_cluster.node_of("decode-0")}
    assert nodes["prefill-0"] != nodes["decode-0"]
    # Two Ray nodes on one machine share /dev/shm, but auto must not pick shm across nodes.
    (pair,) = report["pairs"]
    assert pair["prefill"] == "prefill-0" and pair["decode"] == "decode-0"
    assert pair["transport"] in ("nixl", "zmq")
    settled(pd_cluster)


def test_killed_decode_actor_fails_over_and_restarts(pd_cluster, workload):
    prompts, reference = workload
    before = {w["id"]: w["pid"] for w in live(pd_cluster)}
    failovers = status(pd_cluster)["router"]["failovers"]
    # Only one decode worker: its requests wait for Ray to restart it, then resume there.
    outputs = streams(pd_cluster, prompts, during=lambda: pd_cluster.kill_worker("decode-0"))
    assert outputs == reference  # nothing lost, nothing duplicated
    settled(pd_cluster)
    after = {w["id"]: w["pid"] for w in live(pd_cluster)}
    assert after["decode-0"] != before["decode-0"] and after["prefill-0"] == before["prefill-0"]
    assert status(pd_cluster)["router"]["failovers"] > failovers


def test_killed_node_fails_over_and_ray_restarts_its_worker(pd_cluster, ray_nodes, workload):
    prompts, reference = workload
    victim_node = pd_cluster.node_of("decode-0")
    (node,) = [n for n in ray_nodes.list_all_nodes() if n.node_id == victim_node]

    def kill_node():
        ray_nodes.remove_node(node, allow_graceful=False)

    try:
        # Longer than the transformers reference: compared with an undisturbed run instead.
        undisturbed = streams(pd_cluster, prompts, max_tokens=LONG_TOKENS)
        assert [out[:MAX_TOKENS] for out in undisturbed] == reference
        failovers = status(pd_cluster)["router"]["failovers"]
        outputs = streams(pd_cluster, prompts, during=kill_node, max_tokens=LONG_TOKENS)
        assert outputs == undisturbed
        settled(pd_cluster)
        assert status(pd_cluster)["router"]["failovers"] > failovers
        assert pd_cluster.node_of("decode-0") != victim_node
    finally:
        ray_nodes.add_node(num_cpus=1, object_store_memory=100 * 1024 * 1024)  # the spare, again


def test_scale_up_and_drain_down_while_serving(pd_cluster, ray_nodes, workload):
    prompts, reference = workload
    ray_nodes.add_node(num_cpus=1, object_store_memory=100 * 1024 * 1024)
    with Client(pd_cluster.endpoint, timeout=60) as client:
        # Up while serving: the new workers register and take load.
        def scale_up():
            result = client.scale(prefill=2, decode=2)
            assert sorted(result["added"]) == ["decode-1", "prefill-1"] and not result["draining"]
            wait_until(lambda: len(live(pd_cluster)) == 4, "the added workers registering")

        assert streams(pd_cluster, prompts, during=scale_up) == reference
        assert streams(pd_cluster, prompts) == reference
        used = {w["id"]: w["num_prefilled"] + w["num_decoded"] for w in live(pd_cluster)}
        assert used["prefill-1"] > 0 and used["decode-1"] > 0, used

        # Down while serving: the newest workers drain, finish what they hold, then go.
        failed = status(pd_cluster)["router"]["failed"]
        drained, held = [], {}

        def scale_down():
            held.update({w["id"]: w["assigned"] for w in live(pd_cluster)})
            drained.append(client.scale(prefill=1, decode=1))

        assert streams(pd_cluster, prompts, during=scale_down) == reference
        assert sorted(drained[0]["draining"]) == ["decode-1", "prefill-1"]
        assert held["decode-1"] > 0, held  # it had requests to finish while draining
        workers = settled(pd_cluster)
        assert sorted(w["id"] for w in workers) == ["decode-0", "prefill-0"]
        assert status(pd_cluster)["router"]["failed"] == failed  # no request failed
        wait_until(lambda: set(pd_cluster.groups) == {"prefill-0", "decode-0"}, "drained actors removed")



def test_concurrent_random_scaling_while_serving_ends_as_the_last_request(pd_cluster, ray_nodes, workload):
    """Three clients scale up and down at once, in a seeded random order, while streams run:
    no stream fails or changes, the cluster ends with the counts of a last request, and every
    removed worker's process is gone."""
    import threading

    prompts, reference = workload
    ray_nodes.add_node(num_cpus=1, object_store_memory=100 * 1024 * 1024)  # room for 2 + 2
    failed = status(pd_cluster)["router"]["failed"]
    pids_seen: set[int] = set()
    last: dict[int, tuple[int, int]] = {}
    errors: list[BaseException] = []

    def client_calls(seed: int) -> None:
        rng = random.Random(seed)
        try:
            with Client(pd_cluster.endpoint, timeout=60) as client:
                for _ in range(4):
                    wanted = (rng.randint(1, 2), rng.randint(1, 2))
                    result = client.scale(prefill=wanted[0], decode=wanted[1])
                    assert (result["prefill"], result["decode"]) == wanted, result
                    last[seed] = wanted
                    pids_seen.update(w["pid"] for w in client.status()["workers"] if w["pid"])
                    time.sleep(rng.uniform(0, 0.5))
        except BaseException as exc:  # re-raised below, in the test's thread
            errors.append(exc)

    def chaos() -> None:
        threads = [threading.Thread(target=client_calls, args=(seed,)) for seed in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT_S)

    assert streams(pd_cluster, prompts, during=chaos) == reference
    assert not errors, errors
    with Client(pd_cluster.endpoint, timeout=60) as client:
        counts = client.scale()  # no count: reads the counts in force
    final = (counts["prefill"], counts["decode"])
    assert final in last.values(), (final, last)
    settled(pd_cluster, *final)
    assert streams(pd_cluster, prompts) == reference
    assert status(pd_cluster)["router"]["failed"] == failed

    with Client(pd_cluster.endpoint, timeout=60) as client:
        client.scale(prefill=1, decode=1)
    workers = settled(pd_cluster)
    wait_until(lambda: set(pd_cluster.groups) == {w["id"] for w in workers}, "drained actors removed")
    kept = {w["pid"] for w in workers}
    wait_until(lambda: not any(pid_alive(pid) for pid in pids_seen - kept), "removed workers' processes exiting")


def test_serve_on_ray_stops_cleanly_on_sigterm_while_a_scale_up_is_under_way(ray_nodes, tiny_model, tmp_path):
    """``pdserve serve --launcher ray`` keeps its own SIGTERM handling (Ray's would exit 15
    with a stack dump): SIGTERM while added workers are still being placed exits 0, and no
    worker process outlives it."""
    import os
    import signal

    for _ in range(2):  # its own prefill and decode, beside the shared cluster's
        ray_nodes.add_node(num_cpus=1, object_store_memory=100 * 1024 * 1024)
    endpoint = f"ipc://{tmp_path}/c.ipc"
    with open(tmp_path / "serve.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "router.cli", "serve", "--launcher", "ray",
                                 "--ray-address", ray_nodes.address, "--model", str(tiny_model), "--listen",
                                 endpoint, "--no-http", "--num-kv-blocks", "64"],
                                stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
    try:
        assert "pdserve ready" in proc.stdout.readline(), (tmp_path / "serve.log").read_text()[-3000:]
        with Client(endpoint, timeout=60) as client:
            pids = [w["pid"] for w in client.status()["workers"]]
            result = client.scale(prefill=2, decode=3)  # more than the free CPUs: some stay pending
            assert sorted(result["added"]) == ["decode-1", "decode-2", "prefill-1"], result
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0, (tmp_path / "serve.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert "SIGTERM received" not in (tmp_path / "serve.log").read_text()
    wait_until(lambda: not any(pid_alive(pid) for pid in pids), "the served workers' processes exiting", 60)


def test_tensor_parallel_worker_is_one_actor_per_rank_and_restarts_as_a_group(ray_nodes, tiny_model, workload):
    """TP 2: ranks are actors in one placement group on one node; a killed rank-1 actor takes
    the whole group down and Ray brings it back; output still matches transformers."""
    prompts, reference = workload
    # No fault lands mid-stream here, so short streams check the same parity.
    prompts, reference = prompts[:4], [tokens[:SHORT_TOKENS] for tokens in reference[:4]]
    for _ in range(2):  # room for two more groups beside the running cluster
        ray_nodes.add_node(num_cpus=1, object_store_memory=100 * 1024 * 1024)
    options = RayOptions(address=ray_nodes.address, cpus_per_rank=0.5)
    with RayCluster(str(tiny_model), num_prefill=1, num_decode=1, tp=2, num_kv_blocks=128, ray=options,
                    router_options={"heartbeat_timeout_s": 3.0, "unavailable_timeout_s": 150.0},
                    startup_timeout_s=180) as cluster:
        assert streams(cluster, prompts, max_tokens=SHORT_TOKENS) == reference
        # Rank 1 is its own actor (in bundle 1 of rank 0's STRICT_PACK placement group).
        assert len(ray.get(cluster.groups["decode-0"].actor.rank_actors.remote(), timeout=60)) == 1
        pid = {w["id"]: w["pid"] for w in live(cluster)}["decode-0"]
        cluster.kill_worker("decode-0", rank=1)
        wait_until(lambda: {w["id"]: w["pid"] for w in live(cluster)}.get("decode-0") not in (None, pid),
                   "the TP group's restart")
        assert streams(cluster, prompts, max_tokens=SHORT_TOKENS) == reference
        settled(cluster)


def test_scale_refuses_bad_counts(pd_cluster):
    from router.client import InvalidRequest

    with Client(pd_cluster.endpoint, timeout=60) as client:
        with pytest.raises(InvalidRequest, match="--decode must be a positive integer"):
            client.scale(decode=0)
        with pytest.raises(InvalidRequest, match="over the 256 workers per role"):
            client.scale(prefill=10**9)
    # Sent raw, past the client's check: the router refuses it before its launcher starts any.
    import zmq

    from router import protocol as P
    with zmq.Context() as ctx:
        sock = ctx.socket(zmq.DEALER)
        sock.connect(pd_cluster.endpoint)
        sock.send(P.encode(P.ScaleRequest("r", None, 10**9)))
        assert sock.poll(60_000), "no answer to a scale request for 10**9 workers"
        reply = P.decode(sock.recv())
        sock.close(0)
    assert isinstance(reply, P.Error) and "--decode 1000000000 is over" in reply.message, reply
    assert set(pd_cluster.groups) == {"prefill-0", "decode-0"}


def test_off_loopback_without_keys_is_refused(ray_nodes):
    node_ip = ray.util.get_node_ip_address()
    with pytest.raises(ValueError, match="--curve-dir"):
        RayCluster(backend=f"tcp://{node_ip}:5555")
    with pytest.raises(ValueError, match="--curve-dir"):
        RayCluster(listen="tcp://0.0.0.0:5556")
    with pytest.raises(ValueError, match="--curve-dir"):
        RayCluster(ray=RayOptions(kv_host=node_ip))
    proc = subprocess.run([sys.executable, "-m", "router.cli", "serve", "--launcher", "ray",
                           "--ray-address", ray_nodes.address, "--listen", "tcp://0.0.0.0:5557"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip().splitlines()[-1].startswith("pdserve serve: --listen tcp://0.0.0.0:5557")
