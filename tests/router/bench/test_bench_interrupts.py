"""The load test when its run is cut short: the server killed mid-run (the run stops within
seconds with one clear line, instead of every later request waiting out its timeout), Ctrl-C
(the requests in flight are cancelled; the server keeps serving) and a rate sweep whose every
request is refused (it stops at once instead of halving the rate for hours)."""
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import pytest

from router.client import Client
from tests.e2e.helpers import log_tail, read_lines

pytestmark = pytest.mark.slow


def _bench(endpoint, *argv):
    # --timeout 300 (the default): without the watchdog, every request sent after the server died
    # would wait that long
    return subprocess.Popen([sys.executable, "-m", "router.bench", "--endpoint", endpoint, "--no-progress",
                             "--num-warmups", "0", "--input-len", "8", *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(endpoint, bench, done):
    """Wait until ``done(router status)``, the load test still running."""
    with Client(endpoint, timeout=30) as client:
        deadline = time.monotonic() + 120
        while not done(client.status()["router"]):
            assert bench.poll() is None, bench.communicate()
            assert time.monotonic() < deadline, "the load test sent nothing"
            time.sleep(0.2)


@contextmanager
def _serve(tmp_path, *args):
    """``pdserve serve`` of the demo model; yields (endpoint, process, ready line)."""
    endpoint = f"ipc://{tmp_path}/client.ipc"
    proc = subprocess.Popen([sys.executable, "-m", "router.cli", "serve", "--model", "demo", "--mode", "colocated",
                             "--workers", "1", "--enforce-eager", "--listen", endpoint, *args],
                            stdout=subprocess.PIPE, stderr=open(tmp_path / "serve.log", "w"), text=True,
                            start_new_session=True)
    try:
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=read_lines, args=(proc.stdout, lines), daemon=True).start()
        line = lines.get(timeout=240)
        assert line is not None and "ready" in line, log_tail(tmp_path)
        yield endpoint, proc, line
    finally:
        try:  # the serve process and its workers
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A demo server without HTTP; the last test kills it."""
    with _serve(tmp_path_factory.mktemp("serve"), "--no-http") as (endpoint, proc, _):
        yield endpoint, proc


def _stop(proc):
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_ctrl_c_stops_the_run_and_cancels_its_requests(server):
    endpoint, _ = server
    bench = _bench(endpoint, "--num-prompts", "100", "--max-concurrency", "4", "--output-len", "400",
                   "--ignore-eos")
    try:
        _wait_for(endpoint, bench, lambda router: router["active"] >= 1)
        bench.send_signal(signal.SIGINT)
        _, err = bench.communicate(timeout=30)
    finally:
        _stop(bench)
    assert bench.returncode == 130 and "Traceback" not in err, err
    assert "interrupted; the requests in flight were cancelled" in err
    with Client(endpoint, timeout=60) as client:  # the server let go of them and serves others
        deadline = time.monotonic() + 60
        while (router := client.status()["router"])["active"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert router["active"] == 0 and router["aborted"] >= 1, router
        assert len(client.complete(prompt_token_ids=[1, 2, 3], max_tokens=3, ignore_eos=True).token_ids) == 3


def test_a_sweep_whose_every_request_is_refused_stops_at_its_first_run(server):
    # halving the rate cannot help a prompt longer than the model's context (2048 for the demo
    # model); 8 runs of 3 prompts at 10, 5, ... req/s would take over a minute (at the default
    # 200 prompts from 1 req/s, 14 hours)
    endpoint, _ = server
    bench = _bench(endpoint, "--input-len", "3000", "--output-len", "2", "--num-prompts", "3",
                   "--request-rate", "10", "--sweep-rate")
    try:
        _, err = bench.communicate(timeout=60)
    finally:
        _stop(bench)
    assert bench.returncode == 1 and "Traceback" not in err, err
    assert "the server refused every request of the run at 10 req/s (InvalidRequest" in err, err
    assert "the sweep stops" in err


def test_a_server_killed_mid_run_stops_the_run_with_one_clear_line(server):
    endpoint, proc = server
    with Client(endpoint, timeout=30) as client:
        before = client.status()["router"]["finished"]
    bench = _bench(endpoint, "--num-prompts", "2000", "--request-rate", "20", "--output-len", "4")
    try:
        _wait_for(endpoint, bench, lambda router: router["finished"] >= before + 3)
        proc.kill()  # the router runs in the serve process: SIGKILL takes the endpoint away
        proc.wait()
        _, err = bench.communicate(timeout=60)
    finally:
        _stop(bench)
    assert bench.returncode == 1, err
    assert "Traceback" not in err and "the server stopped answering" in err, err
    assert "mid-run;" in err and "of 2000 requests had completed" in err, err


def test_an_unserved_model_and_an_http_server_killed_mid_run_with_the_openai_backend(tmp_path):
    # its requests then fail at once (connection refused); the run used to go on sending the rest
    with _serve(tmp_path, "--port", "0") as (endpoint, proc, line):
        base_url = line.split("http ")[1].split()[0]
        # a model the server does not serve is named at once, not in a 404 per request
        wrong = subprocess.run([sys.executable, "-m", "router.bench", "--backend", "openai", "--base-url", base_url,
                                "--model", "nope", "--num-prompts", "2"], capture_output=True, text=True, timeout=60)
        assert wrong.returncode == 2 and "--model nope is not served at" in wrong.stderr, wrong.stderr
        bench = subprocess.Popen([sys.executable, "-m", "router.bench", "--backend", "openai", "--base-url",
                                  base_url, "--no-progress", "--num-warmups", "0", "--input-len", "8",
                                  "--output-len", "4", "--num-prompts", "2000", "--request-rate", "20"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            _wait_for(endpoint, bench, lambda router: router["finished"] >= 3)
            os.killpg(proc.pid, signal.SIGKILL)  # the HTTP gateway runs in the serve process
            _, err = bench.communicate(timeout=60)
        finally:
            _stop(bench)
    assert bench.returncode == 1, err
    assert "Traceback" not in err and "the server is gone (cannot reach " + base_url in err, err
    assert "mid-run;" in err and "of 2000 requests had completed" in err, err
