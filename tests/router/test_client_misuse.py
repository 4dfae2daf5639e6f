"""The client library and the CLI misused as outside callers misuse them: each mistake gets a
clear error of the library's own types (or one line from the CLI), never a traceback from deep
inside, a hang or a warning; and a flood of them leaves the router and its workers in touch.
A real router on real sockets; the workers, where any are needed, are WorkerLinks."""
import asyncio
import os
import socket
import subprocess
import sys
import time
import warnings

import pytest

from router import protocol as P
from router.client import AsyncClient, Client, InvalidRequest, Unavailable
from router.worker_link import WorkerLink
from tests.router.helpers import FINGERPRINT, make_router
from tests.router.test_no_hang import CAPS
from tests.router.test_workers import info as worker_info

# 300 Allocates at 15 ms each: 4.5 s of handling, past the worker's 3 s router timeout.
NUM_FLOOD = 300
HANDLE_S = 0.015


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    thread = make_router(tmp_path_factory.mktemp("router"))
    yield thread
    thread.stop()


@pytest.mark.parametrize("arguments", [{"prompt_token_ids": [2 ** 64]}, {"prompt": "hi", "seed": 2 ** 70},
                                       {"prompt": "hi", "max_tokens": 2 ** 64},
                                       {"prompt": "hi", "stop_token_ids": [-2 ** 64]}])
def test_integers_past_64_bits_are_invalid_requests(router, arguments):
    with Client(router.config.frontend, timeout=10) as client:
        with pytest.raises(InvalidRequest, match="does not fit in 64 bits"):
            client.complete(**arguments)
        assert client.status()["router"]["active"] == 0  # the client still works


def test_a_closed_client_says_so_and_its_open_streams_end_with_unavailable(router):
    client = Client(router.config.frontend, timeout=10)
    stream = client.generate(prompt_token_ids=[1, 2, 3])  # no workers: it stays queued
    client.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "coroutine was never awaited"
        with pytest.raises(Unavailable, match="this client was closed; make a new one"):
            client.status()
        with pytest.raises(Unavailable, match="this client was closed"):
            client.complete("hi")
        with pytest.raises(Unavailable, match="this client was closed"):
            next(stream)
    client.close()  # closing twice is harmless


async def test_a_closed_async_client_says_so(router):
    client = AsyncClient(router.config.frontend, timeout=10)
    await client.status()
    await client.close()
    with pytest.raises(Unavailable, match="this client was closed; make a new one"):
        await client.status()
    with pytest.raises(Unavailable, match="this client was closed"):
        client.generate("hi")


@pytest.mark.parametrize("timeout", ["5", float("nan"), float("inf"), True, 0, -1])
def test_a_bad_client_timeout_is_a_value_error(timeout):
    with pytest.raises(ValueError, match="timeout must be a positive number of seconds or None"):
        AsyncClient("ipc:///nowhere", timeout=timeout)


def test_a_bad_log_level_is_one_line_from_the_cli(tmp_path):
    out = subprocess.run([sys.executable, "-m", "router.cli", "status", "--endpoint", f"ipc://{tmp_path}/x.ipc"],
                         capture_output=True, text=True, timeout=60, env={**os.environ, "PDSERVE_LOG": "loud"})
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip() == ("pdserve status: PDSERVE_LOG='loud' is not a log level; "
                                  "use DEBUG, INFO, WARNING or ERROR")


async def test_a_worker_busy_with_a_flood_of_messages_keeps_its_router(tmp_path):
    """A flood sends a decode worker thousands of Allocates at once; handling them back to back
    must leave its heartbeats room, or it takes the router for lost and drops every request."""
    thread = make_router(tmp_path, max_queue=1000, heartbeat_timeout_s=30.0)
    big = {"max_model_len": 64, "num_blocks": 100_000}
    losses = []
    links = [WorkerLink(thread.config.backend, worker_id,
                        worker_info(role, fingerprint=FINGERPRINT, transports=CAPS, **big),
                        stats=dict, heartbeat_s=0.05, on_router_lost=lambda: losses.append(1))
             for worker_id, role in (("p0", "prefill"), ("d0", "decode"))]
    d0 = links[1]
    try:
        for link in links:
            await link.connect()
        async with AsyncClient(thread.config.frontend, timeout=30) as client:
            streams = [client.generate(prompt_token_ids=[1, 2, 3], max_tokens=2) for _ in range(NUM_FLOOD)]
            for _ in range(NUM_FLOOD):
                msg = await d0.recv()  # as the worker reads them (wait_for would yield itself)
                assert isinstance(msg, P.Allocate)
                time.sleep(HANDLE_S)  # the work a real worker does for each, on its loop
            await asyncio.sleep(0.5)  # heartbeats go out and are answered as usual
            assert not losses, "the worker took its router for lost"
            for stream in streams:
                await stream.aclose()
    finally:
        for link in links:
            await link.close()
        thread.stop()


@pytest.mark.parametrize("endpoint", ["tcp://127.0.0.1:99999", "tcp://127.0.0.1:", "tcp://127.0.0.1:http"])
def test_an_endpoint_without_a_valid_port_is_refused_up_front(endpoint):
    with pytest.raises(ValueError, match="no valid port|has no port"):
        AsyncClient(endpoint)
    out = subprocess.run([sys.executable, "-m", "router.cli", "router", "--listen", endpoint],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "Traceback" not in out.stderr and endpoint in out.stderr


def test_a_port_in_use_says_what_to_do(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        endpoint = f"tcp://127.0.0.1:{taken.getsockname()[1]}"
        out = subprocess.run([sys.executable, "-m", "router.cli", "router", "--listen", endpoint,
                              "--backend", f"ipc://{tmp_path}/w.ipc", "--no-http"],
                             capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == (f"pdserve router: cannot bind {endpoint}: Address already "
                                                   "in use; another process holds it: stop that one or "
                                                   "choose another endpoint")
