"""Shared pieces of the end-to-end tests: a tiny checkpoint, transformers' greedy reference,
and ``pdserve serve`` run as a real subprocess."""
from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from router.client import Client

EOS = 257  # tests.tiny_models with_tokenizer


def greedy_reference(model_dir: Path, prompts: list[list[int]], max_tokens: int | list[int],
                     stop_ids=(EOS,)) -> list[list[int]]:
    """transformers' greedy continuation of each prompt, ending after a stop id or max_tokens
    (one number for all prompts, or one per prompt).

    Computed once per checkpoint, prompts and versions, then read back: from memory within a
    run, from $PDSERVE_CACHE/test-reference across runs (keyed by every byte of the checkpoint,
    the prompts, the lengths, the stop ids and transformers' and torch's versions, so any change
    to any of them computes it afresh)."""
    from models.registry import cache_root

    lengths = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
    key = _reference_key(model_dir, [list(p) for p in prompts], lengths, sorted(stop_ids))
    if key in _REFERENCES:
        return [list(out) for out in _REFERENCES[key]]
    path = cache_root() / "test-reference" / f"greedy-{key}.json"
    try:
        outputs = json.loads(path.read_text())
    except (OSError, ValueError):
        outputs = _transformers_greedy(model_dir, prompts, lengths, stop_ids)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(outputs))
        tmp.replace(path)
    _REFERENCES[key] = outputs
    return [list(out) for out in outputs]


_REFERENCES: dict[str, list[list[int]]] = {}


def _reference_key(model_dir: Path, prompts: list[list[int]], lengths: list[int], stop_ids: list[int]) -> str:
    import torch
    import transformers

    key = hashlib.sha256(json.dumps([prompts, lengths, stop_ids, transformers.__version__,
                                     torch.__version__]).encode())
    for path in sorted(Path(model_dir).rglob("*")):
        if path.is_file():
            key.update(str(path.relative_to(model_dir)).encode() + b"\0")
            key.update(path.read_bytes())
    return key.hexdigest()[:24]


def _transformers_greedy(model_dir: Path, prompts: list[list[int]], lengths: list[int],
                         stop_ids) -> list[list[int]]:
    import torch

    from tests.tiny_models import load_hf_model, single_thread

    model = load_hf_model(model_dir)
    outputs = []
    with torch.no_grad(), single_thread():
        for prompt, length in zip(prompts, lengths):
            out, past, feed = [], None, torch.tensor([list(prompt)])
            for _ in range(length):  # transformers' own KV cache, as its generate() runs
                step = model(feed, past_key_values=past, use_cache=True)
                past = step.past_key_values
                token = int(step.logits[0, -1].argmax())
                out.append(token)
                feed = torch.tensor([[token]])
                if token in stop_ids:
                    break
            outputs.append(out)
    return outputs


def read_lines(pipe, lines: queue.Queue) -> None:
    for line in iter(pipe.readline, ""):
        lines.put(line)
    lines.put(None)


@contextmanager
def serve(tmp_path: Path, *args: str, timeout_s: float = 240.0):
    """Run ``pdserve serve ARGS`` until its ready line; yield (endpoint, process); SIGTERM at the
    end and check it exits cleanly."""
    endpoint = f"ipc://{tmp_path}/client.ipc"
    if "--port" not in args and "--no-http" not in args:
        args = ("--port", "0", *args)  # HTTP on a free port: tests run side by side
    proc = subprocess.Popen([sys.executable, "-m", "router.cli", "serve", "--listen", endpoint, *args],
                            stdout=subprocess.PIPE, stderr=open(tmp_path / "serve.log", "w"), text=True,
                            start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=read_lines, args=(proc.stdout, lines), daemon=True).start()
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no ready line within {timeout_s}s:\n{log_tail(tmp_path)}") from None
            if line is None:
                raise AssertionError(f"pdserve serve exited ({proc.wait()}):\n{log_tail(tmp_path)}")
            if "ready" in line:
                assert endpoint in line
                # with HTTP on, the line names the port really bound (never the 0 asked for)
                assert "--no-http" in args or re.search(r"http http://127\.0\.0\.1:[1-9]\d*", line), line
                break
        yield endpoint, proc
        pids = worker_pids(endpoint)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log_tail(tmp_path)
        assert lines.get(timeout=5) is None  # exactly one line on stdout
        for pid in pids:
            assert not pid_alive(pid), f"worker pid {pid} outlived pdserve serve"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def log_tail(tmp_path: Path, num_lines: int = 40) -> str:
    path = tmp_path / "serve.log"
    return "\n".join(path.read_text().splitlines()[-num_lines:]) if path.exists() else ""


def worker_pids(endpoint: str) -> list[int]:
    with Client(endpoint, timeout=30) as client:
        return [w["pid"] for w in client.status()["workers"] if w["pid"]]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


def wait_all_blocks_free(client, timeout_s: float = 30.0) -> list[dict]:
    """Poll status until every live worker reports all KV blocks free and nothing running."""
    deadline = time.monotonic() + timeout_s
    while True:
        workers = [w for w in client.status()["workers"] if w["alive"]]
        if workers and all(w["stats"] and w["free_blocks"] == w["num_blocks"] and not w["running"]
                           for w in workers):
            return workers
        if time.monotonic() > deadline:
            raise AssertionError(f"KV blocks not all free after {timeout_s}s: {workers}")
        time.sleep(0.1)


def unrestarted_workers(status: dict, pids: dict[str, int]) -> list[dict]:
    """``status``'s workers, after checking they are exactly the processes (worker id -> pid)
    the cluster started with: none exited, none restarted."""
    workers = status["workers"]
    assert {w["id"]: w["pid"] for w in workers if w["alive"]} == pids, workers
    assert [w["restarts"] for w in workers] == [0] * len(pids), workers
    return workers


def wait_kv_free_after(client, pids: dict[str, int], steps: dict[str, int], timeout_s: float = 30.0) -> dict:
    """Poll status until every worker reports all KV free and nothing running in a heartbeat
    sent after it ran more model steps than ``steps`` (worker id -> num_steps), so never in one
    older than what is being checked; returns that status. Every poll also checks that the
    workers are the unrestarted ``pids``."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = client.status()
        if all(w["stats"]["num_steps"] > steps[w["id"]] and w["free_blocks"] == w["num_blocks"]
               and not w["running"] for w in unrestarted_workers(status, pids)):
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"KV blocks not all free after {timeout_s}s: {status['workers']}")
        time.sleep(0.05)
