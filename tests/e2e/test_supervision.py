"""Supervision and liveness through real processes that are really killed or stopped:
`pdserve serve` restarts what dies, the router declares silent or stuck workers dead (their
requests fail over and complete), and a worker that keeps failing at start is given up on."""
import asyncio
import os
import re
import signal
import time

import pytest

from router.client import AsyncClient, Client
from router.launcher import LocalCluster
from router.supervisor import SupervisorConfig
from tests.e2e.helpers import serve, wait_all_blocks_free

pytestmark = pytest.mark.slow

MAX_TOKENS = 48
PROMPTS = [[40 + (7 * i + j) % 80 for j in range(8 + 3 * i)] for i in range(8)]


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    """`pdserve serve` (supervised) with one prefill and one decode worker."""
    tmp = tmp_path_factory.mktemp("supervised")
    with serve(tmp, "--model", str(tiny_model), "--num-kv-blocks", "512", "--heartbeat-timeout", "2",
               "--stuck-timeout", "2") as (endpoint, _):
        yield endpoint, tmp


def status(endpoint: str) -> dict:
    with Client(endpoint, timeout=30) as client:
        return client.status()


def live_worker(endpoint: str, role: str) -> dict:
    (worker,) = [w for w in status(endpoint)["workers"] if w["role"] == role and w["alive"]]
    return worker


def wait_restarted(endpoint: str, old: dict, timeout_s: float = 120.0) -> dict:
    """The worker with ``old``'s id registered again from a new process."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for w in status(endpoint)["workers"]:
            if w["id"] == old["id"] and w["alive"] and w["pid"] != old["pid"]:
                return w
        time.sleep(0.05)
    raise AssertionError(f"worker {old['id']} was not restarted within {timeout_s}s")


async def stream_all(endpoint: str, fault=None) -> list[list[int]]:
    """Greedy-stream every prompt, running ``fault`` (blocking) beside them."""
    async def one(client, prompt):
        tokens = []
        async for chunk in client.generate(prompt_token_ids=prompt, max_tokens=MAX_TOKENS,
                                           temperature=0, ignore_eos=True):
            tokens += chunk.token_ids
        return tokens

    async with AsyncClient(endpoint, timeout=120) as client:
        streams = asyncio.gather(*(one(client, p) for p in PROMPTS))
        if fault is not None:
            await asyncio.get_running_loop().run_in_executor(None, fault)
        return list(await streams)


def when_decoding(endpoint: str, worker_id: str, action) -> None:
    """Run ``action`` once ``worker_id`` has requests placed on it (the router's own count)."""
    deadline = time.monotonic() + 60
    with Client(endpoint, timeout=30) as client:
        while not any(w["id"] == worker_id and w["alive"] and w["assigned"] >= 4
                      for w in client.status()["workers"]):
            assert time.monotonic() < deadline, "the requests never reached the worker"
            time.sleep(0.01)
    action()


def test_sigkilled_workers_are_restarted_and_register_again(server):
    endpoint, tmp = server
    before = status(endpoint)["router"]["restarts"]
    for role in ("prefill", "decode"):
        old = live_worker(endpoint, role)
        os.killpg(old["pid"], signal.SIGKILL)
        new = wait_restarted(endpoint, old)
        assert new["restarts"] == old["restarts"] + 1
    assert status(endpoint)["router"]["restarts"] == before + 2
    with Client(endpoint, timeout=120) as client:
        assert len(client.complete(prompt_token_ids=[5, 6, 7], max_tokens=4, ignore_eos=True).token_ids) == 4
    log = (tmp / "serve.log").read_text()
    assert "killed by SIGKILL; restarting it in" in log


@pytest.mark.parametrize("role", ["decode", "prefill"])
def test_a_stopped_worker_is_declared_dead_killed_and_restarted_and_nothing_is_lost(server, role):
    endpoint, tmp = server
    reference = asyncio.run(stream_all(endpoint))
    old = live_worker(endpoint, role)
    stop = lambda: os.kill(old["pid"], signal.SIGSTOP)  # noqa: E731
    # The whole process stops (its heartbeats too): the silent rule declares it dead. The decode
    # worker stops with requests on it; the prefill worker before the prompts reach it.
    if role == "prefill":
        stop()
    fault = (lambda: when_decoding(endpoint, old["id"], stop)) if role == "decode" else None
    disturbed = asyncio.run(stream_all(endpoint, fault=fault))
    assert disturbed == reference  # failed over and resumed: nothing lost, nothing duplicated
    new = wait_restarted(endpoint, old)
    assert new["restarts"] == old["restarts"] + 1
    log = (tmp / "serve.log").read_text()
    # Silent, or (decode, stopped mid-step) stuck first: its last heartbeat said it was busy.
    assert re.search(rf"worker {old['id']} \(pid {old['pid']}\) .*: declared dead \((silent|stuck)\)", log)
    assert f"worker {old['id']} (pid {old['pid']}) was declared dead by the router" in log
    assert status(endpoint)["router"]["failovers"] > 0
    with Client(endpoint, timeout=60) as client:
        wait_all_blocks_free(client, timeout_s=60)


def tp_rank_pids(rank0_pid: int) -> list[int]:
    """The TP ranks a worker's rank 0 spawned (its children running multiprocessing's spawn)."""
    ranks = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except (OSError, ValueError):
            continue
        if ppid == rank0_pid and b"spawn_main" in cmdline:
            ranks.append(int(entry))
    return ranks


def test_stuck_tp_rank_and_a_worker_failing_at_start(tiny_model, caplog):
    """A stopped TP rank 1 leaves rank 0 heartbeating with work and no steps: declared stuck,
    killed and restarted. A worker that cannot start is given up on, with its reason."""
    with LocalCluster(str(tiny_model), mode="colocated", num_workers=1, tp=2, num_kv_blocks=256,
                      supervise=True, supervisor_config=SupervisorConfig(backoff_s=0.2, max_start_failures=2),
                      router_options={"stuck_timeout_s": 2.0}) as cluster:
        cluster.start_worker("decode", "decode-bad", extra_args=("--tp", "1", "--model", "/nonexistent"))
        old = live_worker(cluster.endpoint, "both")
        (rank1,) = tp_rank_pids(old["pid"])
        with Client(cluster.endpoint, timeout=120) as client:
            stream = client.generate(prompt_token_ids=[3, 4, 5], max_tokens=24, temperature=0, ignore_eos=True)
            first = next(stream)
            os.kill(rank1, signal.SIGSTOP)
            tokens = first.token_ids + [t for chunk in stream for t in chunk.token_ids]
            assert len(tokens) == 24
            assert f"worker both-0 (pid {old['pid']}) had work but completed no step" in caplog.text
            new = wait_restarted(cluster.endpoint, old)
            assert new["restarts"] == 1
            expected = client.complete(prompt_token_ids=[3, 4, 5], max_tokens=24, temperature=0,
                                       ignore_eos=True).token_ids
            assert tokens == expected  # resumed on the restarted worker, token for token
            deadline = time.monotonic() + 120
            while "decode-bad" not in client.status()["router"]["given_up"]:
                assert time.monotonic() < deadline, cluster.workers[-1].log_tail()
                time.sleep(0.05)
            why = client.status()["router"]["given_up"]["decode-bad"]
            assert "exited with code 2 before registering, 2 times in a row" in why
            assert "--model '/nonexistent' is neither a known model name" in why
        assert cluster.supervisor.snapshot()["decode-bad"]["restarts"] == 1
        assert not tp_rank_pids(old["pid"])  # the stuck group is gone, every rank of it


INJECT_DIR = os.path.join(os.path.dirname(__file__), "inject")


def test_dead_kv_threads_on_tp_rank_1_end_their_workers(tiny_model, tmp_path):
    """Rank 1 of a TP-2 decode worker loses its KV receiver thread, and rank 1 of a TP-2
    prefill worker its KV sender thread (injected: they raise). The decode worker's rank 0
    hears of it from the coordinator and exits with one line saying which rank and why; the
    prefill rank ends at its next step, so its worker exits for a dead TP rank. The TP-1
    workers go on serving, and the prefill worker's requests fail over to them."""
    receiver_trigger, sender_trigger = tmp_path / "break-the-receiver", tmp_path / "break-the-sender"
    env = {"PYTHONPATH": os.pathsep.join([INJECT_DIR, os.environ.get("PYTHONPATH", "")]),
           "PDSERVE_TEST_RECEIVER_FAIL": f"1:{receiver_trigger}",
           "PDSERVE_TEST_SENDER_FAIL": f"1:{sender_trigger}"}
    with LocalCluster(str(tiny_model), mode="disagg", num_prefill=1, num_decode=1, num_kv_blocks=128,
                      env=env) as cluster:
        cluster.start_worker("decode", "decode-tp2", extra_args=("--tp", "2"))
        cluster.start_worker("prefill", "prefill-tp2", extra_args=("--tp", "2"))
        cluster.wait_for_workers(4, 120)
        procs = {w.worker_id: w for w in cluster.worker_processes()}
        receiver_trigger.touch()
        assert procs["decode-tp2"].proc.wait(60) == 1
        line = "pdserve worker decode-tp2 exits: the KV receiver thread of TP rank 1 stopped: " \
               "RuntimeError: injected receiver failure"
        assert line in procs["decode-tp2"].log_tail(40)
        sender_trigger.touch()
        time.sleep(0.3)  # the sender thread polls for the trigger every 50 ms

        async def requests():
            async with AsyncClient(cluster.endpoint, timeout=120) as client:
                return await asyncio.gather(*(client.complete(prompt_token_ids=[5, 6, i], max_tokens=4,
                                                              ignore_eos=True) for i in range(4)))
        results = asyncio.run(requests())  # the least-loaded rule puts some on prefill-tp2
        assert [len(r.token_ids) for r in results] == [4] * 4
        assert procs["prefill-tp2"].proc.wait(60) == 1
        tail = procs["prefill-tp2"].log_tail(80)
        assert "RuntimeError: the KV sender thread of TP rank 1 stopped" in tail
        assert "pdserve worker prefill-tp2 exits: TP rank(s) [1] exited" in tail
        with Client(cluster.endpoint, timeout=60) as client:
            status = client.status()
            assert {w["id"] for w in status["workers"] if not w["alive"]} == {"decode-tp2", "prefill-tp2"}
            assert status["router"]["failovers"] > 0
            wait_all_blocks_free(client)