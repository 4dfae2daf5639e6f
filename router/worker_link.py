"""A worker's connection to the router (the worker side of the backend protocol).

Used by rank 0 of every prefill / decode / colocated worker::

    link = WorkerLink(router_endpoint, worker_id, info, stats=worker.stats,
                      on_router_lost=worker.on_router_lost, heartbeat_s=0.5, curve_dir=None)
    config = await link.connect()   # Register -> Registered; raises RegistrationRefused
    while True:
        msg = await link.recv()       # Allocate, Prefill, Free, PeerDead or Shutdown
        ...
        link.send(protocol.Allocated(...))   # never blocks
    await link.close()

``info`` is the Register payload (see ``protocol.Register``); ``stats()`` is called every
heartbeat and its dict sent in ``Heartbeat`` (keys in ``protocol.Heartbeat``).

Router loss: the router answers every heartbeat. When no answer comes for ``router_timeout_s``
(the router died) or an answer says the router does not know this worker (it restarted, or it
declared the worker dead), the link calls ``on_router_lost()`` once (the worker must abort every
request and free all its KV), discards undelivered messages both ways, and registers again
until a router accepts it; ``recv()`` then carries on with the new router's messages. A router
that refuses the re-registration makes ``recv()`` raise ``RegistrationRefused``.

Bound: the messages waiting for ``recv()`` need no limit of their own. The router sends a worker
a few messages per request it places there, the requests it places are bounded (its queue bound
and the decode workers' KV), and a worker whose socket falls ``max_worker_backlog`` messages
behind is declared dead by the router.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import time
from typing import Any, Callable

import zmq
from zmq.utils.monitor import parse_monitor_message

from router import protocol as P
from router.security import CurveKeys, check_endpoint
from router.sockets import AUTH_FAILED, HANDSHAKE_FAILED, SILENT_REFUSALS, HandshakeWatch, LoopSocket

log = logging.getLogger("pdserve.worker_link")


class RegistrationRefused(ValueError):
    """The router refused this worker (model or KV spec mismatch, duplicate id...)."""


def refusal_text(reason: bytes) -> str:
    """Why the router's socket refused this worker's handshake, and what to do."""
    fix = ("start the worker with the --curve-dir made by `pdserve keys`, whose worker key is in "
           "the router's workers/ directory, or without one if the router has none")
    if reason == AUTH_FAILED:
        return f"CurveZMQ authentication failed; {fix}"
    return (f"it closed {SILENT_REFUSALS} connections in a row during the ZeroMQ handshake: either "
            f"CurveZMQ authentication failed ({fix}) or --router names something that is not "
            "a pdserve router's worker endpoint")


def check_admission(endpoint: str, curve_dir: str | None, within_s: float = 3.0) -> None:
    """Before a worker spends seconds or minutes loading its model: raise RegistrationRefused
    if a router listens at ``endpoint`` and refuses this worker's handshake. Returns when the
    handshake succeeds, when nothing listens there yet (registration waits for a router
    later), or after ``within_s`` without an answer."""
    check_endpoint(endpoint, "--router")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    if curve_dir:
        CurveKeys.for_peer(curve_dir, "worker").apply_client(sock)
    monitor = sock.get_monitor_socket()  # watching before the connection starts
    sock.connect(endpoint)
    watch, connected = HandshakeWatch(), False
    deadline = time.monotonic() + within_s
    try:
        while (left := deadline - time.monotonic()) > 0 and monitor.poll(left * 1000):
            event = parse_monitor_message(monitor.recv_multipart())
            kind = event["event"]
            connected |= kind == zmq.EVENT_CONNECTED
            if kind == zmq.EVENT_CONNECT_RETRIED and not connected:
                return  # nothing listens at the endpoint yet
            watch.event(kind, event["value"])
            if watch.refused is not None:
                raise RegistrationRefused(f"router {endpoint} refused this worker: {refusal_text(watch.refused)}")
            if watch.up:
                return
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)
        ctx.term()


class RouterUnreachable(ValueError):
    """No router answered the registration in time."""


class WorkerLink:
    """Connects a DEALER socket to the router's backend endpoint. Use from one event loop."""

    def __init__(self, endpoint: str, worker_id: str, info: dict, *,
                 stats: Callable[[], dict], on_router_lost: Callable[[], Any] | None = None,
                 heartbeat_s: float = 0.5, router_timeout_s: float | None = None,
                 register_timeout_s: float = 60.0, curve_dir: str | None = None,
                 context: zmq.Context | None = None):
        check_endpoint(endpoint, "--router")
        if not heartbeat_s > 0:
            raise ValueError(f"heartbeat interval must be positive, got {heartbeat_s}")
        self.endpoint = endpoint
        self.worker_id = worker_id
        self.info = info
        self.stats = stats
        self.on_router_lost = on_router_lost
        self.heartbeat_s = heartbeat_s
        self.router_timeout_s = router_timeout_s or max(3.0, 6 * heartbeat_s)
        self.register_timeout_s = register_timeout_s
        self.config: dict = {}
        self._curve = CurveKeys.for_peer(curve_dir, "worker") if curve_dir else None
        self._ctx = context or zmq.Context.instance()
        self._sock: LoopSocket | None = None
        self._inbox: asyncio.Queue[P.Message] = asyncio.Queue()
        self._registered = False
        self._registered_event: asyncio.Event | None = None
        self._refused: str | None = None
        self._last_ack = 0.0
        self._last_register = 0.0
        # Counts the routers this worker lost. Register carries it, so a router that stalled
        # past this worker's router timeout tells a re-registration (this worker dropped every
        # request) from a repeated Register.
        self._num_router_losses = 0
        self._heartbeat_task: asyncio.Task | None = None
        self._lost_tasks: set[asyncio.Task] = set()

    @property
    def registered(self) -> bool:
        """True while a router has accepted this worker and answers its heartbeats."""
        return self._registered

    async def connect(self) -> dict:
        """Register and wait for the answer. Returns the router's config dict.

        Raises RegistrationRefused (with the router's reason) or RouterUnreachable.
        """
        sock = self._ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.immediate = 1     # while disconnected, messages wait in LoopSocket, not in zmq
        sock.rcvhwm = 0        # the router is trusted; never drop its messages
        sock.set(zmq.MAXMSGSIZE, P.MAX_MESSAGE_BYTES)
        if self._curve is not None:
            self._curve.apply_client(sock)
        # The monitor must watch before the connection starts: zmq does not retry a handshake
        # refused for a security mismatch, so its one event is the only word of the refusal.
        self._sock = LoopSocket(sock, self._on_message, on_disconnect=self._on_disconnect)
        sock.connect(self.endpoint)
        self._registered_event = asyncio.Event()
        deadline = time.monotonic() + self.register_timeout_s
        while not self._registered_event.is_set():
            self._send_register()
            self._sock.poke()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                await self.close()
                raise RouterUnreachable(f"no router answered at {self.endpoint} within "
                                        f"{self.register_timeout_s:g}s; start one with `pdserve router` "
                                        "or check --router (and --curve-dir)")
            try:
                await asyncio.wait_for(self._registered_event.wait(), min(1.0, remaining))
            except asyncio.TimeoutError:
                pass
            if self._refused is not None:
                await self.close()
                raise RegistrationRefused(f"router {self.endpoint} refused this worker: {self._refused}")
        self._heartbeat_task = asyncio.create_task(self._heartbeat_loop())
        return self.config

    async def recv(self) -> P.Message:
        """The next router message: Allocate, Prefill, Free, PeerDead or Shutdown."""
        # Yield to the loop first: a queue.get() that finds a message does not, and a burst of
        # thousands (a flood's Allocates) handled back to back would starve the heartbeats, so
        # the router and this worker would each take the other for dead.
        await asyncio.sleep(0)
        msg = await self._inbox.get()
        if isinstance(msg, _Refusal):
            raise RegistrationRefused(f"router {self.endpoint} refused this worker: {msg.error}")
        return msg

    def send(self, msg: P.Message) -> bool:
        """Queue a message for the router without waiting. Dropped (False) while no router
        has this worker registered: whatever it refers to is gone with the old router."""
        if not self._registered or self._sock is None:
            return False
        return self._sock.send([P.encode(msg)])

    async def close(self) -> None:
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            self._heartbeat_task = None
        for task in list(self._lost_tasks):
            task.cancel()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._registered = False

    # -- internals -------------------------------------------------------------------------
    def _send_register(self) -> None:
        # One Register in flight at a time: while disconnected it waits in the socket's queue.
        if self._sock is not None and self._sock.num_pending == 0:
            self._last_register = time.monotonic()
            info = {**self.info, "registration": self._num_router_losses}
            self._sock.send([P.encode(P.Register(self.worker_id, info))])

    def _on_message(self, frames: list[bytes]) -> None:
        try:
            msg = P.decode(frames[-1], P.ROUTER_TO_WORKER)
        except P.ProtocolError as exc:
            log.warning("dropping a malformed message from the router: %s", exc)
            return
        if isinstance(msg, P.Registered):
            self._on_registered(msg)
        elif isinstance(msg, P.HeartbeatAck):
            if msg.registered:
                self._last_ack = time.monotonic()
            elif self._registered:
                self._lose_router("the router does not know this worker (it restarted or "
                                  "declared the worker dead)")
        elif self._registered or isinstance(msg, P.Shutdown):
            # A Shutdown counts even when the router's disconnect was seen first: the router
            # sends it and closes at once, and the two events can arrive in either order.
            self._inbox.put_nowait(msg)

    def _on_disconnect(self, reason: bytes) -> None:
        if reason in (AUTH_FAILED, HANDSHAKE_FAILED):
            self._on_registered(P.Registered(self.worker_id, refusal_text(reason)))
        elif self._registered:
            # The router dropped the connection (it died, or declared this worker dead): it
            # has forgotten this worker, so register again.
            self._lose_router("the connection dropped")

    def _on_registered(self, msg: P.Registered) -> None:
        if msg.error is not None:
            log.error("router refused this worker: %s", msg.error)
            self._refused = msg.error
            if self._registered_event is not None and self._registered_event.is_set():
                self._inbox.put_nowait(_Refusal(msg.error))  # a later re-registration
            elif self._registered_event is not None:
                self._registered_event.set()
            return
        if self._registered:
            return  # a duplicate answer to a Register that waited in the queue
        self.config = msg.config
        self._registered = True
        self._last_ack = time.monotonic()
        if self._registered_event is not None:
            if self._registered_event.is_set():
                log.info("registered again with router %s", self.endpoint)
            self._registered_event.set()

    def _lose_router(self, why: str) -> None:
        log.warning("lost the router at %s: %s; aborting every request and registering again",
                    self.endpoint, why)
        self._registered = False
        self._num_router_losses += 1
        shutdown = None
        while not self._inbox.empty():
            msg = self._inbox.get_nowait()
            if isinstance(msg, P.Shutdown):
                shutdown = msg
        if shutdown is not None:
            self._inbox.put_nowait(shutdown)
            return  # the router said goodbye: stop, do not register again
        if self._sock is not None:
            self._sock.clear_pending()
        if self.on_router_lost is not None:
            try:
                result = self.on_router_lost()
                if inspect.isawaitable(result):
                    task = asyncio.ensure_future(result)
                    self._lost_tasks.add(task)
                    task.add_done_callback(self._lost_tasks.discard)
            except Exception:
                log.exception("on_router_lost failed")
        self._send_register()

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            self._sock.poke()
            now = time.monotonic()
            if self._registered:
                if now - self._last_ack > self.router_timeout_s:
                    self._lose_router(f"no heartbeat answer for {now - self._last_ack:.1f}s")
                    continue
                try:
                    stats = self.stats()
                except Exception:
                    log.exception("stats callback failed")
                    stats = {}
                self._sock.send([P.encode(P.Heartbeat(self.worker_id, stats))])
            elif now - self._last_register >= 1.0:
                self._send_register()


class _Refusal:
    """Put in the inbox when a re-registration is refused, so recv() raises."""

    def __init__(self, error: str):
        self.error = error
