"""One TP rank of a worker as a Ray actor (router/ray_launcher.py places and supervises them).

Each actor runs its rank as a child process (``pdserve worker``); a child that dies kills its
actor's process (so Ray restarts the actor, and with it the worker), and rank 0's actor, which
creates the other ranks' actors, exits when one of them dies: a TP group restarts as a whole.
Imports ray only when called: the router's modules stay importable without it.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

from router.launcher import PARENT_ENV


def import_ray():
    """The ``ray`` module, or ValueError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ValueError("--launcher ray needs Ray: pip install 'pdserve[ray]'") from None
    return ray


class WorkerActor:
    """Runs one TP rank of a ``pdserve worker`` on its Ray node (made a Ray actor class by
    ``actor_class``). Rank 0 (``rank_dir`` None) starts the actors of ranks 1..TP-1."""

    def __init__(self, argv: list[str], key_files: dict[str, str] | None, env: dict[str, str],
                 resources: dict, tp: int = 1, rank_dir: str | None = None):
        import subprocess
        import sys
        import tempfile

        import ray

        from worker.tp_group import TP_INIT_ENV

        self.node_id = ray.get_runtime_context().get_node_id()
        # 0700: keys, ipc endpoints and the TP rendezvous; ranks 1..K-1 use rank 0's (one node).
        self.run_dir = rank_dir or tempfile.mkdtemp(prefix="pdserve-ray-")
        env = {**env, TP_INIT_ENV: f"file://{self.run_dir}/tp-init"} if tp > 1 else dict(env)
        self.ranks = [] if rank_dir is not None else [
            self._start_rank(rank, argv, env, resources, tp) for rank in range(1, tp)]
        argv = list(argv) + ["--kv-dir", self.run_dir]
        if key_files:
            key_dir = Path(self.run_dir) / "keys"
            key_dir.mkdir(mode=0o700)
            for name, text in key_files.items():
                path = key_dir / name
                path.write_text(text)
                path.chmod(0o600)
            argv += ["--curve-dir", str(key_dir)]
        if "--kv-host" in argv and argv[argv.index("--kv-host") + 1] == "node":
            argv[argv.index("--kv-host") + 1] = ray.util.get_node_ip_address()
        from kvtransfer.negotiate import NODE_ID_ENV
        child_env = {**os.environ, **env, NODE_ID_ENV: self.node_id, PARENT_ENV: str(os.getpid())}
        # Its output goes to the actor's stderr, which Ray forwards to the driver's stderr: the
        # driver's stdout carries only `pdserve serve`'s ready line.
        self.proc = subprocess.Popen([sys.executable, "-m", "router.cli", "worker", *argv],
                                     stdin=subprocess.DEVNULL, stdout=sys.stderr, env=child_env)
        threading.Thread(target=self._watch, name="pdserve-worker-watch", daemon=True).start()
        if self.ranks:
            threading.Thread(target=self._watch_ranks, name="pdserve-rank-watch", daemon=True).start()

    def _start_rank(self, rank: int, argv: list[str], env: dict, resources: dict, tp: int):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        strategy = PlacementGroupSchedulingStrategy(ray.util.get_current_placement_group(),
                                                    placement_group_bundle_index=rank)
        return actor_class().options(max_restarts=0, scheduling_strategy=strategy, **resources).remote(
            list(argv) + ["--tp-rank", str(rank)], None, env, resources, tp, self.run_dir)

    def _watch_ranks(self) -> None:
        import ray

        ready, _ = ray.wait([rank.wait.remote() for rank in self.ranks], num_returns=1)
        try:
            code = ray.get(ready[0])
        except ray.exceptions.RayError:  # its actor died
            code = 1
        if code != 0:
            os._exit(1)  # a TP group without one of its ranks is useless: restart all of it

    def rank_actors(self) -> list:
        """Rank 0: the actors of ranks 1..K-1."""
        return self.ranks

    def wait(self) -> int:
        """Block until this rank's process exits; its exit code. Ranks 1..K-1 run this for
        their whole life (rank 0 watches it), so they answer no other call."""
        return self.proc.wait()

    def _watch(self) -> None:
        code = self.proc.wait()
        if code != 0:
            # The worker crashed: end this actor's process too, so that Ray restarts the actor
            # (and with it the worker). Exit 0 means it was told to shut down: stay, idle,
            # until the launcher removes the actor.
            os._exit(1)

    def node(self) -> str:
        """This actor's Ray node id."""
        return self.node_id

    def worker_pid(self) -> int:
        return self.proc.pid


_ACTOR_CLASS = None


def actor_class():
    global _ACTOR_CLASS
    if _ACTOR_CLASS is None:
        _ACTOR_CLASS = import_ray().remote(WorkerActor)
    return _ACTOR_CLASS
