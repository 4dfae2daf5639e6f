"""The router process: a frontend ROUTER socket for clients, a backend ROUTER socket for workers.

This module owns the sockets and turns messages into calls on the ``RequestScheduler``
(router/scheduler.py) and the ``WorkerRegistry`` (router/workers.py); the scheduler sends
through this class (it is the scheduler's ``Outbox``). Every inbound message is size-limited
(``zmq.MAXMSGSIZE``), unpacked with limits and type-checked (``protocol.decode``). A malformed
one is answered with an error when its request id can be read; when it cannot, every request the
same connection has in flight fails with a clear error (one of them may be the one it meant),
so no request is left waiting for an answer that will never come. torch-free.

Hooks for other modules (metrics, status): ``Router.supervision`` holds, per worker id, what the
local supervisor reports (``restarts``, ``gave_up``), and ``Router.num_restarts`` their total.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

import msgpack
import zmq

from router import protocol as P
from router.client_queue import BACKLOGGED, GONE, ClientSender
from router.config import RouterConfig
from router.liveness import DISCONNECTED
from router.model_info import ModelInfo
from router.payloads import HeartbeatStats
from router.request import Request
from router.scaling import Drainer, Scaler, check_counts
from router.scheduler import RequestScheduler
from router.status import router_status
from router.security import CurveKeys
from router.sockets import LoopSocket, prepare_ipc_endpoint
from router.watchdog import Watchdog
from router.workers import RegistrationError, WorkerRecord, WorkerRegistry

log = logging.getLogger("pdserve.router")

_chunk_packer = msgpack.Packer(use_bin_type=True)
_error_packer = msgpack.Packer(use_bin_type=True)


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
        self.drainer = Drainer(self)
        self.scaler: Scaler | None = None  # set by a launcher that can start workers
        self._ctx: zmq.Context | None = None
        self._auth = None
        self._frontend: LoopSocket | None = None
        self._backend: LoopSocket | None = None
        self._tick_task: asyncio.Task | None = None
        self._dead_pending: set[WorkerRecord] = set()
        self._stopping_workers = False  # Shutdowns sent: workers hanging up is expected
        self._behind_since: float | None = None  # since when worker messages wait unread at ticks
        self.clients: ClientSender | None = None
        # Written by the local supervisor (router/supervisor.py) on this loop: worker id ->
        # {"restarts": int, "gave_up": str | None}. Read by status() and metrics.
        self.supervision: dict[str, dict] = {}
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
        back = self._make_socket(keys, "backend", hwm=self.config.max_worker_backlog)
        endpoint = self.config.frontend
        try:
            front.bind(endpoint)
            endpoint = self.config.backend
            back.bind(endpoint)
        except zmq.ZMQError as exc:
            front.close(0)
            back.close(0)
            self._stop_auth()
            hint = ("another process holds it: stop that one or choose another endpoint"
                    if exc.errno == zmq.EADDRINUSE else "choose another endpoint")
            raise ValueError(f"cannot bind {endpoint}: {zmq.strerror(exc.errno)}; {hint}") from None
        self._frontend = LoopSocket(front, self._on_client, on_disconnect=self._on_client_gone)
        self.clients = ClientSender(self._frontend)
        self._backend = LoopSocket(back, self._on_worker, on_disconnect=self._on_worker_gone)
        self._tick_task = asyncio.get_running_loop().create_task(self._tick_loop())
        log.info("router listening for clients on %s and workers on %s", self.config.frontend,
                 self.config.backend)

    def _make_socket(self, keys: CurveKeys | None, domain: str, hwm: int) -> zmq.Socket:
        sock = self._ctx.socket(zmq.ROUTER)
        sock.linger = 0
        sock.router_mandatory = 1
        sock.sndhwm = hwm
        # Inbound bounds: past them zmq stops reading that peer (backpressure), never drops.
        sock.rcvhwm = 10_000 if domain == "frontend" else self.config.max_worker_backlog
        sock.set(zmq.MAXMSGSIZE, P.MAX_MESSAGE_BYTES)
        if keys is not None:
            keys.apply_server(sock, domain)
        return sock

    def stop_workers(self) -> None:
        """Answer live requests with ``unavailable`` and tell every live worker to shut down,
        keeping the sockets open: call ``close`` once the workers are gone. A worker's socket
        drops what it has not read yet when the connection closes, so a router that closes
        right after its Shutdowns can lose them, and the workers then wait for a signal."""
        if self._frontend is None:
            return
        self._stopping_workers = True
        for req in list(self.scheduler.requests.values()):
            self.scheduler.fail(req, P.ERR_UNAVAILABLE, "the router is shutting down")
        self.scheduler.close()
        for worker in self.registry.alive():
            self.to_worker(worker, P.Shutdown("the router is shutting down"))

    def close(self, stop_workers: bool = False) -> None:
        """Answer live requests with ``unavailable``, optionally tell workers to shut down,
        and close the sockets."""
        if self._frontend is None:
            return
        if stop_workers:
            self.stop_workers()
        else:
            for req in list(self.scheduler.requests.values()):
                self.scheduler.fail(req, P.ERR_UNAVAILABLE, "the router is shutting down")
            self.scheduler.close()
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
            self._judge_liveness(now)
            self.watchdog.tick(now)
            self.drainer.tick(now)
            self.clients.flush()

    def _judge_liveness(self, now: float) -> None:
        # While worker messages wait unread, silence or a frozen step count may be the router's
        # own backlog: judge once it has caught up (or has been behind for a whole heartbeat
        # timeout, so that a flood cannot hide a dead worker forever).
        if self._backend.has_input():
            self._behind_since = self._behind_since or now
            if now - self._behind_since < self.config.heartbeat_timeout_s:
                return
        self._behind_since = None
        for worker, rule, reason in self.registry.verdicts(now, self.config.heartbeat_timeout_s,
                                                           self.config.stuck_timeout_s):
            log.warning("worker %s (pid %s) %s: declared dead (%s)", worker.worker_id, worker.pid, reason, rule)
            self._worker_dead(worker, rule, reason)

    @property
    def num_restarts(self) -> int:
        """Worker restarts by the local supervisor, all workers together."""
        return sum(s.get("restarts", 0) for s in self.supervision.values())

    # -- clients ----------------------------------------------------------------------------
    def _on_client(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            return  # a client sends single-frame messages; anything else is not ours
        client, payload = frames
        try:
            msg = P.decode(payload, P.CLIENT_TO_ROUTER)
        except P.ProtocolError as exc:
            self._on_malformed(client, payload, exc)
            return
        if isinstance(msg, P.Generate):
            if self.clients.is_backlogged(client):
                self.scheduler.counters["rejected"] += 1
                self.error(client, msg.rid, P.ERR_OVERLOADED,
                           "this connection is not reading its replies (its backlog is full); "
                           "read the replies, then retry")
                return
            self.scheduler.submit(client, msg, offload=True)
        elif isinstance(msg, P.Cancel):
            self.scheduler.cancel(client, msg.rid)
        elif isinstance(msg, P.StatusRequest):
            self.clients.send(client, P.encode(P.StatusReply(msg.rid, self.status())), final=True)
        elif isinstance(msg, P.ScaleRequest):
            self._scale(client, msg)

    def _scale(self, client: bytes, msg: P.ScaleRequest) -> None:
        if self.scaler is None:
            self.error(client, msg.rid, P.ERR_INVALID, "this router cannot start or stop workers; "
                       "scale a cluster started with `pdserve serve` (without --router-process)")
            return
        try:
            check_counts(msg.num_prefill, msg.num_decode)
            result = self.scaler.scale(msg.num_prefill, msg.num_decode)
        except ValueError as exc:
            self.error(client, msg.rid, P.ERR_INVALID, str(exc))
            return
        except Exception as exc:  # the launcher's failure: answer rather than leave the client waiting
            log.exception("scaling to prefill=%s decode=%s failed", msg.num_prefill, msg.num_decode)
            self.error(client, msg.rid, P.ERR_INTERNAL, f"the launcher failed to scale the cluster: {exc!r}; "
                       "see the router's log, then check `pdserve status` and retry")
            return
        self.clients.send(client, P.encode(P.ScaleReply(msg.rid, result)), final=True)

    def _on_malformed(self, client: bytes, payload: bytes, exc: P.ProtocolError) -> None:
        why = (f"malformed request: {exc} (a message holds at most {P.MAX_MESSAGE_BYTES} bytes and a "
               f"list at most {P.UNPACK_LIMITS['max_array_len']} items)")
        rid = _rid_of(payload)
        mine = self.scheduler.by_client.get(client, {})
        if rid is not None and rid not in mine:
            self.error(client, rid, P.ERR_INVALID, why)
            return
        # It may concern any request of this connection: fail them all rather than leave the
        # one it meant waiting forever.
        for req in list(mine.values()) if rid is None else [mine[rid]]:
            self.scheduler.fail(req, P.ERR_INVALID, f"this connection sent a message the router could not "
                                                    f"parse, so its requests in flight were failed; {why}")

    def _on_client_gone(self, client: bytes) -> None:
        self.clients.forget(client)
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
        worker.last_seen = now = time.monotonic()
        sched = self.scheduler
        if isinstance(msg, P.Tokens):
            sched.on_tokens(worker, msg)
        elif isinstance(msg, P.Heartbeat):
            try:
                worker.stats = HeartbeatStats.from_wire(msg.stats)
            except P.ProtocolError as exc:
                log.warning("worker %s sent malformed heartbeat stats: %s", worker.worker_id, exc)
            else:
                worker.progress.observe(worker.stats, now)
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
        stale = self.registry.is_reregistration(identity, msg.info)
        if stale is not None:
            log.warning("worker %s registered again: it lost this router and dropped its requests, "
                        "which start over", stale.worker_id)
            self._worker_dead(stale, DISCONNECTED, "it lost the router and registered again")
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
            if self._stopping_workers:
                log.info("worker %s hung up after its Shutdown", worker.worker_id)
            else:
                log.warning("worker %s disconnected: declared dead", worker.worker_id)
            self._worker_dead(worker, DISCONNECTED, "its connection dropped")

    def _worker_dead(self, worker: WorkerRecord, rule: str, reason: str) -> None:
        if self.registry.mark_dead(worker, rule, reason):
            self.scheduler.on_worker_dead(worker)

    def declare_dead(self, worker: WorkerRecord, rule: str, reason: str) -> None:
        """Forget a worker and fail over what it holds (as when its connection drops)."""
        self._worker_dead(worker, rule, reason)

    # -- Outbox (used by the scheduler) -----------------------------------------------------
    def to_worker(self, worker: WorkerRecord, msg: P.Message) -> None:
        if self._backend is None:
            return
        if not self._backend.send([worker.identity, P.encode(msg)]) and worker.alive:
            # Its connection is gone, or it fell max_worker_backlog messages behind: dead
            # either way. Handle the death outside the scheduler's current call.
            if worker not in self._dead_pending:
                self._dead_pending.add(worker)
                asyncio.get_running_loop().call_soon(self._deferred_death, worker)

    def _deferred_death(self, worker: WorkerRecord) -> None:
        self._dead_pending.discard(worker)
        if worker.alive:
            log.warning("worker %s is unreachable or %d messages behind: declared dead",
                        worker.worker_id, self.config.max_worker_backlog)
            self._worker_dead(worker, "unreachable", "the router could not send to it")

    def chunk(self, req: Request, token_ids: list[int], text: str, finish_reason: str | None) -> bool:
        """Send a Chunk. False: the request must end now, already answered (the client is
        gone, or too far behind: then it got an ``overloaded`` error instead)."""
        local = self.local_clients.get(req.client)
        if local is not None:
            return local.chunk(req, token_ids, text, finish_reason)
        if self._frontend is None:
            return False
        # Same layout as protocol.encode(Chunk(...)), without building the dataclass.
        payload = _chunk_packer.pack([P.Chunk.TAG, req.client_rid, token_ids, text, finish_reason,
                                      req.num_prompt_tokens])
        result = self.clients.send(req.client, payload, final=finish_reason is not None)
        if result == BACKLOGGED:
            self.error(req.client, req.client_rid, P.ERR_OVERLOADED,
                       f"this connection fell {self.config.max_client_backlog} messages behind (it is not "
                       "reading its replies), so the stream was stopped; read faster or open fewer streams")
        return result not in (BACKLOGGED, GONE)

    def error(self, client: bytes, client_rid: str, code: str, message: str) -> None:
        local = self.local_clients.get(client)
        if local is not None:
            local.error(client_rid, code, message)
        elif self._frontend is not None:
            self.clients.send(client, _error_packer.pack([P.Error.TAG, client_rid, code, message]), final=True)

    # -- status -----------------------------------------------------------------------------
    def status(self) -> dict:
        """What ``pdserve status`` and ``Client.status()`` show (router/status.py)."""
        return router_status(self)


def _rid_of(payload: bytes) -> str | None:
    """The request id of a malformed client message, if it can be read at all. Only the head
    ``[tag, rid, ...`` is read, so a message whose later fields break the limits (a prompt of
    ten million token ids) still gets its error reply."""
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=P.MAX_MESSAGE_BYTES, **P.UNPACK_LIMITS)
    try:
        unpacker.feed(payload)
        if unpacker.read_array_header() < 2:
            return None
        unpacker.skip()
        rid = unpacker.unpack()
    except Exception:  # msgpack raises several types for malformed input
        return None
    if isinstance(rid, str) and 0 < len(rid) <= 256:
        return rid
    return None
