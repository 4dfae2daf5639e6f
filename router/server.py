"""The router process: a frontend ROUTER socket for clients, a backend ROUTER socket for workers.

This module owns the sockets and turns messages into calls on the ``RequestScheduler``
(router/scheduler.py) and the ``WorkerRegistry`` (router/workers.py); the scheduler sends
through this class (it is the scheduler's ``Outbox``). Every inbound message is size-limited
(``zmq.MAXMSGSIZE``), unpacked with limits and type-checked (``protocol.decode``); a malformed
one is answered with an error when its request id can be read, else dropped. torch-free.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import Protocol

import msgpack
import zmq

from router import protocol as P
from router.config import RouterConfig
from router.model_info import ModelInfo
from router.payloads import HeartbeatStats
from router.request import Request
from router.scheduler import RequestScheduler
from router.security import CurveKeys
from router.sockets import LoopSocket
from router.watchdog import Watchdog
from router.workers import RegistrationError, WorkerRecord, WorkerRegistry

log = logging.getLogger("pdserve.router")

_chunk_packer = msgpack.Packer(use_bin_type=True)
_error_packer = msgpack.Packer(use_bin_type=True)


def prepare_ipc_endpoint(endpoint: str) -> None:
    """Create an ipc endpoint's directory; refuse a path another process is listening on
    (binding would silently take it over)."""
    if not endpoint.startswith("ipc://"):
        return
    path = endpoint[len("ipc://"):]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return  # a stale socket file: binding replaces it
    finally:
        probe.close()
    raise ValueError(f"another process is listening on {endpoint}; stop it or choose another endpoint")


class LocalClient(Protocol):
    """A client inside the router process (the HTTP gateway): the scheduler's output for its
    requests, as the frontend socket would have carried it."""

    def chunk(self, req: Request, token_ids: list[int], text: str, finish_reason: str | None) -> bool: ...

    def error(self, client_rid: str, code: str, message: str) -> None: ...


class Router:
    """Serves clients and workers on the running event loop until ``close()``."""

    def __init__(self, config: RouterConfig, model: ModelInfo | None = None):
        self.config = config
        if model is None and config.model_dir is not None:
            model = ModelInfo.from_dir(config.model_dir)
        self.registry = WorkerRegistry(model.fingerprint if model else None, config.kv_transport)
        self.scheduler = RequestScheduler(config, self.registry, self, model)
        self.started_at = time.monotonic()
        self.watchdog = Watchdog(self.scheduler, self.started_at)
        self._ctx: zmq.Context | None = None
        self._auth = None
        self._frontend: LoopSocket | None = None
        self._backend: LoopSocket | None = None
        self._tick_task: asyncio.Task | None = None
        self._dead_pending: set[WorkerRecord] = set()
        # In-process clients (the HTTP gateway), by client id: their chunks and errors are
        # handed over directly instead of sent on the frontend socket.
        self.local_clients: dict[bytes, LocalClient] = {}
        self.http_url: str | None = None  # set by the HTTP gateway once it listens

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        """Bind both sockets (call from the loop that will serve them). Raises ValueError."""
        for endpoint in (self.config.frontend, self.config.backend):
            prepare_ipc_endpoint(endpoint)
        self._ctx = zmq.Context()
        keys = CurveKeys.for_router(self.config.curve_dir) if self.config.curve_dir else None
        if keys is not None:
            self._auth = keys.start_authenticator(self._ctx)
        front = self._make_socket(keys, "frontend", hwm=self.config.max_client_backlog)
        back = self._make_socket(keys, "backend", hwm=0)
        try:
            front.bind(self.config.frontend)
            back.bind(self.config.backend)
        except zmq.ZMQError as exc:
            front.close(0)
            back.close(0)
            self._stop_auth()
            raise ValueError(f"cannot bind {self.config.frontend} / {self.config.backend}: {exc}") from None
        self._frontend = LoopSocket(front, self._on_client, on_disconnect=self._on_client_gone)
        self._backend = LoopSocket(back, self._on_worker, on_disconnect=self._on_worker_gone)
        self._tick_task = asyncio.get_running_loop().create_task(self._tick_loop())
        log.info("router listening for clients on %s and workers on %s", self.config.frontend,
                 self.config.backend)

    def _make_socket(self, keys: CurveKeys | None, domain: str, hwm: int) -> zmq.Socket:
        sock = self._ctx.socket(zmq.ROUTER)
        sock.linger = 0
        sock.router_mandatory = 1
        sock.sndhwm = hwm
        sock.rcvhwm = 10_000 if domain == "frontend" else 0
        sock.set(zmq.MAXMSGSIZE, P.MAX_MESSAGE_BYTES)
        if keys is not None:
            keys.apply_server(sock, domain)
        return sock

    def close(self, stop_workers: bool = False) -> None:
        """Answer live requests with ``unavailable``, optionally tell workers to shut down,
        and close the sockets."""
        if self._frontend is None:
            return
        for req in list(self.scheduler.requests.values()):
            self.scheduler.fail(req, P.ERR_UNAVAILABLE, "the router is shutting down")
        if stop_workers:
            for worker in self.registry.alive():
                self.to_worker(worker, P.Shutdown("the router is shutting down"))
        if self._tick_task is not None:
            self._tick_task.cancel()
        # Let the last errors and Shutdowns reach their peers before the sockets go.
        self._frontend.close(linger_ms=500)
        self._backend.close(linger_ms=500 if stop_workers else 0)
        self._frontend = self._backend = None
        self._stop_auth()
        self._ctx.term()

    def _stop_auth(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.tick_s)
            now = time.monotonic()
            for worker in self.registry.expired(now, self.config.heartbeat_timeout_s):
                log.warning("worker %s sent nothing for %.1fs: declared dead", worker.worker_id,
                            now - worker.last_seen)
                self._worker_dead(worker)
            self.watchdog.tick(now)

    # -- clients ----------------------------------------------------------------------------
    def _on_client(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            return  # a client sends single-frame messages; anything else is not ours
        client, payload = frames
        try:
            msg = P.decode(payload, P.CLIENT_TO_ROUTER)
        except P.ProtocolError as exc:
            rid = _rid_of(payload)
            if rid is not None:
                self.error(client, rid, P.ERR_INVALID, f"malformed request: {exc}")
            return
        if isinstance(msg, P.Generate):
            self.scheduler.submit(client, msg)
        elif isinstance(msg, P.Cancel):
            self.scheduler.cancel(client, msg.rid)
        elif isinstance(msg, P.StatusRequest):
            self._frontend.send([client, P.encode(P.StatusReply(msg.rid, self.status()))])

    def _on_client_gone(self, client: bytes) -> None:
        self.scheduler.client_gone(client)

    # -- workers ----------------------------------------------------------------------------
    def _on_worker(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            return
        identity, payload = frames
        try:
            msg = P.decode(payload, P.WORKER_TO_ROUTER)
        except P.ProtocolError as exc:
            log.warning("dropping a malformed worker message: %s", exc)
            return
        if isinstance(msg, P.Register):
            self._register(identity, msg)
            return
        worker = self.registry.by_identity.get(identity)
        if worker is None:
            if isinstance(msg, P.Heartbeat):  # a worker this router does not know: re-register
                self._backend.send([identity, P.encode(P.HeartbeatAck(msg.worker_id, False))])
            return
        worker.last_seen = time.monotonic()
        sched = self.scheduler
        if isinstance(msg, P.Tokens):
            sched.on_tokens(worker, msg)
        elif isinstance(msg, P.Heartbeat):
            try:
                worker.stats = HeartbeatStats.from_wire(msg.stats)
            except P.ProtocolError as exc:
                log.warning("worker %s sent malformed heartbeat stats: %s", worker.worker_id, exc)
            self._backend.send([identity, P.encode(P.HeartbeatAck(worker.worker_id, True))])
            sched.on_capacity(worker)
        elif isinstance(msg, P.Allocated):
            sched.on_allocated(worker, msg)
        elif isinstance(msg, P.FirstToken):
            sched.on_first_token(worker, msg)
        elif isinstance(msg, P.Started):
            sched.on_started(worker, msg)
        elif isinstance(msg, P.WorkerError):
            sched.on_worker_error(worker, msg)

    def _register(self, identity: bytes, msg: P.Register) -> None:
        try:
            worker = self.registry.register(identity, msg.worker_id, msg.info, time.monotonic())
        except RegistrationError as exc:
            log.warning("refused worker %s: %s", msg.worker_id, exc)
            self._backend.send([identity, P.encode(P.Registered(msg.worker_id, str(exc)))])
            return
        if self.scheduler.model is None:
            self.scheduler.model = ModelInfo.from_worker(msg.info)
        config = {"heartbeat_timeout_s": self.config.heartbeat_timeout_s}
        self._backend.send([identity, P.encode(P.Registered(msg.worker_id, None, config))])
        log.info("worker %s registered: role %s, TP %d, %d KV blocks, transports %s",
                 worker.worker_id, worker.role, worker.tp_size, worker.num_blocks,
                 list(worker.transports))
        self.scheduler.on_capacity(worker)

    def _on_worker_gone(self, identity: bytes) -> None:
        worker = self.registry.by_identity.get(identity)
        if worker is not None:
            log.warning("worker %s disconnected: declared dead", worker.worker_id)
            self._worker_dead(worker)

    def _worker_dead(self, worker: WorkerRecord) -> None:
        if self.registry.mark_dead(worker):
            self.scheduler.on_worker_dead(worker)

    # -- Outbox (used by the scheduler) -----------------------------------------------------
    def to_worker(self, worker: WorkerRecord, msg: P.Message) -> None:
        if self._backend is None:
            return
        if not self._backend.send([worker.identity, P.encode(msg)]) and worker.alive:
            # Its connection is gone; handle the death outside the scheduler's current call.
            if worker not in self._dead_pending:
                self._dead_pending.add(worker)
                asyncio.get_running_loop().call_soon(self._deferred_death, worker)

    def _deferred_death(self, worker: WorkerRecord) -> None:
        self._dead_pending.discard(worker)
        if worker.alive:
            log.warning("worker %s is unreachable: declared dead", worker.worker_id)
            self._worker_dead(worker)

    def chunk(self, req: Request, token_ids: list[int], text: str, finish_reason: str | None) -> bool:
        local = self.local_clients.get(req.client)
        if local is not None:
            return local.chunk(req, token_ids, text, finish_reason)
        if self._frontend is None:
            return False
        # Same layout as protocol.encode(Chunk(...)), without building the dataclass.
        payload = _chunk_packer.pack([P.Chunk.TAG, req.client_rid, token_ids, text, finish_reason,
                                      req.num_prompt_tokens])
        return self._frontend.send([req.client, payload])

    def error(self, client: bytes, client_rid: str, code: str, message: str) -> None:
        local = self.local_clients.get(client)
        if local is not None:
            local.error(client_rid, code, message)
        elif self._frontend is not None:
            self._frontend.send([client, _error_packer.pack([P.Error.TAG, client_rid, code, message])])

    # -- status -----------------------------------------------------------------------------
    def status(self) -> dict:
        model = self.scheduler.model
        workers = []
        for w in sorted(self.registry.by_id.values(), key=lambda w: (not w.alive, w.role, w.worker_id)):
            stats = w.stats or HeartbeatStats()
            num_blocks = w.num_blocks if stats.num_blocks is None else stats.num_blocks
            free = num_blocks if stats.free_blocks is None else stats.free_blocks
            workers.append({
                "id": w.worker_id, "role": w.role, "tp": w.tp_size, "alive": w.alive,
                "transports": list(w.transports), "num_blocks": num_blocks, "free_blocks": free,
                "kv_usage": round(1 - free / num_blocks, 4) if num_blocks else 0.0,
                "running": stats.running, "queued": stats.waiting + stats.reserved,
                "assigned": w.num_decoding + w.num_prefilling,
                "num_prefilled": w.num_prefilled, "num_decoded": w.num_decoded,
                "pid": w.info.get("pid"), "host": w.info.get("host"),
                "stats": w.stats.to_wire() if w.stats is not None else {},
            })
        return {"router": {"uptime_s": round(time.monotonic() - self.started_at, 3),
                           "model": model.name if model else None,
                           "fingerprint": self.registry.fingerprint,
                           "kv_spec": self.registry.kv_spec.to_dict() if self.registry.kv_spec else None,
                           "num_workers": len(self.registry.alive()), "http": self.http_url,
                           **self.scheduler.stats()},
                "workers": workers}


def _rid_of(payload: bytes) -> str | None:
    """The request id of a malformed client message, if it can be read at all."""
    try:
        obj = msgpack.unpackb(payload, raw=False, **P.UNPACK_LIMITS)
    except Exception:
        return None
    if isinstance(obj, list) and len(obj) >= 2 and isinstance(obj[1], str) and 0 < len(obj[1]) <= 256:
        return obj[1]
    return None
