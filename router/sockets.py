"""ZeroMQ sockets driven by an asyncio loop's reader callback, without a future per message.

``zmq.asyncio`` creates a future (and a loop round trip) for every send and receive; at tens of
thousands of stream chunks per second that dominates the router. Here a plain socket's FD is
registered with ``loop.add_reader``; the callback drains every ready message and hands it to a
plain function, and sends are non-blocking calls.

Invariant (libzmq's FD is edge-triggered): after any send the socket's ``EVENTS`` must be read
again or incoming messages may sit unnoticed, so every send schedules one drain per loop turn.

Peer disconnects: a ROUTER socket's monitor reports the file descriptor of a dropped
connection, and every received message carries the descriptor it came in on (``zmq.SRCFD``),
so the socket maps descriptors to routing ids and calls ``on_disconnect(routing_id)``. A closed
connection's last messages can still arrive after the first ones of the connection that reused
its descriptor: zmq's routing ids count up, so a message from a peer older than the
descriptor's current one (or already gone) is known to be late, and dropped.

Any other socket calls ``on_disconnect(reason)``:
- ``AUTH_FAILED`` when the peer refused us: its authenticator denied our CurveZMQ key
  (``HANDSHAKE_FAILED_AUTH``, the peer's ERROR command), or one side uses CurveZMQ and the other
  does not (``HANDSHAKE_FAILED_PROTOCOL`` with a mechanism mismatch), or a CurveZMQ box did not
  open (a cryptographic protocol error).
- ``HANDSHAKE_FAILED`` when ``SILENT_REFUSALS`` connections in a row failed their handshake
  without a word (``HANDSHAKE_FAILED_NO_DETAIL``) or with another protocol error. One such
  failure is no refusal (a peer killed or restarted mid-handshake): zmq reconnects and sends
  what waits. A streak of them is a refusal in all but name:
  - a CurveZMQ server closes the connection without a word on a HELLO made for another
    server key;
  - when one side uses CurveZMQ and the other does not, the mismatch event comes on some
    connections only (measured: a keyless worker against a keyed router saw nothing but
    closed connections in about one run in ten); zmq retries those, never the mismatch;
  - a peer that is no zmq socket at all (an HTTP port) closes every connection.
- ``b""`` when a connection that had completed its handshake drops.
A refusal is reported once until a handshake succeeds again, and ``refused`` holds it till then.
The monitor must watch before the socket connects: a refused handshake is not retried, so its
one event may be the only word of the refusal. libzmq posts the handshake failure before the
disconnect, but the refusal is acted on when its own event arrives, so the order never matters.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections import deque
from typing import Callable

import zmq
from zmq.utils.monitor import parse_monitor_message

log = logging.getLogger(__name__)

# Messages handled per reader callback before yielding to other loop work.
_DRAIN_BUDGET = 512
# The Cython send, without the pure-Python layer of zmq.Socket.send (half the cost per frame).
_raw_send = zmq.backend.Socket.send
_MORE = int(zmq.SNDMORE | zmq.NOBLOCK)
_LAST = int(zmq.NOBLOCK)
AUTH_FAILED = b"auth"
HANDSHAKE_FAILED = b"handshake"
# Handshakes in a row that must fail without a word before the peer counts as refusing us.
SILENT_REFUSALS = 3
# Handshake protocol errors that mean the peer's security mechanism or keys do not match ours.
_REFUSALS = (zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH, zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC)
_PEER_EVENTS = (zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
# Outcomes of LoopSocket.send_to_peer.
SENT, FULL, GONE = "sent", "full", "gone"


class HandshakeWatch:
    """What a client socket's connection events mean (see the module docstring)."""

    def __init__(self) -> None:
        self.up = False  # the current connection completed its handshake
        self.refused: bytes | None = None  # the refusal reported since the last completed handshake
        self._failed = 0  # handshakes in a row that failed without a refusal

    def event(self, kind: int, value: int) -> bytes | None:
        """Take one monitor event; return what it reports (``AUTH_FAILED``, ``HANDSHAKE_FAILED``,
        ``b""`` for a dropped connection) or None. Events other than handshakes and
        disconnects report nothing."""
        if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.up, self.refused, self._failed = True, None, 0
            return None
        if kind == zmq.EVENT_DISCONNECTED:
            dropped, self.up = self.up, False
            return b"" if dropped else None
        if (kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH
                or (kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value in _REFUSALS)):
            reason = AUTH_FAILED
        elif kind in (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL):
            self._failed += 1
            reason = HANDSHAKE_FAILED if self._failed >= SILENT_REFUSALS else None
        else:
            return None
        if reason is None or self.refused is not None:
            return None
        self.refused = reason
        return reason


class LoopSocket:
    """One zmq socket served by an asyncio loop. Not thread-safe: use it from its loop only.

    ``on_message(frames)`` gets each multipart message as a list of bytes. For a ROUTER socket
    the first frame is the peer's routing id. Exceptions raised by ``on_message`` are logged and
    the message dropped: a bad message never stops the socket.
    """

    def __init__(self, sock: zmq.Socket, on_message: Callable[[list[bytes]], None], *,
                 on_disconnect: Callable[[bytes], None] | None = None,
                 loop: asyncio.AbstractEventLoop | None = None):
        self.sock = sock
        self.on_message = on_message
        self.on_disconnect = on_disconnect
        self.loop = loop or asyncio.get_running_loop()
        self._is_router = sock.type == zmq.ROUTER
        self._pending: deque[list[bytes]] = deque()  # DEALER sends waiting for room
        self._drain_scheduled = False
        self._closed = False
        self._monitor: zmq.Socket | None = None
        self._fd_peer: dict[int, bytes] = {}
        self._fd_stale: dict[int, int] = {}
        self._fd_gone: dict[int, bytes] = {}  # the last peer known gone from each descriptor
        self._watch = HandshakeWatch()
        if on_disconnect is not None:
            self._monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED if self._is_router else _PEER_EVENTS)
            self.loop.add_reader(self._monitor.FD, self._drain)
        self.loop.add_reader(sock.FD, self._drain)
        self._schedule_drain()

    # -- sending -----------------------------------------------------------------------------
    def send(self, frames: list[bytes]) -> bool:
        """Send without waiting. Returns False if the message was not sent.

        ROUTER socket (``ROUTER_MANDATORY`` set): False when the peer is gone or its queue is
        full. Other sockets: a message that finds the queue full waits in order (True).
        """
        if self._closed:
            return False
        if self._is_router:
            return self.send_to_peer(frames) == SENT
        self._schedule_drain()
        if not self._pending:
            try:
                self._send_now(frames)
                return True
            except zmq.Again:
                pass
        self._pending.append(frames)
        return True

    def send_to_peer(self, frames: list[bytes]) -> str:
        """ROUTER socket: send to the peer named by ``frames[0]`` without waiting. Returns
        ``SENT``, ``FULL`` (its queue is at the high-water mark) or ``GONE`` (no such peer)."""
        if self._closed:
            return GONE
        self._schedule_drain()
        try:
            self._send_now(frames)
            return SENT
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EAGAIN:
                return FULL
            if exc.errno == zmq.EHOSTUNREACH:
                return GONE
            raise

    def _send_now(self, frames: list[bytes]) -> None:
        """All frames or none: zmq accepts a multipart message whole once its first frame is in."""
        sock = self.sock
        for frame in frames[:-1]:
            _raw_send(sock, frame, _MORE)
        _raw_send(sock, frames[-1], _LAST)

    @property
    def num_pending(self) -> int:
        """Messages waiting for room in the socket's queue (non-ROUTER sockets)."""
        return len(self._pending)

    def has_input(self) -> bool:
        """Whether messages wait unread (the loop is behind on this socket)."""
        if self._closed:
            return False
        if self.sock.get(zmq.EVENTS) & zmq.POLLIN:
            self._schedule_drain()  # reading EVENTS may consume the edge: make sure we drain
            return True
        return False

    def clear_pending(self) -> None:
        self._pending.clear()

    def poke(self) -> None:
        """Check the socket again soon (flushes waiting messages once it can take them)."""
        self._schedule_drain()

    # -- receiving ---------------------------------------------------------------------------
    def _schedule_drain(self) -> None:
        if not self._drain_scheduled and not self._closed:
            self._drain_scheduled = True
            self.loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._drain_scheduled = False
        if self._closed:
            return
        if self._monitor is not None:
            self._drain_monitor(self._monitor)
        sock = self.sock
        track = self._monitor is not None and self._is_router
        for _ in range(_DRAIN_BUDGET):
            events = sock.get(zmq.EVENTS)
            if self._pending and events & zmq.POLLOUT:
                self._flush_pending()
            if not events & zmq.POLLIN:
                return
            if track:
                raw = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                if not self._note_peer(raw[0].bytes, raw[-1].get(zmq.SRCFD)):
                    continue  # from a connection already closed: nobody is there to answer
                frames = [frame.bytes for frame in raw]
            else:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            try:
                self.on_message(frames)
            except Exception:  # a handler bug must not take the socket down
                log.exception("error while handling a message; message dropped")
            if self._closed:
                return
        self._schedule_drain()  # budget spent: let other work run, then continue

    def _flush_pending(self) -> None:
        while self._pending:
            try:
                self._send_now(self._pending[0])
            except zmq.Again:
                return
            self._pending.popleft()

    # -- peer tracking (ROUTER with on_disconnect) -----------------------------------------
    def _note_peer(self, peer: bytes, fd: int) -> bool:
        """Tie a message to its connection's descriptor. False when the message came from a
        connection already closed (messages can wait in zmq after their connection went, even
        behind the first messages of the connection that reused the descriptor)."""
        known = self._fd_peer.get(fd)
        if known == peer:
            return True
        # A descriptor is reused only after its connection closed, and libzmq posts that
        # closure before the new connection exists: read it before judging who this is.
        self._drain_monitor(self._monitor)  # type: ignore[arg-type]
        known, gone = self._fd_peer.get(fd), self._fd_gone.get(fd)
        if peer == gone or _older(peer, known) or _older(peer, gone):
            return False
        if known is not None:
            # The descriptor was reused, so the old connection is closed; its DISCONNECTED
            # event may still be on its way and must not be charged to the new peer.
            self._fd_stale[fd] = self._fd_stale.get(fd, 0) + 1
            self._fd_gone[fd] = known
            self._peer_gone(known)
        self._fd_peer[fd] = peer
        return True

    def _drain_monitor(self, monitor: zmq.Socket) -> None:
        while monitor.get(zmq.EVENTS) & zmq.POLLIN:
            event = parse_monitor_message(monitor.recv_multipart(zmq.NOBLOCK))
            if not self._is_router:
                self._peer_event(event["event"], event["value"])
                continue
            fd = event["value"]
            if self._fd_stale.get(fd):
                self._fd_stale[fd] -= 1
                continue
            peer = self._fd_peer.pop(fd, None)
            if peer is not None:
                self._fd_gone[fd] = peer
                self._peer_gone(peer)

    @property
    def refused(self) -> bytes | None:
        """Non-ROUTER sockets: the refusal reported since the last completed handshake."""
        return self._watch.refused

    def _peer_event(self, kind: int, value: int) -> None:
        """A non-ROUTER socket's connection event (see the module docstring)."""
        report = self._watch.event(kind, value)
        if report is not None:
            self._peer_gone(report)

    def _peer_gone(self, peer: bytes) -> None:
        try:
            self.on_disconnect(peer)  # type: ignore[misc]
        except Exception:
            log.exception("error while handling a peer disconnect")

    def close(self, linger_ms: int = 0) -> None:
        """Stop reading and close the socket; messages still queued get ``linger_ms`` to go out."""
        if self._closed:
            return
        self._closed = True
        self.loop.remove_reader(self.sock.FD)
        if self._monitor is not None:
            self.loop.remove_reader(self._monitor.FD)
            self.sock.disable_monitor()
            self._monitor.close(linger=0)
        self.sock.close(linger=linger_ms)


def _older(peer: bytes, other: bytes | None) -> bool:
    """Whether ``peer`` connected before ``other``: a ROUTER names each connection whose peer
    set no routing id ``b"\\0"`` + a big-endian counter, so those names sort in connection order.
    Names a peer chose itself tell nothing (False)."""
    return (other is not None and len(peer) == len(other) == 5 and peer[0] == other[0] == 0
            and peer < other)


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
