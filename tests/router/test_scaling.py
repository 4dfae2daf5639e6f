"""Draining a worker (router/scaling.py) through real local worker processes, without Ray: it
gets nothing new, finishes what it holds (or fails it over past the deadline), then is shut down
and forgotten; no request fails. And ``scale`` on a router that cannot start workers."""
import asyncio
import random

import pytest
import zmq

from router import protocol as P
from router.client import AsyncClient, Client, InternalError, InvalidRequest
from router.launcher import LocalCluster
from router.scaling import MAX_WORKERS_PER_ROLE
from router.status_table import format_status
from tests.e2e.helpers import greedy_reference, wait_all_blocks_free
from tests.router.helpers import make_router
from tests.tiny_models import make_tiny_checkpoint

pytestmark = pytest.mark.slow

NUM_STREAMS = 8
MAX_TOKENS = 128  # long enough that the drain deadline passes mid-stream


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "llama", "llama", num_kv_heads=2,
                                vocab_size=258, with_tokenizer=True, seed=3)


async def _run(endpoint, prompts, during):
    """Stream every prompt greedily; after the first tokens, run ``during()`` on the router's loop."""
    fired = asyncio.Event()

    async def one(client, prompt):
        tokens = []
        async for chunk in client.generate(prompt_token_ids=prompt, max_tokens=MAX_TOKENS,
                                           ignore_eos=True, temperature=0):
            tokens += chunk.token_ids
            if not fired.is_set() and len(tokens) >= 2:
                fired.set()
                await asyncio.get_running_loop().run_in_executor(None, during)
        return tokens

    async with AsyncClient(endpoint, timeout=120) as client:
        return await asyncio.gather(*(one(client, p) for p in prompts))


def _drain(cluster, timeout_s, drained, held, tables=None):
    """Drain the decode worker that holds the most requests right now."""
    tables = [] if tables is None else tables
    def start(router):
        decodes = [w for w in router.registry.alive() if w.role == "decode"]
        worker = max(decodes, key=router.drainer.holds)
        held.append((worker.worker_id, router.drainer.holds(worker)))
        router.drainer.drain(worker.worker_id, timeout_s, drained.append)
        tables.append(format_status(router.status()))  # what `pdserve status` shows meanwhile
    return lambda: cluster._router_thread.call(start, cluster._router_thread.router)


def _process(cluster, worker_id):
    return next(w.proc for w in cluster.workers if w.worker_id == worker_id)


def test_drain_finishes_in_place_or_fails_over_past_the_deadline(tiny_model):
    rng = random.Random(5)
    prompts = [[rng.randrange(32, 127) for _ in range(rng.randrange(4, 30))] for _ in range(NUM_STREAMS)]
    reference = greedy_reference(tiny_model, prompts, MAX_TOKENS, stop_ids=())
    with LocalCluster(str(tiny_model), num_prefill=1, num_decode=2, num_kv_blocks=256) as cluster:
        # In place: the drained worker finishes every request it holds, then exits on the
        # router's Shutdown.
        drained, held, tables = [], [], []
        outputs = asyncio.run(_run(cluster.endpoint, prompts, _drain(cluster, 120, drained, held, tables)))
        (victim, num_held), = held
        assert outputs == reference and num_held > 0
        rows = {line.split()[0]: line for line in tables[0].splitlines()[2:] if line.strip()}
        assert rows[victim].endswith("draining") and not rows["prefill-0"].endswith("draining"), tables[0]
        (other,) = {"decode-0", "decode-1"} - {victim}
        assert _process(cluster, victim).wait(60) == 0  # told to shut down, not killed
        assert drained == [victim]
        with Client(cluster.endpoint, timeout=30) as client:
            status = client.status()
            assert sorted(w["id"] for w in status["workers"]) == sorted([other, "prefill-0"])
            assert status["router"]["failed"] == 0 and status["router"]["failovers"] == 0
            wait_all_blocks_free(client)

        # Past the deadline: what the drained worker still holds fails over, output unchanged.
        cluster.start_worker("decode", victim)
        cluster.wait_for_workers(3, 120)
        drained, held = [], []
        outputs = asyncio.run(_run(cluster.endpoint, prompts, _drain(cluster, 0.001, drained, held)))
        (victim, num_held), = held
        assert outputs == reference and num_held > 0
        (other,) = {"decode-0", "decode-1"} - {victim}
        assert _process(cluster, victim).wait(60) == 0
        assert drained == [victim]
        with Client(cluster.endpoint, timeout=30) as client:
            status = client.status()
            assert status["router"]["failed"] == 0 and status["router"]["failovers"] >= 1
            assert sorted(w["id"] for w in wait_all_blocks_free(client)) == sorted([other, "prefill-0"])


def test_scale_needs_a_launcher_that_can_start_workers(tmp_path):
    router = make_router(tmp_path)
    try:
        with Client(f"ipc://{tmp_path}/c.ipc", timeout=10) as client:
            with pytest.raises(InvalidRequest, match="pdserve serve. .without --router-process"):
                client.scale(prefill=2)
    finally:
        router.stop()


def test_draining_an_unknown_worker_is_refused(tmp_path):
    router = make_router(tmp_path)
    try:
        with pytest.raises(ValueError, match="no live worker 'decode-9'"):
            router.call(router.router.drainer.drain, "decode-9", 1.0, print)
    finally:
        router.stop()


class _FailingLauncher:
    """A launcher whose ``scale`` breaks (its cluster manager is gone, say): the ``Scaler``
    interface as the router sees it."""

    def __init__(self):
        self.calls = []

    def scale(self, num_prefill, num_decode):
        self.calls.append((num_prefill, num_decode))
        raise RuntimeError("the cluster manager is unreachable")


def test_scale_is_answered_when_the_launcher_fails_and_counts_are_checked_first(tmp_path):
    router = make_router(tmp_path)
    launcher = _FailingLauncher()
    router.call(setattr, router.router, "scaler", launcher)
    try:
        # The launcher's failure is an answer, not a dropped message the client waits out.
        with Client(f"ipc://{tmp_path}/c.ipc", timeout=20) as client:
            with pytest.raises(InternalError, match="the launcher failed to scale the cluster: "
                               "RuntimeError.*unreachable.*pdserve status"):
                client.scale(decode=2)
        # Counts the client would refuse, sent raw: the router checks them before the launcher.
        with zmq.Context() as ctx:
            sock = ctx.socket(zmq.DEALER)
            sock.connect(f"ipc://{tmp_path}/c.ipc")
            sock.send(P.encode(P.ScaleRequest("r", 10**9, None)))
            assert sock.poll(20_000), "no answer to a scale request for 10**9 workers"
            reply = P.decode(sock.recv())
            sock.close(0)
        assert isinstance(reply, P.Error) and reply.code == P.ERR_INVALID
        assert f"--prefill 1000000000 is over the {MAX_WORKERS_PER_ROLE} workers per role" in reply.message
        assert launcher.calls == [(None, 2)]
    finally:
        router.stop()
