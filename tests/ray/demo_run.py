"""A real ``pdserve serve --launcher ray`` session on a small multi-node Ray cluster made on this
machine with Ray's ``cluster_utils`` (a head and four one-CPU nodes), printing each command and
its output: the run shown in docs/deploy.md.

    python -m tests.ray.demo_run
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from tests.tiny_models import make_tiny_checkpoint


def pdserve(*args: str) -> str:
    print(f"$ pdserve {' '.join(args)}", flush=True)
    out = subprocess.run([sys.executable, "-m", "router.cli", *args], capture_output=True, text=True,
                         timeout=300)
    text = (out.stdout + (out.stderr if out.returncode else "")).rstrip()
    print(text + "\n", flush=True)
    return text


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="pdserve-demo-"))
    model = make_tiny_checkpoint(tmp / "tiny-llama", "llama", num_kv_heads=2, vocab_size=258,
                                 with_tokenizer=True, seed=3)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "object_store_memory": 100 * 1024 * 1024, "include_dashboard": False})
    for _ in range(4):
        cluster.add_node(num_cpus=1, object_store_memory=100 * 1024 * 1024)
    cluster.wait_for_nodes()
    endpoint = f"ipc://{tmp}/client.ipc"
    os.environ["PDSERVE_ENDPOINT"] = endpoint
    argv = ["serve", "--launcher", "ray", "--ray-address", cluster.address, "--model", str(model),
            "--prefill", "1", "--decode", "1", "--num-kv-blocks", "256", "--port", "0"]
    print(f"$ pdserve {' '.join(argv)} &", flush=True)
    serve = subprocess.Popen([sys.executable, "-m", "router.cli", *argv], stdout=subprocess.PIPE,
                             stderr=open(tmp / "serve.log", "w"), text=True, start_new_session=True)
    try:
        print(serve.stdout.readline().rstrip() + "\n", flush=True)
        pdserve("generate", "--prompt-token-ids", "72,101,108,108,111", "--max-tokens", "8",
                "--temperature", "0")
        pdserve("status")
        pdserve("scale", "--prefill", "2", "--decode", "2")
        for _ in range(240):
            if pdserve_quiet("status").count(" yes") >= 4:
                break
            time.sleep(1)
        pdserve("status")
        pdserve("scale", "--prefill", "1", "--decode", "1")
        time.sleep(3)
        pdserve("status")
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(60)
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()


def pdserve_quiet(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "router.cli", *args], capture_output=True, text=True,
                          timeout=300).stdout


if __name__ == "__main__":
    main()
