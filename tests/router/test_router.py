"""The router over real sockets: admission, deadlines, cancel, status, hostile input, and
worker registration through the real WorkerLink. No worker here computes anything; requests
that need one simply wait (the request flow with real workers is in tests/e2e)."""
import asyncio
import random
import shutil
import socket

import msgpack
import pytest
import zmq
import zmq.asyncio

from router import protocol as P
from router.client import AsyncClient, InvalidRequest, Overloaded, RequestTimeout, Unavailable
from router.config import RouterConfig
from router.worker_link import RegistrationRefused, WorkerLink
from tests.router.helpers import FINGERPRINT, make_router
from tests.router.test_workers import info as worker_info

@pytest.fixture
def router(tmp_path):
    thread = make_router(tmp_path)
    yield thread
    thread.stop()


@pytest.fixture
async def client(router):
    async with AsyncClient(router.config.frontend, timeout=10) as c:
        yield c


async def wait_for(predicate, what, timeout=10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def test_queue_bound_gives_overloaded_and_cancel_aborts_a_queued_request(client):
    streams = [client.generate(prompt_token_ids=[1, 2], max_tokens=2) for _ in range(4)]
    await wait_for(lambda: _queued(client, 4), "4 queued requests")
    with pytest.raises(Overloaded, match="4 requests are already waiting"):
        await client.complete(prompt_token_ids=[1], max_tokens=1)
    first = streams[0]
    await first.aclose()
    await wait_for(lambda: _queued(client, 3), "the cancel")
    status = await client.status()
    assert status["router"]["aborted"] == 1 and status["router"]["rejected"] == 1


async def _queued(client, n):
    return (await client.status())["router"]["queued"] == n


async def test_a_cancelled_stream_gets_a_final_abort_chunk(router):
    with zmq.asyncio.Context() as ctx:
        sock = ctx.socket(zmq.DEALER)
        sock.connect(router.config.frontend)
        await sock.send(P.encode(P.Generate("a", None, [1], {"max_tokens": 2})))
        await sock.send(P.encode(P.Cancel("a")))
        reply = P.decode(await asyncio.wait_for(sock.recv(), 10))
        assert reply == P.Chunk("a", [], "", P.FINISH_ABORT, 1)
        sock.close(0)


async def test_invalid_requests_get_clear_errors_and_the_router_keeps_serving(client):
    with pytest.raises(InvalidRequest, match="prompt is empty"):
        await client.complete("")
    with pytest.raises(InvalidRequest, match="max_tokens must be a positive integer, got -1"):
        await client.complete("hi", max_tokens=-1)
    with pytest.raises(InvalidRequest, match="prompt has 64 tokens but the max model length is 64"):
        await client.complete(prompt_token_ids=[1] * 64)
    with pytest.raises(InvalidRequest, match="top_p must be"):
        await client.complete("hi", top_p=2.0)
    assert (await client.status())["router"]["rejected"] == 4


async def test_deadline_gives_request_timeout(client):
    with pytest.raises(RequestTimeout, match="timeout_s of 0.2s"):
        await client.complete(prompt_token_ids=[1], timeout_s=0.2)
    status = await client.status()
    assert status["router"]["failed"] == 1 and status["router"]["queued"] == 0


async def test_requests_fail_unavailable_when_no_worker_comes(tmp_path):
    thread = make_router(tmp_path, unavailable_timeout_s=0.3)
    try:
        async with AsyncClient(thread.config.frontend, timeout=10) as c:
            with pytest.raises(Unavailable, match="no worker could serve the request for 0.3s"):
                await c.complete(prompt_token_ids=[1, 2])
    finally:
        thread.stop()


async def test_client_disconnect_aborts_its_requests(router, client):
    other = AsyncClient(router.config.frontend, timeout=10)
    stream = other.generate(prompt_token_ids=[1], max_tokens=3)
    await wait_for(lambda: _queued(client, 1), "the request to queue")
    other._sock.close()  # vanish without Cancel
    other._sock = None
    await wait_for(lambda: _queued(client, 0), "the disconnect to abort the request")
    assert (await client.status())["router"]["aborted"] == 1
    del stream


async def test_hostile_input_is_answered_or_dropped_and_good_traffic_continues(router, client):
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(router.config.frontend)
    rng = random.Random(1)
    good = P.encode(P.Generate("ok", None, [1, 2], {"max_tokens": 1}, True, 0.05))
    num_answered = 0
    for i in range(2000):
        kind = i % 4
        if kind == 0:
            await sock.send(bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 64))))
        elif kind == 1:
            await sock.send(msgpack.packb([1, f"t{i}", "x", None, {"max_tokens": 1}])[:-3])
        elif kind == 2:
            await sock.send(msgpack.packb([1, f"w{i}", 17, None, {}]))  # wrong type, rid readable
            num_answered += 1
        else:
            await sock.send_multipart([b"extra", b"frames"])
    await sock.send(good)
    replies = {}
    while "ok" not in replies:
        msg = P.decode(await asyncio.wait_for(sock.recv(), 10))
        replies[msg.rid] = msg
    assert replies["ok"].code == P.ERR_TIMEOUT                   # the good one was served
    wrong = [m for rid, m in replies.items() if rid.startswith("w")]
    assert len(wrong) == num_answered and all(m.code == P.ERR_INVALID for m in wrong)
    assert "Generate.prompt must be str or null, got int" in wrong[0].message
    # A message past MAXMSGSIZE drops that connection; the router itself carries on.
    await sock.send(b"\x00" * (P.MAX_MESSAGE_BYTES + 10))
    sock.close(0)
    ctx.term()
    assert (await client.status())["router"]["queued"] == 0


async def test_worker_registration_heartbeats_refusal_and_disconnect(router, client):
    stats = {"num_blocks": 100, "free_blocks": 90, "running": 2, "waiting": 1}
    link = WorkerLink(router.config.backend, "d0", worker_info("decode", fingerprint=FINGERPRINT),
                      stats=lambda: stats, heartbeat_s=0.05)
    config = await link.connect()
    assert config["heartbeat_timeout_s"] == 2.0 and link.registered

    async def heartbeat_seen():
        workers = (await client.status())["workers"]
        return workers and workers[0]["free_blocks"] == 90
    await wait_for(heartbeat_seen, "a heartbeat")
    (w,) = (await client.status())["workers"]
    assert (w["id"], w["role"], w["alive"], w["kv_usage"], w["running"], w["queued"]) == \
        ("d0", "decode", True, 0.1, 2, 1)

    other = WorkerLink(router.config.backend, "p0", worker_info("prefill", fingerprint="0" * 16),
                       stats=dict, heartbeat_s=0.05, register_timeout_s=10)
    with pytest.raises(RegistrationRefused, match="model mismatch"):
        await other.connect()
    dup = WorkerLink(router.config.backend, "d0", worker_info("decode", fingerprint=FINGERPRINT),
                     stats=dict, heartbeat_s=0.05)
    with pytest.raises(RegistrationRefused, match="already registered by a live worker"):
        await dup.connect()

    await link.close()  # the connection drops: dead at once, no heartbeat timeout needed

    async def dead():
        return not (await client.status())["workers"][0]["alive"]
    await wait_for(dead, "the disconnect", timeout=1.5)


async def test_worker_notices_router_death_and_registers_with_the_next_router(tmp_path):
    lost = asyncio.Event()
    first = make_router(tmp_path)
    link = WorkerLink(first.config.backend, "d0", worker_info("decode", fingerprint=FINGERPRINT),
                      stats=dict, on_router_lost=lost.set, heartbeat_s=0.05, router_timeout_s=0.5)
    try:
        await link.connect()
        first.stop(stop_workers=False)
        await asyncio.wait_for(lost.wait(), 10)
        assert not link.registered
        assert not link.send(P.WorkerError("r", "", "x"))   # nothing goes to a lost router
        second = make_router(tmp_path)
        try:
            async with AsyncClient(second.config.frontend, timeout=10) as c:
                async def back():
                    return [w["id"] for w in (await c.status())["workers"]] == ["d0"]
                await wait_for(back, "re-registration")

            async def registered():  # the router's Registered reaches the link a moment later
                return link.registered
            await wait_for(registered, "the link to hear it is registered again")
        finally:
            second.stop()
    finally:
        await link.close()


async def test_client_sees_unavailable_when_the_router_dies(tmp_path):
    thread = make_router(tmp_path)
    async with AsyncClient(thread.config.frontend, timeout=30) as c:
        stream = c.generate(prompt_token_ids=[1])
        await wait_for(lambda: _queued(c, 1), "queueing")
        thread.stop()
        with pytest.raises(Unavailable, match="router is shutting down|lost the connection"):
            async for _ in stream:
                pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_curve_keys_admit_known_peers_only(tmp_path):
    from router.cli import main as cli_main
    assert cli_main(["keys", str(tmp_path / "keys")]) == 0
    keys = str(tmp_path / "keys")
    port = _free_port()
    thread = make_router(tmp_path, frontend=f"tcp://127.0.0.1:{port}", curve_dir=keys)
    try:
        async with AsyncClient(thread.config.frontend, timeout=10, curve=keys) as c:
            assert (await c.status())["router"]["num_workers"] == 0
        async with AsyncClient(thread.config.frontend, timeout=10) as anonymous:
            with pytest.raises(Unavailable, match="CurveZMQ authentication failed"):
                await anonymous.status()
        stranger = tmp_path / "stranger"
        assert cli_main(["keys", str(stranger)]) == 0
        shutil.copy(tmp_path / "keys" / "router.key", stranger / "router.key")  # knows the router only
        async with AsyncClient(thread.config.frontend, timeout=10, curve=str(stranger)) as bad:
            with pytest.raises(Unavailable, match="CurveZMQ authentication failed"):
                await bad.status()
        # The worker key opens the worker socket only: the client socket refuses it.
        (stranger / "client.key_secret").unlink()
        shutil.copy(tmp_path / "keys" / "worker.key_secret", stranger / "client.key_secret")
        async with AsyncClient(thread.config.frontend, timeout=10, curve=str(stranger)) as worker_key:
            with pytest.raises(Unavailable, match="CurveZMQ authentication failed"):
                await worker_key.status()
        link = WorkerLink(thread.config.backend, "d0", worker_info("decode", fingerprint=FINGERPRINT),
                          stats=dict, curve_dir=keys)
        await link.connect()
        await link.close()
        link = WorkerLink(thread.config.backend, "d1", worker_info("decode", fingerprint=FINGERPRINT),
                          stats=dict, curve_dir=str(stranger))
        with pytest.raises(RegistrationRefused, match="CurveZMQ authentication failed"):
            await link.connect()
    finally:
        thread.stop()


def test_a_worker_learns_it_is_refused_before_loading_its_model(tmp_path):
    """``check_admission`` runs before a worker starts its TP ranks and loads its model: a
    router that refuses the worker's keys is named at once; a router that admits them, or no
    router yet (registration waits for one later), lets the start go on."""
    import time

    from router.cli import main as cli_main
    from router.worker_link import check_admission
    assert cli_main(["keys", str(tmp_path / "keys")]) == 0
    assert cli_main(["keys", str(tmp_path / "other")]) == 0
    keys, other = str(tmp_path / "keys"), str(tmp_path / "other")
    start = time.monotonic()
    check_admission(f"ipc://{tmp_path}/nobody.ipc", keys, within_s=60)
    check_admission(f"tcp://127.0.0.1:{_free_port()}", None, within_s=60)
    assert time.monotonic() - start < 30  # nothing listening is known at once, not waited out
    thread = make_router(tmp_path, curve_dir=keys)
    try:
        check_admission(thread.config.backend, keys, within_s=60)
        for curve in (None, other):
            with pytest.raises(RegistrationRefused, match=f"router {thread.config.backend} refused this worker: "
                                                          ".*CurveZMQ authentication failed"):
                check_admission(thread.config.backend, curve, within_s=60)
        with pytest.raises(ValueError, match="--router"):
            check_admission("nonsense", None)
    finally:
        thread.stop()


async def _serve_dropping(listener: socket.socket, drops: int, target: int | None, counts: dict) -> None:
    """Accept on ``listener``; close the first ``drops`` connections at once (a peer killed or
    restarting mid-handshake), then pipe each later one to 127.0.0.1:``target``."""
    loop = asyncio.get_running_loop()
    listener.setblocking(False)

    async def pipe(reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    tasks = set()
    try:
        while True:
            conn, _ = await loop.sock_accept(listener)
            counts["accepted"] += 1
            if counts["accepted"] <= drops or target is None:
                conn.close()
                continue
            reader, writer = await asyncio.open_connection(sock=conn)
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)
            tasks |= {asyncio.ensure_future(pipe(reader, up_writer)), asyncio.ensure_future(pipe(up_reader, writer))}
    finally:
        for task in tasks:
            task.cancel()


@pytest.mark.parametrize("with_keys", [True, False])
async def test_a_peer_that_drops_every_handshake_is_named_not_waited_on(tmp_path, with_keys):
    """Connections closed during the handshake, again and again, are what a router with other
    CurveZMQ keys (or none where we have some) does, and what a port that is no router does: the
    worker and the client say so after a few tries instead of waiting out their timeouts, and
    the client keeps saying it at once for every later request."""
    from router.cli import main as cli_main
    from router.sockets import SILENT_REFUSALS
    curve = None
    if with_keys:
        assert cli_main(["keys", str(tmp_path / "keys")]) == 0
        curve = str(tmp_path / "keys")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    endpoint = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
    counts = {"accepted": 0}
    dropper = asyncio.ensure_future(_serve_dropping(listener, 0, None, counts))
    streak = f"closed {SILENT_REFUSALS} connections in a row during the ZeroMQ handshake"
    try:
        link = WorkerLink(endpoint, "d0", worker_info("decode", fingerprint=FINGERPRINT), stats=dict,
                          curve_dir=curve, register_timeout_s=120)
        with pytest.raises(RegistrationRefused, match=f"{streak}: either CurveZMQ authentication failed"):
            await link.connect()
        async with AsyncClient(endpoint, timeout=120, curve=curve) as c:
            for _ in range(2):
                with pytest.raises(Unavailable, match=f"{streak}.*not a pdserve router's client endpoint"):
                    await c.status()
        assert counts["accepted"] >= 2 * SILENT_REFUSALS
    finally:
        dropper.cancel()
        listener.close()


async def test_drops_short_of_a_streak_are_no_refusal(tmp_path):
    """A router killed or restarting mid-handshake drops a connection or two: the worker and the
    client reconnect and go on, and nobody hears of an authentication failure."""
    from router.sockets import SILENT_REFUSALS
    front, back = _free_port(), _free_port()
    thread = make_router(tmp_path, frontend=f"tcp://127.0.0.1:{front}", backend=f"tcp://127.0.0.1:{back}")
    listeners, proxies = [], []
    try:
        for target in (front, back):
            listener = socket.socket()
            listener.bind(("127.0.0.1", 0))
            listener.listen(16)
            counts = {"accepted": 0}
            listeners.append((listener, counts))
            proxies.append(asyncio.ensure_future(_serve_dropping(listener, SILENT_REFUSALS - 1, target, counts)))
        (client_side, client_counts), (worker_side, worker_counts) = listeners
        link = WorkerLink(f"tcp://127.0.0.1:{worker_side.getsockname()[1]}", "d0",
                          worker_info("decode", fingerprint=FINGERPRINT), stats=dict, register_timeout_s=60)
        await link.connect()
        async with AsyncClient(f"tcp://127.0.0.1:{client_side.getsockname()[1]}", timeout=60) as c:
            status = await c.status()
        await link.close()
        assert status["router"]["num_workers"] == 1
        assert client_counts["accepted"] == worker_counts["accepted"] == SILENT_REFUSALS
    finally:
        for proxy in proxies:
            proxy.cancel()
        for listener, _ in listeners:
            listener.close()
        thread.stop()


def test_binding_off_host_without_keys_is_refused(tmp_path):
    with pytest.raises(ValueError, match="reachable from other hosts.*pdserve keys"):
        RouterConfig(frontend="tcp://0.0.0.0:5555", backend=f"ipc://{tmp_path}/w.ipc")
    with pytest.raises(ValueError, match="another process is listening"):
        with_router = make_router(tmp_path)
        try:
            make_router(tmp_path)
        finally:
            with_router.stop()
