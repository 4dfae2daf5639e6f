"""Hostile and odd input to the HTTP gateway, as outside clients send it: each case once made
the server answer 500, close a connection without a word, hang, or stop serving everyone."""
from __future__ import annotations

import asyncio
import json
import random
import socket
import tempfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.client import Client
from router.config import RouterConfig
from router.http.config import HttpConfig
from router.runtime import RouterThread
from tests.router.http.conftest import MODEL_NAME
from tests.router.http.test_errors import error_of
from tests.router.http.test_metrics_and_disconnect import delta, scrape

httpx = pytest.importorskip("httpx2")
pytestmark = pytest.mark.slow
CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def empty():
    """A router with no model and no worker yet, known only by --served-model-name, and a
    short body timeout: the state of a gateway started before its workers."""
    tmp = tempfile.mkdtemp(prefix="pdserve-adv-")
    config = RouterConfig(frontend=f"ipc://{tmp}/c.ipc", backend=f"ipc://{tmp}/w.ipc")
    thread = RouterThread(config, http=HttpConfig(port=0, served_model_name="m", read_timeout_s=0.5)).start()
    yield thread
    thread.stop()


def exchange(url: str, data: bytes, timeout_s: float = 30.0) -> bytes:
    """Send raw bytes and read until the server closes the connection."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
        sock.sendall(data)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
    return out


def test_huge_top_k_is_off_and_the_server_keeps_serving(http_cluster):
    """top_k past 64 bits once failed to pack for the worker and stayed at the head of the
    queue, so every later request answered 500 until a restart."""
    url = http_cluster.http_url + "/v1/completions"
    body = {"prompt": [5, 6, 7], "max_tokens": 6, "temperature": 1.0, "seed": 11, "ignore_eos": True}
    texts = []
    for top_k in (10**20, 2**64 - 1, 0):
        response = httpx.post(url, json={**body, "top_k": top_k}, timeout=60)
        assert response.status_code == 200, response.text
        texts.append(response.json()["choices"][0]["text"])
    assert texts[0] == texts[1] == texts[2]  # every top_k past the vocabulary keeps every token


def test_odd_bodies_are_400_saying_what_to_change(http_cluster):
    url = http_cluster.http_url
    assert "body is empty" in error_of(httpx.post(url + "/v1/completions", content=b""), 400)["message"]
    lone = b'{"prompt": "a\\ud800", "max_tokens": 2}'
    for path, body in (("/v1/completions", lone),
                       ("/v1/completions", b'{"prompt": "a", "model": "\\udc00"}'),
                       ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}'),
                       ("/tokenize", b'{"prompt": "\\ud800"}')):
        assert "surrogate" in error_of(httpx.post(url + path, content=body, timeout=60), 400)["message"]
    paired = httpx.post(url + "/tokenize", content='{"prompt": "\\ud83e\\udd16"}', timeout=60).json()
    assert paired["tokens"][1:] == list("🤖".encode())  # byte-level tokenizer, after the bos
    for kwargs in ({"messages": []}, {"add_generation_prompt": False}):
        error = error_of(httpx.post(url + "/v1/chat/completions", json={
            "messages": CHAT, "chat_template_kwargs": kwargs}, timeout=60), 400)
        assert error["param"] == "chat_template_kwargs" and next(iter(kwargs)) in error["message"]
    deep = json.loads("[" * 500 + "]" * 500)
    for body in ({"messages": [{**CHAT[0], "name": deep}]}, {"messages": CHAT, "chat_template_kwargs": {"x": deep}}):
        assert "deep" in error_of(httpx.post(url + "/v1/chat/completions", json=body, timeout=60), 400)["message"]
    assert "model" in error_of(httpx.post(url + "/tokenize", json={"prompt": "x", "model": 5}), 400)["message"]
    past_float = b'{"prompt": "x", "temperature": -1' + b"0" * 400 + b"}"  # an int no float holds
    assert "temperature" in error_of(httpx.post(url + "/v1/completions", content=past_float), 400)["message"]
    past_int = b'{"prompt": "x", "max_tokens": 1' + b"0" * 5000 + b"}"  # past Python's digit limit
    assert "not valid JSON" in error_of(httpx.post(url + "/v1/completions", content=past_int), 400)["message"]
    ok = httpx.post(url + "/v1/chat/completions", json={"model": MODEL_NAME, "messages": CHAT, "max_tokens": 2},
                    timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_chats_past_the_bounds_are_refused_before_tokenizing(http_cluster):
    """The bounds a ZMQ client's chat has (messages, characters per token of the max model
    length) hold over HTTP too: a 13 MB chat once held the tokenizer thread for seconds."""
    from router.validation import MAX_CHARS_PER_TOKEN, MAX_MESSAGES

    url = http_cluster.http_url + "/v1/chat/completions"
    many = error_of(httpx.post(url, json={"messages": CHAT * (MAX_MESSAGES + 1)}, timeout=60), 400)
    assert f"at most {MAX_MESSAGES} messages" in many["message"]
    long = [{"role": "user", "content": "a" * (MAX_CHARS_PER_TOKEN * 512)}]  # tiny-chat: 512 tokens
    assert "characters" in error_of(httpx.post(url, json={"messages": long}, timeout=60), 400)["message"]


def test_before_any_worker_tokenizing_is_503(empty):
    url = empty.router.http_url
    for path, body in (("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [1]}),
                       ("/v1/chat/completions", {"messages": CHAT})):
        assert "no worker" in error_of(httpx.post(url + path, json=body, timeout=30), 503)["message"]


def test_a_stalled_body_is_408(empty):
    """A client that stops mid-body gets 408 once the body timeout passes, not a handler held
    open for as long as it keeps the connection."""
    head = b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\nConnection: close\r\n\r\n"
    reply = exchange(empty.router.http_url, head + b'{"prompt":')
    assert reply.startswith(b"HTTP/1.1 408 "), reply
    assert b"did not arrive within 0.5 s" in reply


def test_connections_that_trickle_headers_are_closed(empty):
    """A connection that sends nothing, or a request's headers only in part, is closed after the
    read timeout (uvicorn bounds only the idle time between requests); one that sends a whole
    request meanwhile is served."""
    host, port = empty.router.http_url.removeprefix("http://").split(":")
    silent, partial = (socket.create_connection((host, int(port)), timeout=30) for _ in range(2))
    with silent, partial:
        partial.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        assert httpx.get(empty.router.http_url + "/version").status_code == 200
        assert silent.recv(1) == b"" and partial.recv(1) == b""  # closed by the server


def test_an_unexpected_error_is_500_and_the_connection_serves_on(empty, monkeypatch):
    """A bug behind a route answers 500 in the error shape and keeps the connection: uvicorn
    used to close it after the 500, unannounced, under a client already sending its next
    request there (the openai SDK's connection pool does)."""
    def broken():
        raise RuntimeError("a bug")

    monkeypatch.setattr(empty.gateway, "missing_roles", broken)
    one = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    last = b"GET /version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    replies = exchange(empty.router.http_url, one + last).split(b"HTTP/1.1 ")[1:]
    assert len(replies) == 2 and replies[0].startswith(b"500 ") and replies[1].startswith(b"200 ")
    error = json.loads(replies[0].split(b"\r\n\r\n", 1)[1])["error"]
    assert error["code"] == 500 and error["message"] == "internal error: RuntimeError"


STREAM_TOKENS = 12
_solo: dict[int, str] = {}


def stream_body(i: int, stream: bool = True) -> dict:
    rng = random.Random(i)
    return {"prompt": [rng.randrange(1, 250) for _ in range(3 + i)], "max_tokens": STREAM_TOKENS,
            "temperature": 0, "ignore_eos": True, "stream": stream}


def solo_text(url: str, i: int) -> str:
    if i not in _solo:
        response = httpx.post(url + "/v1/completions", json=stream_body(i, stream=False), timeout=60)
        _solo[i] = response.json()["choices"][0]["text"]
    return _solo[i]


async def read_stream(client, url: str, i: int, cut: int | None) -> str | None:
    """The whole text of stream ``i``, or None once it left on the line after ``cut`` events
    (0: on its first line)."""
    text, num_events = "", 0
    async with client.stream("POST", url + "/v1/completions", json=stream_body(i)) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if cut is not None and num_events >= cut:
                return None
            if line == "data: [DONE]":
                return text
            if line:
                text += json.loads(line.removeprefix("data: "))["choices"][0]["text"]
                num_events += 1
    raise AssertionError("the stream ended without [DONE]")


@settings(max_examples=4, deadline=None, derandomize=True)
@given(cuts=st.lists(st.one_of(st.none(), st.integers(0, STREAM_TOKENS - 2)), min_size=2, max_size=8))
def test_streams_cut_at_random_points_leave_the_others_exact(http_cluster, cuts):
    """Concurrent streams, some left at random points: the others get exactly their solo
    greedy text, nothing stays running or holds KV, and every request is counted once."""
    from tests.e2e.helpers import wait_all_blocks_free

    url = http_cluster.http_url
    expected = [solo_text(url, i) for i in range(len(cuts))]
    before = scrape(url)

    async def run() -> list:
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(read_stream(client, url, i, cut) for i, cut in enumerate(cuts)))

    texts = asyncio.run(run())
    assert [t for t in texts if t is not None] == [e for e, t in zip(expected, texts) if t is not None]
    with Client(http_cluster.endpoint, timeout=60) as zmq:
        wait_all_blocks_free(zmq)
        assert zmq.status()["router"]["active"] == 0
    after = scrape(url)
    finished = {reason: delta(before, after, "pdserve:request_success_total", finished_reason=reason)
                for reason in ("length", "abort")}
    # A stream left after its last token may have finished before its client was seen to go.
    assert sum(finished.values()) == len(cuts) and finished["abort"] <= texts.count(None)
    assert after[("pdserve:num_requests_running", frozenset())] == 0
