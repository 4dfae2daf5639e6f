"""Workers on a Ray cluster: ``pdserve serve --launcher ray``.

    with RayCluster(num_prefill=1, num_decode=1, ray=RayOptions(address="auto")) as cluster:
        client = Client(cluster.endpoint)

The router runs in this (the driving) process, on a thread, as with the local launcher. Each
worker is a group of Ray actors (``WorkerActor``), one per TP rank, in its own placement group:
one bundle per rank (``cpus_per_rank`` CPUs, ``gpus_per_rank`` GPUs), packed on one node
(``STRICT_PACK``). Each actor runs its rank as a child process (``pdserve worker``; ranks 1..K-1
with ``--tp-rank``, meeting rank 0 at a rendezvous file in rank 0's private directory). A child
that dies kills its actor's process, and a dead actor kills its child. Rank 0's actor creates
the other ranks' actors, so it owns them: when it dies Ray kills them too, and when one of them
dies rank 0's actor exits, so the whole group restarts together (a TP group cannot lose a rank).

What Ray does and this module does not: placing groups on nodes, restarting a dead actor
(``max_restarts``; after a crash, ``ray.kill``, or the loss of its node, when the placement group
is rescheduled elsewhere), and detecting node failures. A restarted actor starts its worker again
under the same worker id; it registers again and takes load, and the router fails over what the
dead one held exactly as for a local SIGKILL.

Keys: the worker's CurveZMQ key pair and the router's public key travel as actor constructor
arguments (inside Ray's trust boundary: its GCS and object transfer), are written to a private
(0700) directory on the worker's node, and never appear on a command line. Workers reach the
router over tcp: on 127.0.0.1 when every Ray node is this machine, else on this node's address,
which ``check_bind`` refuses without keys; decode workers then receive KV on tcp on their
node's address (``kv_host="node"``) instead of ipc://.

Node identity: each worker process gets ``$PDSERVE_NODE_ID`` = its Ray node id, which the KV
transport negotiation compares (``kvtransfer.negotiate``), so ``auto`` picks shm only between
workers on one Ray node.

Scaling: the cluster is the router's ``Scaler`` (router/scaling.py): new workers start as new
actors; removed ones drain, then their actors are killed for good and their placement groups freed.
"""
from __future__ import annotations

import logging
import math
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from router.config import RouterConfig
from router.launcher import THREADS_ENV, ClusterError
from router.ray_actor import actor_class, import_ray
from router.scaling import check_count, check_counts
from router.security import check_bind, is_local_endpoint

log = logging.getLogger("pdserve.ray")
ROLE_IDS = ("prefill", "decode")
_KEY_FILES = ("worker.key", "worker.key_secret", "router.key")


@dataclass(frozen=True)
class RayOptions:
    """How workers are placed and supervised on the Ray cluster. Raises ValueError."""

    address: str = "auto"          # ray.init(address=...): "auto", "ray://HOST:10001", "HOST:6379"
    cpus_per_rank: float = 1.0     # CPUs each TP rank reserves
    gpus_per_rank: float = 0.0     # GPUs each TP rank reserves (1 with --device cuda)
    max_restarts: int = -1         # Ray restarts of a worker's actor (-1: without limit)
    drain_timeout_s: float = 60.0  # a draining worker's requests fail over after this
    kv_host: str | None = None     # decode workers receive KV on tcp here ("node": the node's address)

    def __post_init__(self) -> None:
        if not isinstance(self.address, str) or not self.address:
            raise ValueError("--ray-address must be 'auto' or a Ray cluster address")
        for name in ("cpus_per_rank", "gpus_per_rank"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a non-negative number, got {value!r}")
        if not self.cpus_per_rank and not self.gpus_per_rank:
            raise ValueError("each TP rank must reserve some CPUs or GPUs")
        if not isinstance(self.max_restarts, int) or self.max_restarts < -1:
            raise ValueError(f"max_restarts must be -1 (no limit) or at least 0, got {self.max_restarts!r}")
        if not isinstance(self.drain_timeout_s, (int, float)) or not self.drain_timeout_s > 0:
            raise ValueError(f"drain_timeout_s must be positive, got {self.drain_timeout_s!r}")


@dataclass
class WorkerGroup:
    """One worker on the cluster: its actor and the placement group that holds its ranks."""

    worker_id: str
    role: str
    actor: object
    placement_group: object
    draining: bool = False
    started_at: float = field(default_factory=time.monotonic)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class RayCluster:
    """A router in this process and its workers as Ray actors. See the module docstring."""

    def __init__(self, model: str | None = None, *, num_prefill: int = 1, num_decode: int = 1,
                 tp: int = 1, kv_transport: str = "auto", dtype: str = "auto", device: str = "cpu",
                 max_model_len: int | None = None, block_size: int = 16, num_kv_blocks: int | None = None,
                 kv_memory: int | None = None, max_num_seqs: int | None = None,
                 max_num_batched_tokens: int | None = None, enforce_eager: bool | None = None,
                 listen: str | None = None,
                 backend: str | None = None, curve_dir: str | None = None, ray: RayOptions | None = None,
                 router_options: dict | None = None, startup_timeout_s: float = 300.0,
                 worker_args: tuple[str, ...] = (), env: dict | None = None, http=None):
        check_count("--prefill", num_prefill)
        check_count("--decode", num_decode)
        self.ray = ray or RayOptions()
        self.engine = {"model": model, "tp": tp, "dtype": dtype, "device": device,
                       "max_model_len": max_model_len, "block_size": block_size,
                       "num_kv_blocks": num_kv_blocks, "kv_memory": kv_memory,
                       "kv_transport": kv_transport, "max_num_seqs": max_num_seqs,
                       "max_num_batched_tokens": max_num_batched_tokens, "kv_host": self.ray.kv_host,
                       "enforce_eager": enforce_eager}
        self.counts = {"prefill": num_prefill, "decode": num_decode}
        self.listen, self.backend, self.curve_dir = listen, backend, curve_dir
        for endpoint, what in ((listen, "--listen"), (backend, "--backend")):
            if endpoint is not None:
                check_bind(endpoint, curve_dir, what)
        if self.ray.kv_host is not None and not is_local_endpoint(f"tcp://{self.ray.kv_host}:0") \
                and curve_dir is None:
            raise ValueError(f"--kv-host {self.ray.kv_host} makes decode workers listen beyond this "
                             "machine; make keys with `pdserve keys DIR` and pass --curve-dir DIR")
        self.router_options = dict(router_options or {})
        self.http = http  # router.http.config.HttpConfig (its own rule: off loopback needs an API key)
        self.http_url: str | None = None
        self.startup_timeout_s = startup_timeout_s
        self.worker_args = tuple(worker_args)
        self.env = dict(env or {})
        self.endpoint = ""
        self.groups: dict[str, WorkerGroup] = {}
        self._lock = threading.Lock()  # groups: changed by the driver and the router's loop
        self._next_index = {role: 0 for role in ROLE_IDS}
        self._router_thread = None
        self._owns_ray = False

    # -- lifecycle ----------------------------------------------------------------------------
    def __enter__(self) -> "RayCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "RayCluster":
        """Connect to Ray, start the router and every worker; return once all have registered.
        Raises ValueError (bad options, no Ray) or ClusterError (workers did not register)."""
        ray = import_ray()
        if not ray.is_initialized():
            _init_keeping_signal_handlers(ray, self.ray.address)
            self._owns_ray = True
        try:
            self._start_router()
            for role in ROLE_IDS:
                for _ in range(self.counts[role]):
                    self._start_group(role)
            self.wait_for_workers(sum(self.counts.values()), self.startup_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_router(self) -> None:
        from router.runtime import RouterThread

        ray = import_ray()
        if self.backend is None:
            here = ray.util.get_node_ip_address()
            ips = {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
            # Every node on this machine: loopback needs no keys and leaves no port open outside.
            host = "127.0.0.1" if ips <= {here} else here
            self.backend = f"tcp://{host}:{_free_port(host)}"
            check_bind(self.backend, self.curve_dir, "the router's worker endpoint (--backend)")
            if host != "127.0.0.1" and self.engine["kv_host"] is None:
                self.engine["kv_host"] = "node"  # ipc:// KV endpoints do not reach other machines
        self.endpoint = self.listen or f"tcp://127.0.0.1:{_free_port('127.0.0.1')}"
        config = RouterConfig(frontend=self.endpoint, backend=self.backend, model_dir=self.engine["model"],
                              curve_dir=self.curve_dir, kv_transport=self.engine["kv_transport"],
                              **self.router_options)
        self._router_thread = RouterThread(config, http=self.http).start()
        self.http_url = self._router_thread.router.http_url
        self._router_thread.call(setattr, self._router_thread.router, "scaler", self)

    def _key_files(self) -> dict[str, str] | None:
        if self.curve_dir is None:
            return None
        key_dir = Path(self.curve_dir)
        missing = [name for name in _KEY_FILES if not (key_dir / name).is_file()]
        if missing:
            raise ValueError(f"{key_dir} lacks {missing}; make keys with `pdserve keys {key_dir}`")
        return {name: (key_dir / name).read_text() for name in _KEY_FILES}

    def _start_group(self, role: str) -> WorkerGroup:
        """Reserve a placement group for one worker and start its actor (does not wait)."""
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        with self._lock:
            worker_id = f"{role}-{self._next_index[role]}"
            self._next_index[role] += 1
        tp = self.engine["tp"]
        cpus, gpus = self.ray.cpus_per_rank, self.ray.gpus_per_rank
        bundle = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
        pg = placement_group([bundle] * tp, strategy="STRICT_PACK", name=f"pdserve-{worker_id}-{uuid.uuid4().hex[:8]}")
        argv = ["--role", role, "--router", self.backend, "--worker-id", worker_id]
        for name, value in self.engine.items():
            if isinstance(value, bool):  # a flag
                argv += [f"--{name.replace('_', '-')}"] if value else []
            elif value is not None:
                argv += [f"--{name.replace('_', '-')}", str(value)]
        env = {THREADS_ENV: str(max(1, int(self.ray.cpus_per_rank))), **self.env}
        resources = {"num_cpus": cpus, "num_gpus": gpus}
        actor = actor_class().options(
            max_restarts=self.ray.max_restarts, max_task_retries=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0),
            **resources,
        ).remote(argv + list(self.worker_args), self._key_files(), env, resources, tp)
        group = WorkerGroup(worker_id, role, actor, pg)
        with self._lock:
            self.groups[worker_id] = group
        log.info("started %s worker %s on the Ray cluster", role, worker_id)
        return group

    def num_registered(self, role: str | None = None) -> int:
        """Live registered workers (of ``role``), draining ones excluded."""
        def count(router):
            return sum(1 for w in router.registry.alive()
                       if not w.draining and (role is None or w.role == role))
        return self._router_thread.call(count, self._router_thread.router)

    def wait_for_workers(self, count: int, timeout_s: float) -> None:
        """Block until ``count`` workers are registered. Raises ClusterError past ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while self.num_registered() < count:
            if time.monotonic() > deadline:
                raise ClusterError(f"only {self.num_registered()} of {count} workers registered within "
                                   f"{timeout_s:g}s; see the workers' output in the Ray logs "
                                   "(/tmp/ray/session_latest/logs on each node)")
            time.sleep(0.2)

    def node_of(self, worker_id: str, timeout_s: float = 60.0) -> str:
        """The Ray node id a worker's actor runs on now."""
        return import_ray().get(self.groups[worker_id].actor.node.remote(), timeout=timeout_s)

    def kill_worker(self, worker_id: str, rank: int = 0) -> None:
        """Kill the actor of one TP rank of a worker the way a crash would (fault injection):
        Ray restarts the group."""
        ray = import_ray()
        actor = self.groups[worker_id].actor
        if rank > 0:
            actor = ray.get(actor.rank_actors.remote(), timeout=60)[rank - 1]
        ray.kill(actor, no_restart=False)

    # -- Scaler (called on the router's loop) --------------------------------------------------
    def scale(self, num_prefill: int | None, num_decode: int | None) -> dict:
        """Start or drain workers so that each role has its count (None: unchanged)."""
        check_counts(num_prefill, num_decode)
        wanted = {"prefill": num_prefill, "decode": num_decode}
        router = self._router_thread.router
        added, draining = [], []
        for role, n in wanted.items():
            if n is None:
                continue
            with self._lock:
                active = sorted((g for g in self.groups.values() if g.role == role and not g.draining),
                                key=lambda g: g.started_at)
            added += [self._start_group(role).worker_id for _ in range(n - len(active))]
            for group in reversed(active[n:] if n < len(active) else []):
                group.draining = True  # the newest go first
                draining.append(group.worker_id)
                try:
                    router.drainer.drain(group.worker_id, self.ray.drain_timeout_s, self._remove)
                except ValueError:  # not registered (yet, or now): it holds nothing
                    self._remove(group.worker_id)
            self.counts[role] = n
        return {"added": added, "draining": draining, **self.counts}

    def _remove(self, worker_id: str) -> None:
        """Stop a drained worker for good and free its placement group."""
        ray = import_ray()
        from ray.util.placement_group import remove_placement_group

        with self._lock:
            group = self.groups.pop(worker_id, None)
        if group is None:
            return
        ray.kill(group.actor, no_restart=True)
        remove_placement_group(group.placement_group)
        log.info("worker %s removed from the Ray cluster", worker_id)

    def stop(self) -> None:
        """Stop the router (its workers get Shutdown), kill every actor, free placement groups."""
        if self._router_thread is not None:
            self._router_thread.stop(stop_workers=True)
            self._router_thread = None
        for worker_id in list(self.groups):
            try:
                self._remove(worker_id)
            except Exception:
                log.exception("removing worker %s", worker_id)
        if self._owns_ray:
            import_ray().shutdown()
            self._owns_ray = False


def _init_keeping_signal_handlers(ray, address: str) -> None:
    """``ray.init`` replaces this process's SIGTERM handler with one that exits with status 15
    after dumping a stack trace: keep ours (``pdserve serve`` stops its cluster on SIGTERM and
    exits 0)."""
    if threading.current_thread() is not threading.main_thread():
        ray.init(address=address, include_dashboard=False, log_to_driver=True)
        return
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    ray.init(address=address, include_dashboard=False, log_to_driver=True)
    for sig, handler in handlers.items():
        if handler is not None:
            signal.signal(sig, handler)
