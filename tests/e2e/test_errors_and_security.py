"""Bad input, foreign workers, hostile bytes and unauthenticated peers against a real cluster:
each gets a clear error and the server keeps serving correct outputs."""
import os
import random
import re
import shutil
import socket
import subprocess
import sys

import msgpack
import pytest
import zmq

from router import protocol as P
from router.cli import main as cli_main
from router.client import Client, InvalidRequest, Unavailable
from router.launcher import LocalCluster
from tests.e2e.helpers import greedy_reference
from tests.tiny_models import make_tiny_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tiny_model):
    with LocalCluster(str(tiny_model), mode="colocated", num_kv_blocks=256, max_model_len=128,
                      router_in_process=False) as running:
        yield running


def test_each_invalid_input_gets_a_clear_error_and_serving_continues(cluster, tiny_model):
    (want,) = greedy_reference(tiny_model, [[10, 20, 30]], 5)
    cases = [
        (dict(prompt=""), "prompt is empty"),
        (dict(prompt_token_ids=[1] * 200), "prompt has 200 tokens but the max model length is 128"),
        (dict(prompt="hi", max_tokens=-1), "max_tokens must be a positive integer, got -1"),
        (dict(prompt="hi", temperature=-1.0), "temperature must be"),
        (dict(prompt="hi", top_p=0.0), "top_p must be"),
        (dict(prompt="hi", top_k=-5), "top_k must be"),
        (dict(prompt_token_ids=[1, 9999]), "not a token id of this model"),
    ]
    with Client(cluster.endpoint, timeout=60) as client:
        for kwargs, match in cases:
            with pytest.raises(InvalidRequest, match=match):
                client.complete(**kwargs)
            got = client.complete(prompt_token_ids=[10, 20, 30], max_tokens=5, temperature=0)
            assert got.token_ids == want
        # Unknown fields need a raw message: the client library only sends known ones.
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.connect(cluster.endpoint)
        sock.send(P.encode(P.Generate("u", "hi", None, {"max_tokens": 2, "beam_width": 4})))
        assert sock.poll(30_000)
        reply = P.decode(sock.recv())
        assert reply.code == P.ERR_INVALID and "unknown parameter(s) beam_width" in reply.message
        sock.close(0)
        ctx.term()


def test_text_prompt_to_a_model_without_tokenizer_is_refused(tmp_path):
    model = make_tiny_checkpoint(tmp_path / "notok", num_kv_heads=2, vocab_size=128)
    with LocalCluster(str(model), mode="colocated", num_kv_blocks=64) as cluster:
        with Client(cluster.endpoint, timeout=60) as client:
            with pytest.raises(InvalidRequest, match="has no tokenizer; send prompt_token_ids"):
                client.complete("hello")
            got = client.complete(prompt_token_ids=[3, 4], max_tokens=3, ignore_eos=True)
            assert len(got.token_ids) == 3 and got.text == ""


def test_a_worker_with_another_model_is_refused(cluster, other_model):
    out = subprocess.run([sys.executable, "-m", "router.cli", "worker", "--role", "both", "--router",
                          cluster.backend, "--model", str(other_model), "--num-kv-blocks", "16"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "refused this worker: model mismatch" in out.stderr
    with Client(cluster.endpoint, timeout=30) as client:
        assert [w["id"] for w in client.status()["workers"]] == ["both-0"]


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_10000_malformed_messages_interleaved_with_good_traffic(cluster, tiny_model):
    prompts = [[random.Random(i).randrange(32, 127) for _ in range(8)] for i in range(20)]
    expected = greedy_reference(tiny_model, prompts, 4)
    router_pid = cluster._router_proc.pid
    rss_before = _rss_kib(router_pid)
    rng = random.Random(0)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(cluster.endpoint)
    # Good traffic on its own connection: unreadable input fails the requests in flight on the
    # connection that sent it (tests/router/test_no_hang.py), never anyone else's.
    good = ctx.socket(zmq.DEALER)
    good.connect(cluster.endpoint)
    for i in range(10_000):
        kind = i % 5
        if kind == 0:
            sock.send(bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 200))))
        elif kind == 1:
            sock.send(msgpack.packb([1, f"t{i}", "abc", None, {}])[:-2])               # truncated
        elif kind == 2:
            sock.send(msgpack.packb([1, f"w{i}", None, "not a list", {}]))           # wrong type
        elif kind == 3:
            sock.send(P.encode(P.Generate(f"h{i}", None, [1] * 100_000, {})))        # huge prompt
        else:
            sock.send(msgpack.packb([1, f"x{i}", None, [1], {}, True, None, 1, 2]))  # too many fields
        if i % 500 == 0:
            good.send(P.encode(P.Generate(f"good{i // 500}", None, prompts[i // 500], {
                "max_tokens": 4, "temperature": 0})))
    outputs, errors, stray = {}, 0, 0
    # Answered with an error: truncated messages, wrong types, huge prompts, too many fields (the
    # router reads just the head [tag, rid] of a message it cannot decode). Random bytes are
    # dropped, unless they happen to start like a message with a readable id: then answered too.
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(good, zmq.POLLIN)
    while errors < 8000 or len(outputs) < 20 or any(m.finish_reason is None for m in outputs.values()):
        ready = dict(poller.poll(60_000))
        assert ready, "the router stopped answering"
        msg = P.decode((good if good in ready else sock).recv())
        if msg.rid.startswith("good"):
            prev = outputs.get(msg.rid)
            outputs[msg.rid] = P.Chunk(msg.rid, (prev.token_ids if prev else []) + msg.token_ids, "",
                                       msg.finish_reason)
        else:
            assert isinstance(msg, P.Error) and msg.code == P.ERR_INVALID
            if re.fullmatch(r"[twhx]\d+", msg.rid):
                errors += 1
            else:
                stray += 1
    while sock.poll(500):
        msg = P.decode(sock.recv())
        assert isinstance(msg, P.Error) and msg.code == P.ERR_INVALID and not re.fullmatch(r"[twhx]\d+", msg.rid)
        stray += 1
    assert [outputs[f"good{i}"].token_ids for i in range(20)] == expected
    assert errors == 8000 and stray < 200
    # An oversized message drops that connection; the router lives on with bounded memory.
    sock.send(b"\x00" * (P.MAX_MESSAGE_BYTES + 1))
    sock.close(0)
    good.close(0)
    ctx.term()
    with Client(cluster.endpoint, timeout=30) as client:
        assert client.complete(prompt_token_ids=prompts[0], max_tokens=4, temperature=0).token_ids == expected[0]
    assert _rss_kib(router_pid) - rss_before < 100 * 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_curve_cluster_admits_only_peers_with_keys(tiny_model, tmp_path):
    keys = tmp_path / "keys"
    assert cli_main(["keys", str(keys)]) == 0
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    with LocalCluster(str(tiny_model), mode="colocated", num_kv_blocks=64, listen=endpoint,
                      curve_dir=str(keys)) as cluster:
        (want,) = greedy_reference(tiny_model, [[7, 8, 9]], 4)
        with Client(endpoint, timeout=60, curve=str(keys)) as client:
            assert client.complete(prompt_token_ids=[7, 8, 9], max_tokens=4, temperature=0).token_ids == want
        with Client(endpoint, timeout=60) as anonymous:
            with pytest.raises(Unavailable, match="CurveZMQ authentication failed"):
                anonymous.complete(prompt_token_ids=[7], max_tokens=1)
        # A worker without keys cannot join.
        out = subprocess.run([sys.executable, "-m", "router.cli", "worker", "--role", "both", "--router",
                              cluster.backend, "--model", str(tiny_model), "--num-kv-blocks", "16"],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 2 and "CurveZMQ authentication failed" in out.stderr
        # It learns this before loading its model: the refusal is all it says.
        (line,) = out.stderr.strip().splitlines()
        assert line.startswith(f"pdserve worker: router {cluster.backend} refused this worker:")
    shutil.rmtree(keys)
    assert not os.path.exists(keys)
