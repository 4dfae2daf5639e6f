"""What the router sends to its clients, with a bounded backlog per client connection.

zmq holds up to ``max_client_backlog`` messages for each client (the frontend's send high-water
mark). A client that falls that far behind (it does not read) is *backlogged*, and then:
- a stream chunk that cannot go out fails its request with ``overloaded`` (the caller asks for
  the error with ``send(..., final=True)``, and ends the request);
- final replies (last chunk, errors, status replies) wait, in order, in a small overflow queue
  of at most ``MAX_OVERFLOW`` messages for that client; past it they are dropped and counted in
  ``num_dropped`` (the client reads nothing, so nothing could reach it anyway);
- new requests from it are refused with ``overloaded`` (router/server.py).
The overflow queue is flushed in order as the client reads again (every router tick) and
forgotten when the client disconnects. So every request of a backlogged client still gets one
answer, and the router's memory per client stays bounded.
"""
from __future__ import annotations

from collections import deque

from router.sockets import FULL, GONE, SENT, LoopSocket

MAX_OVERFLOW = 4096
QUEUED = "queued"      # held in the overflow queue; will be sent in order
BACKLOGGED = "backlogged"  # not sent: the client is too far behind for another stream chunk


class ClientSender:
    """Sends single-frame messages to clients over the frontend ROUTER socket."""

    def __init__(self, sock: LoopSocket):
        self.sock = sock
        self._overflow: dict[bytes, deque[bytes]] = {}
        self.num_dropped = 0       # final replies dropped past MAX_OVERFLOW
        self.num_backlogged = 0    # times a client became backlogged

    def is_backlogged(self, client: bytes) -> bool:
        return client in self._overflow

    def send(self, client: bytes, payload: bytes, *, final: bool) -> str:
        """Send or hold one message. Returns SENT, QUEUED, BACKLOGGED (only when not ``final``)
        or GONE (the client disconnected)."""
        overflow = self._overflow.get(client)
        if overflow is None:
            result = self.sock.send_to_peer([client, payload])
            if result != FULL:
                return result
            self.num_backlogged += 1
            overflow = self._overflow[client] = deque()
        if not final:
            return BACKLOGGED
        if len(overflow) < MAX_OVERFLOW:
            overflow.append(payload)
        else:
            self.num_dropped += 1
        return QUEUED

    def flush(self) -> None:
        """Send what the backlogged clients can take now, in order."""
        for client in list(self._overflow):
            overflow = self._overflow[client]
            while overflow:
                result = self.sock.send_to_peer([client, overflow[0]])
                if result == FULL:
                    break
                overflow.popleft()
                if result == GONE:
                    overflow.clear()
            if not overflow:
                del self._overflow[client]

    def forget(self, client: bytes) -> None:
        """The client disconnected: drop what waits for it."""
        self._overflow.pop(client, None)

    @property
    def num_waiting(self) -> int:
        return sum(len(q) for q in self._overflow.values())


__all__ = ["ClientSender", "SENT", "QUEUED", "BACKLOGGED", "GONE", "MAX_OVERFLOW"]
