"""Crash = exit: a worker whose TP rank dies leaves at once with exit code 1 and one line saying
why, instead of lingering registered but useless."""
import subprocess
import sys
import time
from pathlib import Path

import pytest

from router.config import RouterConfig
from router.runtime import RouterThread
from tests.tiny_models import make_tiny_checkpoint

pytestmark = pytest.mark.slow


def children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def tp_ranks(pid: int) -> list[int]:
    return [c for c in children(pid) if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


def test_a_dead_tp_rank_ends_the_worker_with_a_one_line_reason(tmp_path):
    model = make_tiny_checkpoint(tmp_path / "llama", arch="llama", vocab_size=128)
    router = RouterThread(RouterConfig(frontend=f"ipc://{tmp_path}/c.ipc", backend=f"ipc://{tmp_path}/w.ipc",
                                       tick_s=0.05)).start()
    worker = subprocess.Popen(
        [sys.executable, "-m", "router.cli", "worker", "--role", "both", "--tp", "2", "--router",
         f"ipc://{tmp_path}/w.ipc", "--model", str(model), "--num-kv-blocks", "64", "--block-size", "4",
         "--heartbeat-s", "0.2", "--worker-id", "both-crash", "--kv-dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not router.call(lambda: bool(router.router.registry.alive())):
            assert worker.poll() is None and time.monotonic() < deadline, "the worker did not register"
            time.sleep(0.2)
        (rank1,) = tp_ranks(worker.pid)
        subprocess.run(["kill", "-KILL", str(rank1)], check=True)
        _, stderr = worker.communicate(timeout=60)
        assert worker.returncode == 1
        lines = [line for line in stderr.splitlines() if "exits:" in line]
        assert lines == ["pdserve worker both-crash exits: TP rank(s) [1] exited"], stderr[-2000:]
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(30)
        router.stop(stop_workers=False)
