"""Cancels at every stage of a request's life, each stage hit deterministically: the workers hold
the request at a named pause point (worker/pause_points.py) while the client cancels it, and go
on only once the cancel has reached them. For each KV transport (zmq, shm, nixl) and for
colocated mode, one cluster serves every stage; after each cancel every worker is alive with
its first pid and no restart, the KV is 100% free on every worker, the router is idle, and a
fresh request gives exactly transformers' greedy tokens."""
from __future__ import annotations

import random
import time

import pytest

from router.client import Client
from router.launcher import LocalCluster
from tests.e2e.helpers import greedy_reference, unrestarted_workers, wait_all_blocks_free, wait_kv_free_after
from tests.e2e.pause_control import PauseControl

pytestmark = pytest.mark.slow

MODES = {"zmq": {"mode": "disagg", "kv_transport": "zmq"},
         "shm": {"mode": "disagg", "kv_transport": "shm"},
         "nixl": {"mode": "disagg", "kv_transport": "nixl"},
         "colocated": {"mode": "colocated", "num_workers": 1}}
STAGES = ("queued_at_router", "allocate", "prefill_queued", "mid_chunk", "last_chunk",
          "kv_in_flight", "kv_in_flight_mid_prompt", "decoding", "finishing")
# The pause points that hold a stage (default: the point of its name), released last to first.
# kv_in_flight_mid_prompt: the sender holds the first chunk's KV while the model thread holds
# the second chunk, so the cancel finds the transfer open with most of the prompt to come.
STAGE_POINTS = {"kv_in_flight_mid_prompt": ("kv_in_flight", "mid_chunk")}
NOT_COLOCATED = {"kv_in_flight": "colocated mode moves no KV between workers",
                 "kv_in_flight_mid_prompt": "colocated mode moves no KV between workers"}
# Stages held on the prefill worker while the router still counts the request as prefilling:
# both workers get a Free, and both must have handled it before the pause ends.
PREFILL_STAGES = {"prefill_queued", "mid_chunk", "last_chunk", "kv_in_flight", "kv_in_flight_mid_prompt"}
BUDGET = 32          # max_num_batched_tokens: a 100-token prompt runs as 4 chunks
NUM_BLOCKS = 40      # of 16 tokens; the blocker below reserves 26, a queued request needs 19
PROMPT_LEN = {"mid_chunk": 100, "last_chunk": 40, "kv_in_flight_mid_prompt": 100}
MAX_TOKENS = {"decoding": 64, "finishing": 4}
FRESH_MAX_TOKENS = 12
ROUTER_OPTIONS = {"heartbeat_timeout_s": 60.0, "stuck_timeout_s": 60.0}  # a held loop is not a dead worker
# Every check after a cancel waits for a heartbeat sent after the fresh request ran: at the
# default 0.5 s period those waits dominate the stages' time.
WORKER_ARGS = ("--heartbeat-s", "0.1")


def prompt(name: str, length: int) -> list[int]:
    rng = random.Random(name)  # one prompt per stage: no prefix cache hit across stages
    return [rng.randrange(32, 127) for _ in range(length)]


FRESH = prompt("fresh", 70)  # 3 chunks


class Stages:
    """One running cluster, its pause directory, and the worker pids it started with."""

    def __init__(self, cluster: LocalCluster, pauses: PauseControl, mode: str):
        self.cluster, self.pauses, self.mode = cluster, pauses, mode
        with Client(cluster.endpoint, timeout=60) as client:
            workers = wait_all_blocks_free(client)  # after a first heartbeat from each: steps are counted
            self.pids = {w["id"]: w["pid"] for w in workers}
        self.decode_pid = next((pid for wid, pid in self.pids.items() if wid.startswith("decode")), None)


@pytest.fixture(scope="module", params=list(MODES))
def stages(request, tiny_model, tmp_path_factory):
    if request.param == "nixl":
        pytest.importorskip("nixl")
    pauses = PauseControl(tmp_path_factory.mktemp("pause"))
    with LocalCluster(str(tiny_model), num_kv_blocks=NUM_BLOCKS, block_size=16, max_num_batched_tokens=BUDGET,
                      supervise=True, env=pauses.env(), router_options=ROUTER_OPTIONS, worker_args=WORKER_ARGS,
                      **MODES[request.param]) as cluster:
        yield Stages(cluster, pauses, request.param)


@pytest.fixture(scope="module")
def fresh_reference(tiny_model):
    (tokens,) = greedy_reference(tiny_model, [FRESH], FRESH_MAX_TOKENS, stop_ids=())
    return tokens


@pytest.mark.parametrize("stage", STAGES)
def test_cancel_at_stage(stage, stages, fresh_reference):
    if stages.mode == "colocated" and stage in NOT_COLOCATED:
        pytest.skip(NOT_COLOCATED[stage])
    try:
        with Client(stages.cluster.endpoint, timeout=60) as client:
            before = client.status()
            aborted = before["router"]["aborted"]
            if stage == "queued_at_router":
                cancel_queued(stages, client, aborted)
            else:
                cancel_paused(stages, client, stage, aborted)
            after = check_unharmed(stages, client, fresh_reference)
            if stage == "kv_in_flight_mid_prompt":  # aborted while open; the fresh request's is done
                (done, failed), (done_after, failed_after) = transfers(before), transfers(after)
                assert (done_after, failed_after) == (done + 1, failed + 1)
    finally:
        stages.pauses.reset()


def cancel_paused(stages: Stages, client: Client, stage: str, aborted: int) -> None:
    pauses = stages.pauses
    points = STAGE_POINTS.get(stage, (stage,))
    for point in points:
        pauses.arm(point)
    stream = client.generate(prompt_token_ids=prompt(stage, PROMPT_LEN.get(stage, 20)),
                             max_tokens=MAX_TOKENS.get(stage, 16), ignore_eos=True, temperature=0)
    held = [pauses.wait_reached(point) for point in points]
    if stage in MAX_TOKENS:
        assert len(next(stream).token_ids) == 1  # the first token reached the client
    stream.close()
    wait_router(client, lambda r: r["aborted"] == aborted + 1)
    if stage != "allocate":  # (there the held thread is the loop: the Free waits in its socket)
        holders = {pid for _, pid in held}
        if stages.decode_pid and stage in PREFILL_STAGES:
            holders.add(stages.decode_pid)
        pauses.wait_freed(held[0][0], holders)
    for point in reversed(points):
        pauses.release(point)


def cancel_queued(stages: Stages, client: Client, aborted: int) -> None:
    """A blocker held mid-decode reserves most of the KV, so the next request waits at the router."""
    pauses = stages.pauses
    pauses.arm("decoding")
    blocker = client.generate(prompt_token_ids=prompt("blocker", 8), max_tokens=400, ignore_eos=True)
    rid, pid = pauses.wait_reached("decoding")
    queued = client.generate(prompt_token_ids=prompt("queued_at_router", 100), max_tokens=200)
    wait_router(client, lambda r: r["queued"] == 1)
    queued.close()
    wait_router(client, lambda r: r["aborted"] == aborted + 1 and r["queued"] == 0)
    blocker.close()
    wait_router(client, lambda r: r["aborted"] == aborted + 2)
    pauses.wait_freed(rid, {pid})
    pauses.release("decoding")


def check_unharmed(stages: Stages, client: Client, fresh_reference: list[int]) -> dict:
    steps = {w["id"]: w["stats"]["num_steps"] for w in unrestarted_workers(client.status(), stages.pids)}
    result = client.complete(prompt_token_ids=FRESH, max_tokens=FRESH_MAX_TOKENS, ignore_eos=True,
                             temperature=0)
    assert result.token_ids == fresh_reference
    # From heartbeats sent after the fresh request's steps, so never from one older than the cancel.
    status = wait_kv_free_after(client, stages.pids, steps)
    assert (status["router"]["active"], status["router"]["queued"]) == (0, 0)
    return status


def transfers(status: dict) -> tuple[int, int]:
    """The prefill worker's KV transfers: (done, failed or aborted)."""
    (prefill,) = [w["stats"] for w in status["workers"] if w["role"] == "prefill"]
    return prefill["transfers_done"], prefill["transfers_failed"]


def wait_router(client: Client, predicate) -> None:
    wait_for(lambda: predicate(client.status()["router"]), "the router state")


def wait_for(predicate, what: str, timeout_s: float = 30.0):
    """``predicate()``'s first true value, polled."""
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout_s}s")
        time.sleep(0.01)
    return value
