"""Every request gets an answer, and nothing stalls the router: no router at the endpoint,
unparseable input with requests in flight, oversized requests, a client past its backlog cap,
a long prompt being tokenized, a queue head that does not fit, a refused reservation.
Real router, real sockets; the workers are WorkerLinks whose every message the test writes."""
import asyncio
import dataclasses
import re
import socket
import subprocess
import sys

import msgpack
import pytest
import zmq
import zmq.asyncio

from router import protocol as P
from router.client import AsyncClient, InvalidRequest, Unavailable
from router.config import RouterConfig
from router.runtime import RouterThread
from router.worker_link import WorkerLink
from tests.router.helpers import FINGERPRINT, make_router, model_info
from tests.router.test_workers import info as worker_info

CAPS = {"transports": ["zmq"], "host": "h", "boot_id": "b", "shm_id": "s"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_clients_and_the_cli_fail_at_once_when_no_router_listens(tmp_path):
    stale = tmp_path / "stale.ipc"
    with socket.socket(socket.AF_UNIX) as s:  # a socket file nobody listens on any more
        s.bind(str(stale))
    port = free_port()
    cases = {f"ipc://{tmp_path}/missing.ipc": "missing.ipc does not exist",
             f"ipc://{stale}": "was refused (nothing is listening there)",
             f"tcp://127.0.0.1:{port}": "was refused (nothing is listening there)"}
    for endpoint, why in cases.items():
        client = AsyncClient(endpoint, timeout=600)  # the timeout is not what ends it
        with pytest.raises(Unavailable, match=f"no router at {re.escape(endpoint)}: .*{re.escape(why)}"):
            await client.status()
        with pytest.raises(Unavailable, match=f"no router at {endpoint}"):
            async with AsyncClient(endpoint):
                pass
    for endpoint, why in cases.items():
        out = subprocess.run([sys.executable, "-m", "router.cli", "status", "--endpoint", endpoint],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 1 and "Traceback" not in out.stderr
        assert out.stderr.strip().startswith(f"pdserve status: unavailable: no router at {endpoint}")
        assert why in out.stderr


async def test_client_refuses_what_is_over_the_protocol_limits_before_sending(tmp_path):
    client = AsyncClient(f"ipc://{tmp_path}/unused.ipc")  # refused before it even connects
    with pytest.raises(InvalidRequest, match="prompt_token_ids has 4194305 items, over the protocol's limit"):
        client.generate(prompt_token_ids=[1] * (4 * 1024 * 1024 + 1))
    with pytest.raises(InvalidRequest, match="the prompt has 4194305 characters, over the router's limit"):
        client.generate("x" * (4 * 1024 * 1024 + 1))


async def recv_until(sock, rid: str, timeout: float = 30.0) -> list:
    """Every reply until ``rid``'s last one (a finish reason or an error)."""
    replies = []
    while True:
        msg = P.decode(await asyncio.wait_for(sock.recv(), timeout))
        replies.append(msg)
        if msg.rid == rid and (isinstance(msg, P.Error) or getattr(msg, "finish_reason", None)):
            return replies


async def test_unparseable_input_fails_the_connections_requests_in_flight_and_huge_prompts_get_errors(tmp_path):
    thread = make_router(tmp_path, max_queue=16)
    ctx = zmq.asyncio.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.connect(thread.config.frontend)
        for rid in ("a", "b"):  # queued: no worker will ever take them
            await sock.send(P.encode(P.Generate(rid, None, [1, 2], {"max_tokens": 2})))
        for _ in range(50):  # a flood of bytes whose request id cannot be read
            await sock.send(b"\xc1garbage")
        errors = {}
        while len(errors) < 2:
            msg = P.decode(await asyncio.wait_for(sock.recv(), 10))
            errors[msg.rid] = msg
        for rid in ("a", "b"):
            assert errors[rid].code == P.ERR_INVALID
            assert "this connection sent a message the router could not parse" in errors[rid].message
        # Ten million token ids: under the byte limit, over the unpacker's list limit. Its id is
        # still read, so it gets an error instead of silence.
        huge = msgpack.packb([P.Generate.TAG, "huge", None, [1] * 10_000_000, {}], use_bin_type=True)
        assert len(huge) < P.MAX_MESSAGE_BYTES
        await sock.send(huge)
        await sock.send(P.encode(P.Generate("ok", None, [1, 2], {"max_tokens": 2}, True, 0.2)))
        replies = {m.rid: m for m in await recv_until(sock, "ok")}
        assert replies["huge"].code == P.ERR_INVALID
        assert "10000000 exceeds max_array_len(4194304)" in replies["huge"].message
        assert replies["ok"].code == P.ERR_TIMEOUT  # the router served on
        sock.close(0)
    finally:
        ctx.term()
        thread.stop()


async def register(router, worker_id: str, role: str, heartbeat_s: float = 0.05, **info) -> WorkerLink:
    link = WorkerLink(router.config.backend, worker_id,
                      worker_info(role, fingerprint=FINGERPRINT, transports=CAPS, **info),
                      stats=dict, heartbeat_s=heartbeat_s)
    await link.connect()
    return link


async def recv(link):
    return await asyncio.wait_for(link.recv(), 10)


async def test_a_client_past_its_backlog_cap_gets_overloaded_not_silence(tmp_path):
    config = RouterConfig(frontend=f"ipc://{tmp_path}/c.ipc", backend=f"ipc://{tmp_path}/w.ipc",
                          max_client_backlog=50, tick_s=0.05)
    thread = RouterThread(config, model_info(max_model_len=200_000)).start()
    big = {"max_model_len": 200_000, "num_blocks": 60_000}
    p0, d0 = await register(thread, "p0", "prefill", **big), await register(thread, "d0", "decode", **big)
    ctx = zmq.asyncio.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.rcvhwm = 1
        sock.rcvbuf = 4096
        sock.connect(config.frontend)
        await sock.send(P.encode(P.Generate("a", None, [1, 2], {"max_tokens": 150_000, "ignore_eos": True})))
        alloc = await recv(d0)
        d0.send(P.Allocated(alloc.rid, alloc.transfer_id, {"transport": "zmq", "ranks": []}))
        await recv(p0)
        p0.send(P.FirstToken(alloc.rid, alloc.transfer_id, 7, 0.0))
        d0.send(P.Started(alloc.rid, alloc.transfer_id))
        # 40,000 tokens that the client does not read: more than zmq and the kernel hold for it.
        for step in range(10):
            d0.send(P.Tokens("d0", step, [[alloc.rid, 8, 0.0, None]] * 4000))
        free = await asyncio.wait_for(d0.recv(), 60)
        assert free == P.Free(alloc.rid, P.FINISH_ABORT)  # the router stopped the stream
        await sock.send(P.encode(P.Generate("b", None, [1, 2], {"max_tokens": 2})))
        replies = await recv_until(sock, "a", timeout=60)
        ends = [m for m in replies if isinstance(m, P.Error) or m.finish_reason is not None]
        assert [(m.rid, m.code) for m in ends] == [("a", P.ERR_OVERLOADED)]
        assert "fell 50 messages behind" in ends[0].message
        assert all(m.token_ids == [8] for m in replies[1:-1])  # chunks up to the cap, in order
        later = P.decode(await asyncio.wait_for(sock.recv(), 10))  # "b" is answered too
        assert later.rid == "b"
        sock.close(0)
    finally:
        ctx.term()
        for link in (p0, d0):
            await link.close()
        thread.stop()


async def test_a_long_prompt_is_tokenized_off_the_loop(tmp_path):
    config = RouterConfig(frontend=f"ipc://{tmp_path}/c.ipc", backend=f"ipc://{tmp_path}/w.ipc")
    thread = RouterThread(config, model_info(max_model_len=1_000_000)).start()
    try:
        async with AsyncClient(config.frontend, timeout=60) as client:
            stream = client.generate("hello world " * 40_000, max_tokens=2)  # 480,000 characters
            seen = (await client.status())["router"]  # answered while the prompt is tokenized
            assert seen["tokenizing"] == 1 and seen["queued"] == 0
            while (await client.status())["router"]["queued"] != 1:
                await asyncio.sleep(0.05)
            await stream.aclose()
    finally:
        thread.stop()


async def test_admission_passes_over_a_head_that_does_not_fit_and_retries_a_refusal_at_once(tmp_path):
    thread = make_router(tmp_path, heartbeat_timeout_s=30.0, max_queue=8)
    beats = []
    p0 = await register(thread, "p0", "prefill")
    d0 = WorkerLink(thread.config.backend, "d0",
                    worker_info("decode", fingerprint=FINGERPRINT, transports=CAPS, num_blocks=12),
                    stats=lambda: beats.append(1) or {}, heartbeat_s=5.0)
    await d0.connect()
    try:
        async with AsyncClient(thread.config.frontend, timeout=30) as client:
            # Blocks of 4 tokens: 8 blocks, then 8 more (only 4 left), then 2.
            first = client.generate(prompt_token_ids=[1] * 30, max_tokens=3)
            a = await recv(d0)
            big = client.generate(prompt_token_ids=[2] * 30, max_tokens=3)
            small = client.generate(prompt_token_ids=[3] * 6, max_tokens=2)
            b = await recv(d0)
            assert b.token_ids == [3] * 6  # the small one went past the head that does not fit
            num_beats = len(beats)
            d0.send(P.Allocated(b.rid, b.transfer_id, None, "no room right now"))
            again = await recv(d0)
            assert again.token_ids == [3] * 6 and again.rid != b.rid
            assert len(beats) == num_beats  # retried before any heartbeat could say "room"
            for stream in (first, big, small):
                await stream.aclose()
            assert a.token_ids == [1] * 30
    finally:
        for link in (p0, d0):
            await link.close()
        thread.stop()


async def test_long_http_prompts_chats_and_socket_chats_are_tokenized_off_the_loop(tmp_path):
    """A job holds the tokenizer thread; a long HTTP completion prompt, a long HTTP chat and a
    long chat over the socket queue behind it while the loop keeps answering; once the thread
    is released each is admitted (there are no workers, so each then waits in the queue)."""
    import threading

    import httpx2 as httpx

    from router.http.config import HttpConfig

    from router.chat_template import ChatTemplate

    source = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    (tmp_path / "chat.jinja").write_text(source)  # the gateway's, and the same for socket chats
    model = dataclasses.replace(model_info(max_model_len=1_000_000), _chat_template=ChatTemplate(source))
    config = RouterConfig(frontend=f"ipc://{tmp_path}/c.ipc", backend=f"ipc://{tmp_path}/w.ipc")
    thread = RouterThread(config, model, http=HttpConfig(port=0, chat_template=str(tmp_path / "chat.jinja"))).start()
    gate = threading.Event()
    thread.post(lambda router: router.scheduler.tokenizer.run(gate.wait))
    long_text = "hello world " * 40_000  # 480,000 characters
    try:
        async with AsyncClient(config.frontend, timeout=60) as client, \
                httpx.AsyncClient(base_url=thread.router.http_url, timeout=60) as http:
            async def router_stats():
                return (await client.status())["router"]

            async def wait_for(key, value):
                async with asyncio.timeout(30):
                    while (await router_stats())[key] != value:
                        await asyncio.sleep(0.02)

            completion = asyncio.ensure_future(http.post("/v1/completions", json={
                "prompt": long_text, "max_tokens": 2}))
            await wait_for("tokenizing", 2)  # the gate, and the completion's prompt behind it
            chat = asyncio.ensure_future(http.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": long_text}], "max_tokens": 2}))
            await wait_for("tokenizing", 3)
            stream = client.generate(messages=[{"role": "user", "content": long_text}], max_tokens=2)
            await wait_for("tokenizing", 4)  # the loop answered each status meanwhile
            assert (await router_stats())["queued"] == 0
            gate.set()
            await wait_for("queued", 3)
            stats = await router_stats()
            assert stats["tokenizing"] == 0 and stats["rejected"] == 0
            await stream.aclose()
            for pending in (completion, chat):
                pending.cancel()
    finally:
        gate.set()
        thread.stop()
