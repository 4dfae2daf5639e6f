"""Starts a whole local cluster: the router and its worker processes, and stops it cleanly.

    with LocalCluster("demo", mode="disagg", num_prefill=1, num_decode=1) as cluster:
        client = Client(cluster.endpoint)

``model`` is anything ``--model`` takes (None: the default model); it is resolved once
(``models.registry.resolve_model``: fetched and converted if need be) before any process starts.

The router runs in this process (a background thread) or as a ``pdserve router`` subprocess;
each worker is a ``pdserve worker`` subprocess in its own process group (its TP ranks share
the group), started with every endpoint under a per-run temporary directory. ``start()``
returns once every worker has registered. ``stop()``: the router tells the workers to shut
down, then stragglers get SIGTERM, then SIGKILL after a grace period; the directory is removed.
Workers die with the launching process even if it is killed (PR_SET_PDEATHSIG).

``supervise=True`` (``pdserve serve`` without ``--no-restart``) adds a ``Supervisor``
(router/supervisor.py) once every worker has registered: it restarts workers that die and kills
those the router declares stuck.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from router.config import RouterConfig
from router.scaling import check_count
from router.security import check_bind
from router.supervisor import Supervisor, SupervisorConfig

log = logging.getLogger("pdserve.launcher")
PARENT_ENV = "PDSERVE_PARENT_PID"
THREADS_ENV = "PDSERVE_NUM_THREADS"


def threads_per_rank(num_ranks: int, num_cores: int | None = None) -> int:
    """Matmul threads for each of ``num_ranks`` worker processes on this host.

    One core is left to the router and the clients: oversubscribed cores stall the model's
    thread barriers far more than one idle core costs.
    """
    num_cores = num_cores or os.cpu_count() or 1
    return max(1, (num_cores - 1) // max(1, num_ranks)) if num_cores > 1 else 1
_ROUTER_FLAGS = {"max_queue": "--max-queue", "heartbeat_timeout_s": "--heartbeat-timeout",
                 "stuck_timeout_s": "--stuck-timeout",
                 "unavailable_timeout_s": "--unavailable-timeout", "handoff_timeout_s": "--handoff-timeout",
                 "prefill_stall_timeout_s": "--prefill-stall-timeout"}


@dataclass
class WorkerProcess:
    worker_id: str
    role: str
    proc: subprocess.Popen
    log_path: Path | None
    tail: deque = field(default_factory=lambda: deque(maxlen=40))  # last lines, when not in a file

    def log_tail(self, num_lines: int = 15) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "\n".join(list(self.tail)[-num_lines:]) or "(its output went to stderr)"
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-num_lines:])


class ClusterError(RuntimeError):
    """The cluster could not start; the message includes the failing worker's last output."""


class LocalCluster:
    """A router and its workers on this machine. See the module docstring."""

    def __init__(self, model: str | None = None, *, mode: str = "disagg", num_prefill: int = 1,
                 num_decode: int = 1, num_workers: int = 1, tp: int = 1, kv_transport: str = "auto",
                 dtype: str = "auto", device: str = "cpu", max_model_len: int | None = None,
                 block_size: int = 16, num_kv_blocks: int | None = None, kv_memory: int | None = None,
                 max_num_seqs: int | None = None, max_num_batched_tokens: int | None = None,
                 enforce_eager: bool | None = None, listen: str | None = None, curve_dir: str | None = None,
                 router_in_process: bool = True, router_options: dict | None = None,
                 log_to_stderr: bool = False,
                 startup_timeout_s: float = 300.0, grace_s: float = 10.0,
                 worker_args: tuple[str, ...] = (), env: dict | None = None, http=None,
                 supervise: bool = False, supervisor_config: SupervisorConfig | None = None,
                 drain_timeout_s: float = 60.0):
        if mode not in ("disagg", "colocated"):
            raise ValueError(f"--mode must be disagg or colocated, got {mode!r}")
        counts = {"--prefill": num_prefill, "--decode": num_decode} if mode == "disagg" \
            else {"--workers": num_workers}
        for flag, n in counts.items():
            check_count(flag, n)  # before building a list of that many roles
        if not isinstance(drain_timeout_s, (int, float)) or not drain_timeout_s > 0:
            raise ValueError(f"--drain-timeout must be a positive number of seconds, got {drain_timeout_s!r}")
        if listen is not None:
            check_bind(listen, curve_dir, "--listen")
        self.mode = mode
        self.roles = (["prefill"] * num_prefill + ["decode"] * num_decode if mode == "disagg"
                      else ["both"] * num_workers)
        self.engine = {"model": model, "tp": tp, "dtype": dtype, "device": device,
                       "max_model_len": max_model_len, "block_size": block_size,
                       "num_kv_blocks": num_kv_blocks, "kv_memory": kv_memory,
                       "kv_transport": kv_transport, "max_num_seqs": max_num_seqs,
                       "max_num_batched_tokens": max_num_batched_tokens, "curve_dir": curve_dir,
                       "enforce_eager": enforce_eager}
        self.listen = listen
        self.curve_dir = curve_dir
        self.router_in_process = router_in_process
        # RouterConfig fields: max_queue, heartbeat_timeout_s, unavailable_timeout_s, ...
        self.router_options = dict(router_options or {})
        self.http = http  # router.http.config.HttpConfig, or None: no HTTP
        self.http_url: str | None = None
        unknown = set(self.router_options) - set(RouterConfig.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown router options {sorted(unknown)}")
        self.log_to_stderr = log_to_stderr
        self.startup_timeout_s = startup_timeout_s
        self.grace_s = grace_s
        self.worker_args = tuple(worker_args)
        self.env = env
        self.run_dir: Path | None = None
        self.endpoint = ""
        self.backend = ""
        self.workers: list[WorkerProcess] = []
        self._workers_lock = threading.Lock()  # the supervisor restarts workers from its thread
        self._extra_args: dict[str, tuple[str, ...]] = {}
        self._router_thread = None
        self._router_proc: subprocess.Popen | None = None
        self._status_client = None
        self.supervise = supervise
        self.supervisor_config = supervisor_config
        self.supervisor: Supervisor | None = None
        self.drain_timeout_s = drain_timeout_s
        self.retired: list[WorkerProcess] = []  # removed by a scale-down (router/local_scaling.py)

    # -- lifecycle ----------------------------------------------------------------------------
    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "LocalCluster":
        """Start the router and every worker; return once all have registered.
        Raises ValueError (bad options) or ClusterError (a process failed to start)."""
        from models.registry import resolve_model

        # Fetch and convert once, here, rather than in every worker at the same time.
        self.engine["model"] = str(resolve_model(self.engine["model"]))
        self.run_dir = Path(tempfile.mkdtemp(prefix="pdserve-"))
        try:
            self.endpoint = self.listen or f"ipc://{self.run_dir}/client.ipc"
            self.backend = f"ipc://{self.run_dir}/workers.ipc"
            self._start_router()
            for i, role in enumerate(self.roles):
                self.start_worker(role, f"{role}-{sum(r == role for r in self.roles[:i])}")
            self.wait_for_workers(len(self.roles), self.startup_timeout_s)
            if self._router_thread is not None:  # a router subprocess cannot call back into us
                from router.local_scaling import LocalScaler
                scaler = LocalScaler(self, self._router_thread, self.drain_timeout_s)
                self._router_thread.call(setattr, self._router_thread.router, "scaler", scaler)
            if self.supervise:
                self.supervisor = Supervisor(self, self.supervisor_config, self._publish_supervision).start()
        except BaseException:
            self.stop()
            raise
        return self

    def _publish_supervision(self, snapshot: dict) -> None:
        if self._router_thread is not None:
            self._router_thread.post(lambda router: router.supervision.update(snapshot))

    def worker_processes(self) -> list[WorkerProcess]:
        """The current process of every worker (a copy; safe from any thread)."""
        with self._workers_lock:
            return list(self.workers)

    def router_status(self) -> dict | None:
        """The router's status dict, or None if it does not answer now."""
        try:
            if self._router_thread is not None:
                return self._router_thread.call(lambda r: r.status(), self._router_thread.router)
            if self._router_proc is None:
                return None
            if self._status_client is None:
                from router.client import Client
                self._status_client = Client(self.endpoint, timeout=5)
            return self._status_client.status()
        except Exception as exc:  # not started yet, restarting, or gone
            log.debug("router status not available: %s", exc)
            if self._status_client is not None:
                self._status_client.close()
                self._status_client = None
            return None

    def _start_router(self) -> None:
        model_dir = self.engine["model"]
        if self.router_in_process:
            from router.runtime import RouterThread
            config = RouterConfig(frontend=self.endpoint, backend=self.backend, model_dir=model_dir,
                                  curve_dir=self.curve_dir, kv_transport=self.engine["kv_transport"],
                                  **self.router_options)
            self._router_thread = RouterThread(config, http=self.http).start()
            self.http_url = self._router_thread.router.http_url
            return
        argv = [sys.executable, "-m", "router.cli", "router", "--listen", self.endpoint,
                "--backend", self.backend, "--kv-transport", self.engine["kv_transport"],
                "--shutdown-workers"]
        for name, value in self.router_options.items():
            flag = _ROUTER_FLAGS.get(name)
            if flag is None:
                raise ValueError(f"router option {name} cannot be given to a router subprocess")
            argv += [flag, str(value)]
        if model_dir:
            argv += ["--model", str(model_dir)]
        if self.curve_dir:
            argv += ["--curve-dir", self.curve_dir]
        from router.http.config import http_argv
        self._router_proc = self._spawn(argv + http_argv(self.http), "router")

    def start_worker(self, role: str, worker_id: str, extra_args: tuple[str, ...] | None = None) -> WorkerProcess:
        """Spawn one ``pdserve worker`` (also used to restart a killed one). ``extra_args``
        follow the cluster's own options (so they override them) and are remembered for
        restarts of this worker id."""
        if any(w.worker_id == worker_id for w in self.retired):
            raise ValueError(f"worker {worker_id} was removed by a scale-down")
        if extra_args is not None:
            self._extra_args[worker_id] = tuple(extra_args)
        argv = [sys.executable, "-m", "router.cli", "worker", "--role", role, "--router", self.backend,
                "--worker-id", worker_id, "--kv-dir", str(self.run_dir)]
        for name, value in self.engine.items():
            if isinstance(value, bool):  # a flag
                argv += [f"--{name.replace('_', '-')}"] if value else []
            elif value is not None:
                argv += [f"--{name.replace('_', '-')}", str(value)]
        return self._add_worker(role, worker_id, argv + list(self.worker_args)
                                + list(self._extra_args.get(worker_id, ())))

    def retire_worker(self, worker_id: str) -> WorkerProcess | None:
        """Take a drained worker off the list (nothing restarts it); ``stop()`` still stops it."""
        with self._workers_lock:
            worker = next((w for w in self.workers if w.worker_id == worker_id), None)
            self.workers = [w for w in self.workers if w.worker_id != worker_id]
            if worker is not None:
                self.retired.append(worker)
        return worker

    def _add_worker(self, role: str, worker_id: str, argv: list[str]) -> WorkerProcess:
        log_path = None if self.log_to_stderr else self.run_dir / f"{worker_id}.log"
        worker = WorkerProcess(worker_id, role, None, log_path)  # type: ignore[arg-type]
        worker.proc = self._spawn(argv, worker_id, worker.tail)
        with self._workers_lock:
            self.workers = [w for w in self.workers if w.worker_id != worker_id] + [worker]
        return worker

    def _spawn(self, argv: list[str], name: str, tail: deque | None = None) -> subprocess.Popen:
        env = {THREADS_ENV: str(threads_per_rank(len(self.roles) * self.engine["tp"])),
               **os.environ, **(self.env or {}), PARENT_ENV: str(os.getpid())}
        if name == "router" and self.http is not None and self.http.api_key:
            env["PDSERVE_API_KEY"] = self.http.api_key  # not on the command line, where ps shows it
        out = subprocess.PIPE if self.log_to_stderr else open(self.run_dir / f"{name}.log", "ab")
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env=env, start_new_session=True)
        finally:
            if out is not subprocess.PIPE:
                out.close()
        if out is subprocess.PIPE:
            # Copy its output to our stderr, keeping the last lines (why it failed, if it does).
            threading.Thread(target=_pump, args=(proc.stdout, tail if tail is not None else deque(maxlen=1)),
                             name=f"pdserve-log-{name}", daemon=True).start()
        return proc

    def num_registered(self) -> int:
        """Workers the router currently has registered and alive."""
        if self._router_thread is not None:
            return self._router_thread.call(lambda r: len(r.registry.alive()), self._router_thread.router)
        return self._status()["router"]["num_workers"]

    def _status(self) -> dict:
        from router.client import Client
        with Client(self.endpoint, timeout=5, curve=self.curve_dir) as client:
            return client.status()

    def wait_for_workers(self, count: int, timeout_s: float) -> None:
        """Block until ``count`` workers are registered. Raises ClusterError if a process exits."""
        deadline = time.monotonic() + timeout_s
        while True:
            for worker in self.workers:
                if worker.proc.poll() is not None:
                    raise ClusterError(f"worker {worker.worker_id} exited with code {worker.proc.returncode} "
                                       f"before registering; its last output:\n{worker.log_tail()}")
            if self._router_proc is not None and self._router_proc.poll() is not None:
                raise ClusterError(f"the router exited with code {self._router_proc.returncode}; "
                                   f"see {self.run_dir}/router.log")
            try:
                if self.num_registered() >= count:
                    if self.http is not None and self.http_url is None:
                        self.http_url = self._status()["router"].get("http")
                    return
            except Exception as exc:  # the router subprocess may not be listening yet
                log.debug("status not available yet: %s", exc)
            if time.monotonic() > deadline:
                raise ClusterError(f"only {self.num_registered()} of {count} workers registered within "
                                   f"{timeout_s:g}s; worker logs are in {self.run_dir}")
            time.sleep(0.1)

    @property
    def router_pid(self) -> int:
        """The router's process id (this process when the router runs in a thread)."""
        return self._router_proc.pid if self._router_proc is not None else os.getpid()

    def kill_router(self, sig: int = signal.SIGKILL) -> None:
        """Kill a subprocess router (fault injection); ``start_router()`` brings one back."""
        if self._router_proc is None:
            raise ValueError("only a router started with router_in_process=False can be killed")
        _signal_group(self._router_proc, sig)
        self._router_proc.wait()

    def start_router(self) -> None:
        """Start the router again on the same endpoints (after ``kill_router``)."""
        if self._router_proc is not None and self._router_proc.poll() is None:
            raise ValueError("the router is still running")
        self._start_router()

    def kill_worker(self, worker_id: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to a worker's whole process group (fault-injection in tests); wait for
        it to exit unless ``sig`` only stops or continues it."""
        for worker in self.worker_processes():
            if worker.worker_id == worker_id:
                _signal_group(worker.proc, sig)
                if sig not in (signal.SIGSTOP, signal.SIGCONT, signal.SIGTSTP):
                    worker.proc.wait()
                return
        raise ValueError(f"no worker {worker_id!r}; have {[w.worker_id for w in self.workers]}")

    def stop(self) -> None:
        """Stop everything (idempotent): Shutdown, then SIGTERM, then SIGKILL; remove the run dir."""
        if self.supervisor is not None:
            self.supervisor.stop()  # first: nothing is restarted while the cluster stops
        if self._status_client is not None:
            self._status_client.close()
            self._status_client = None
        workers = [w.proc for w in self.worker_processes() + self.retired]
        if self._router_thread is not None:
            # The sockets stay open until the workers have read their Shutdown and exited: zmq
            # drops unread messages of a dropped connection.
            try:
                self._router_thread.call(self._router_thread.router.stop_workers)
            except Exception:
                log.exception("telling the workers to shut down")
            _wait_all(workers, min(self.grace_s, 2.0))
            self._router_thread.stop(stop_workers=True)
            self._router_thread = None
        elif self._router_proc is not None:
            _signal_group(self._router_proc, signal.SIGTERM)
            _wait_all(workers + [self._router_proc], min(self.grace_s, 2.0))
        procs = workers + ([self._router_proc] if self._router_proc else [])
        # A worker still running after its Shutdown takes SIGTERM as the same clean stop.
        for proc in procs:
            _signal_group(proc, signal.SIGTERM)
        _wait_all(procs, self.grace_s)
        for proc in procs:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
        self._router_proc = None
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.run_dir = None


def _pump(pipe, tail: deque) -> None:
    for line in iter(pipe.readline, b""):
        try:
            sys.stderr.buffer.write(line)
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        tail.append(line.decode(errors="replace").rstrip())
    pipe.close()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Signal the process group a child leads (it was started in its own session)."""
    if proc.poll() is not None and sig != signal.SIGKILL:
        return
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_all(procs: list[subprocess.Popen], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
