"""The cluster driven as outside users drive it: a router that stalls under their load, while
a request is mid-stream, must not lose that request; a worker started with options the model
cannot take says so in one line per process."""
import os
import signal
import subprocess
import sys
import time

import pytest

from router.client import Client
from router.launcher import LocalCluster
from tests.e2e.helpers import wait_all_blocks_free
from tests.e2e.pause_control import PauseControl
from tests.tiny_models import make_tiny_checkpoint

pytestmark = pytest.mark.slow

# The router declares a silent worker dead after 10 s; a worker gives up on a router that has
# not answered its heartbeats for 3 s (router/worker_link.py). A router stalled in between is
# seen as lost by its workers only.
ROUTER_OPTIONS = {"heartbeat_timeout_s": 10.0}
STALL_S = 5.0


@pytest.fixture(scope="module")
def cluster(tiny_model, tmp_path_factory):
    pauses = PauseControl(tmp_path_factory.mktemp("pause"))
    with LocalCluster(str(tiny_model), num_kv_blocks=256, mode="colocated", num_workers=1,
                      router_in_process=False, env=pauses.env(), router_options=ROUTER_OPTIONS) as running:
        yield running, pauses
        pauses.reset()


def test_a_request_mid_decode_survives_a_router_stall_its_workers_took_for_a_loss(cluster):
    """Its workers drop every request and register again; the router must start the request
    over rather than wait forever for tokens the decode worker no longer computes."""
    running, pauses = cluster
    prompt = list(range(1, 20))
    with Client(running.endpoint, timeout=60) as client:  # a lost request shows as ClientTimeout
        alone = client.complete(prompt_token_ids=prompt, max_tokens=24, temperature=0, ignore_eos=True)
        pauses.arm("decoding")
        stream = client.generate(prompt_token_ids=prompt, max_tokens=24, temperature=0, ignore_eos=True)
        tokens = list(next(stream).token_ids)
        pauses.wait_reached("decoding")  # held mid-decode on the decode worker
        os.kill(running.router_pid, signal.SIGSTOP)
        try:
            time.sleep(STALL_S)
        finally:
            os.kill(running.router_pid, signal.SIGCONT)
        pauses.release("decoding")
        for chunk in stream:
            tokens += chunk.token_ids
        assert tokens == alone.token_ids
        assert client.status()["router"]["active"] == 0
        wait_all_blocks_free(client)


def test_a_tp_degree_the_model_cannot_split_into_is_one_line_per_rank(tmp_path):
    model = make_tiny_checkpoint(tmp_path / "llama", num_heads=3, num_kv_heads=1, hidden_size=48)
    out = subprocess.run([sys.executable, "-m", "router.cli", "worker", "--role", "decode", "--tp", "2",
                          "--model", str(model), "--router", f"ipc://{tmp_path}/nobody.ipc"],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    why = "number of attention heads (3) is not divisible by TP=2; choose a TP degree that divides it"
    assert sorted(out.stderr.split("\n")) == ["", f"pdserve worker rank 1: {why}", f"pdserve worker: {why}"]
