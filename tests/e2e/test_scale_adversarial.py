"""Scaling and status driven the way an outside user or a hostile checker would, through the
public interfaces only (``pdserve serve``, ``pdserve scale``, ``pdserve status``, ``Client``):
bad counts from several clients in a random order while streams run, then a dead worker in the
status table; good counts from several clients at once while streams run, then SIGTERM during
a scale-up. Every bad call gets one clear line (a non-zero exit for the CLI) and changes
nothing; the streams running meanwhile are exactly an undisturbed greedy run; the cluster ends
with a last request's counts; no worker process outlives its removal or the server."""
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

from router.client import Client, InvalidRequest
from router.scaling import MAX_WORKERS_PER_ROLE
from tests.e2e.helpers import greedy_reference, log_tail, pid_alive, serve, wait_all_blocks_free

pytestmark = pytest.mark.slow

# (keyword arguments, what the error must say): wrong types, zero, negative, absurd and
# unencodable counts.
BAD_CALLS = [
    ({"decode": 0}, "--decode must be a positive integer"),
    ({"prefill": -1}, "--prefill must be a positive integer"),
    ({"prefill": True}, "--prefill must be a positive integer"),
    ({"decode": 2.0}, "--decode must be a positive integer"),
    ({"decode": "2"}, "--decode must be a positive integer"),
    ({"prefill": [1]}, "--prefill must be a positive integer"),
    ({"prefill": 10**9}, f"over the {MAX_WORKERS_PER_ROLE} workers per role"),
    ({"decode": 10**30}, f"over the {MAX_WORKERS_PER_ROLE} workers per role"),
]
CLI_CALLS = [(["--decode", "0"], "--decode must be a positive integer"),
             (["--prefill", "-3"], "--prefill must be a positive integer"),
             (["--prefill", "1000000000"], f"over the {MAX_WORKERS_PER_ROLE} workers per role"),
             (["--decode", str(10**30)], f"over the {MAX_WORKERS_PER_ROLE} workers per role")]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "router.cli", *args], capture_output=True, text=True,
                          timeout=120)


def _one_clear_line(out: subprocess.CompletedProcess, command: str, expected: str) -> None:
    assert out.returncode == 1, (out.returncode, out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"pdserve {command}: "), out.stderr
    assert expected in lines[0] and "Traceback" not in out.stderr, out.stderr


def test_bad_scale_calls_are_refused_clearly_while_streams_run(tmp_path, tiny_model):
    rng = random.Random(11)
    prompts = [[rng.randrange(1, 250) for _ in range(rng.randrange(3, 12))] for _ in range(6)]
    reference = greedy_reference(tiny_model, prompts, 40)
    with serve(tmp_path, "--model", str(tiny_model), "--prefill", "1", "--decode", "2", "--no-restart",
               "--num-kv-blocks", "256") as (endpoint, _proc):
        with Client(endpoint, timeout=120) as client:
            before = client.status()["workers"]
            outputs: dict[int, list[int]] = {}

            def stream(i: int) -> None:
                with Client(endpoint, timeout=120) as own:
                    outputs[i] = [t for chunk in own.generate(prompt_token_ids=prompts[i], max_tokens=40,
                                                              temperature=0) for t in chunk.token_ids]

            answers: list[tuple[str, str]] = []

            def hostile(seed: int) -> None:
                calls = BAD_CALLS * 2
                random.Random(seed).shuffle(calls)
                with Client(endpoint, timeout=60) as own:
                    for kwargs, expected in calls:
                        with pytest.raises(InvalidRequest) as caught:
                            own.scale(**kwargs)
                        answers.append((expected, str(caught.value)))

            threads = ([threading.Thread(target=stream, args=(i,)) for i in range(len(prompts))]
                       + [threading.Thread(target=hostile, args=(seed,)) for seed in range(3)])
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(300)
            assert not any(thread.is_alive() for thread in threads)
            assert len(answers) == 3 * 2 * len(BAD_CALLS)
            for expected, message in answers:
                assert expected in message, (expected, message)
            assert [outputs[i] for i in range(len(prompts))] == reference
            wait_all_blocks_free(client)
            after = client.status()["workers"]
            assert [(w["id"], w["pid"], w["alive"]) for w in after] == \
                [(w["id"], w["pid"], w["alive"]) for w in before]

            for args, expected in CLI_CALLS:
                _one_clear_line(_cli("scale", "--endpoint", endpoint, *args), "scale", expected)

            # A dead worker (no supervisor to restart it) is a readable row, not a traceback.
            victim = next(w for w in after if w["id"] == "decode-1")
            os.kill(victim["pid"], signal.SIGKILL)
            deadline = time.monotonic() + 60
            while any(w["alive"] for w in client.status()["workers"] if w["id"] == "decode-1"):
                assert time.monotonic() < deadline, "the router never noticed the killed worker"
                time.sleep(0.2)
        out = _cli("status", "--endpoint", endpoint)
        assert out.returncode == 0 and not out.stderr.strip(), out.stderr
        rows = {line.split()[0]: line for line in out.stdout.splitlines()[2:] if line.strip()}
        assert set(rows) >= {"prefill-0", "decode-0", "decode-1"}, out.stdout
        assert rows["decode-1"].rstrip().endswith(")") and " no (" in rows["decode-1"], out.stdout
        assert rows["decode-0"].rstrip().endswith("yes"), out.stdout


def test_status_and_scale_with_nothing_listening_say_so_in_one_line(tmp_path):
    for command, extra in (("status", []), ("scale", ["--decode", "2"])):
        out = _cli(command, "--endpoint", f"ipc://{tmp_path}/nobody.ipc", "--timeout", "5", *extra)
        _one_clear_line(out, command, "no router at")


def _limit_memory() -> None:
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))  # a regression fails, not swaps


@pytest.mark.parametrize("args, expected", [
    (["--prefill", "1000000000"], f"--prefill 1000000000 is over the {MAX_WORKERS_PER_ROLE} workers"),
    (["--decode", str(10**30)], f"is over the {MAX_WORKERS_PER_ROLE} workers"),
    (["--mode", "colocated", "--workers", "1000000000"], "--workers 1000000000 is over"),
    (["--decode", "0"], "--decode must be a positive integer"),
])
def test_serve_refuses_absurd_worker_counts_before_starting_anything(tmp_path, args, expected):
    out = subprocess.run([sys.executable, "-m", "router.cli", "serve", "--no-http", "--model", "demo",
                          "--listen", f"ipc://{tmp_path}/c.ipc", *args], capture_output=True, text=True,
                         timeout=120, preexec_fn=_limit_memory)
    _one_clear_line(out, "serve", expected)
    assert not list(tmp_path.iterdir())  # no socket bound, nothing started


def _live(client) -> tuple[int, int]:
    workers = [w for w in client.status()["workers"] if w["alive"] and not w.get("draining")]
    return sum(w["role"] == "prefill" for w in workers), sum(w["role"] == "decode" for w in workers)


def _wait(predicate, what: str, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s}s"
        time.sleep(0.2)


def test_concurrent_random_scaling_while_streaming_then_sigterm_mid_scale(tmp_path, tiny_model):
    rng = random.Random(12)
    prompts = [[rng.randrange(1, 250) for _ in range(rng.randrange(3, 12))] for _ in range(6)]
    reference = greedy_reference(tiny_model, prompts, 96)
    with serve(tmp_path, "--model", str(tiny_model), "--num-kv-blocks", "128", "--drain-timeout", "60") \
            as (endpoint, _proc):
        outputs: dict[int, list[int]] = {}
        last: dict[int, tuple[int, int]] = {}
        pids_seen: set[int] = set()
        errors: list[BaseException] = []

        def stream(i: int) -> None:
            try:
                with Client(endpoint, timeout=90) as own:
                    outputs[i] = [t for chunk in own.generate(prompt_token_ids=prompts[i], max_tokens=96,
                                                              temperature=0) for t in chunk.token_ids]
            except BaseException as exc:  # re-raised in the test's thread below
                errors.append(exc)

        def scaler(seed: int) -> None:
            calls = random.Random(seed)
            try:
                with Client(endpoint, timeout=60) as own:
                    for _ in range(3):
                        wanted = (calls.randint(1, 2), calls.randint(1, 2))
                        result = own.scale(prefill=wanted[0], decode=wanted[1])
                        assert (result["prefill"], result["decode"]) == wanted, result
                        last[seed] = wanted
                        pids_seen.update(w["pid"] for w in own.status()["workers"] if w["pid"])
                        time.sleep(calls.uniform(0.2, 1.5))
            except BaseException as exc:  # re-raised in the test's thread below
                errors.append(exc)

        threads = ([threading.Thread(target=stream, args=(i,)) for i in range(len(prompts))]
                   + [threading.Thread(target=scaler, args=(seed,)) for seed in range(3)])
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        assert not any(thread.is_alive() for thread in threads) and not errors, (errors, log_tail(tmp_path))
        assert [outputs[i] for i in range(len(prompts))] == reference

        with Client(endpoint, timeout=60) as client:
            counts = client.scale()  # no count: the counts in force
            final = (counts["prefill"], counts["decode"])
            assert final in last.values(), (final, last)
            _wait(lambda: _live(client) == final and len(client.status()["workers"]) == sum(final),
                  f"exactly {final} workers")
            assert client.status()["router"]["failed"] == 0
            wait_all_blocks_free(client)

            out = _cli("scale", "--endpoint", endpoint, "--prefill", "1", "--decode", "1")
            assert out.returncode == 0 and out.stdout.startswith("prefill 1  decode 1  added"), out
            _wait(lambda: len(client.status()["workers"]) == 2, "the scale-down to 1 + 1")
            kept = {w["pid"] for w in client.status()["workers"]}
            _wait(lambda: not any(pid_alive(pid) for pid in pids_seen - kept), "removed workers exiting", 60)
            assert [t for chunk in client.generate(prompt_token_ids=prompts[0], max_tokens=96, temperature=0)
                    for t in chunk.token_ids] == reference[0]

            # SIGTERM (by the fixture, on leaving) while added workers are still starting.
            assert len(client.scale(prefill=2, decode=3)["added"]) == 3
    leftovers = subprocess.run(["pgrep", "-f", f"router.cli worker.*{tiny_model}"], capture_output=True, text=True)
    assert not leftovers.stdout.strip(), f"worker processes outlived pdserve serve: {leftovers.stdout}"
