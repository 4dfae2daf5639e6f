"""The client library and the CLI misused as outside callers misuse them: each mistake gets a
clear error of the library's own types (or one line from the CLI), never a traceback from deep
inside, a hang or a warning. A real router on real sockets; no workers are needed."""
import os
import subprocess
import sys
import warnings

import pytest

from router.client import AsyncClient, Client, InvalidRequest, Unavailable
from tests.router.helpers import make_router


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
