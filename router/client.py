"""Client library: ``AsyncClient`` (asyncio) and ``Client`` (blocking, a loop in a thread;
router/sync_client.py, imported from here).

One DEALER connection carries any number of concurrent requests; a reader callback sorts the
router's answers by request id into per-request inboxes. ::

    async with AsyncClient("ipc:///tmp/pdserve.ipc") as client:
        async for chunk in client.generate("Hello", max_tokens=32, temperature=0):
            print(chunk.text, end="")
        result = await client.complete(prompt_token_ids=[1, 2, 3], max_tokens=8)
        print(result.token_ids, result.metrics.ttft)
        answer = await client.chat_complete("What is the capital of France?", temperature=0)
        print(answer.text)

Leaving a stream early (``break``, ``aclose()``, garbage collection) cancels the request on
the server. Errors from the server raise ``ServerError`` subclasses; ``ClientTimeout`` is
raised when nothing arrives for ``timeout`` seconds (default ``DEFAULT_TIMEOUT_S``; None waits
forever); losing the connection to the router fails every request in flight with
``Unavailable``, and so does connecting where no router listens (within 2 s: a missing ipc
path, a refused TCP connection). A request over the protocol's limits (16 MiB, 4 Mi token
ids) raises ``InvalidRequest`` before anything is sent.
"""
from __future__ import annotations

import asyncio
import itertools
import math
import secrets
import time
from collections import deque
from pathlib import Path
from typing import Any

import zmq

from models.request_options import is_number
from router import protocol as P
from router.client_types import (ClientTimeout, Completion, InternalError, InvalidRequest,  # noqa: F401
                                 Overloaded, RequestMetrics, RequestTimeout, ServerError,
                                 StreamChunk, Unavailable, error_for)
from router.probe import why_no_listener
from router.scaling import check_counts
from router.security import CurveKeys, check_endpoint
from router.sockets import AUTH_FAILED, HANDSHAKE_FAILED, SILENT_REFUSALS, LoopSocket
from router.validation import MAX_PROMPT_CHARS

_FROM_ROUTER = (P.Chunk, P.Error, P.StatusReply, P.ScaleReply)
# Seconds to wait for any reply (the first one of a request, or the next chunk of a stream).
# The router answers within its own bounds (unavailable, hand-off and stuck-worker timeouts);
# this is the last line of defence against a router that stopped answering.
DEFAULT_TIMEOUT_S = 300.0
_MAX_LIST_ITEMS = P.UNPACK_LIMITS["max_array_len"]
CLOSED = "this client was closed; make a new one"


class _Inbox:
    """Messages of one request, in arrival order, with their arrival times."""

    __slots__ = ("items", "waiter")

    def __init__(self):
        self.items: deque = deque()
        self.waiter: asyncio.Future | None = None

    def put(self, item) -> None:
        self.items.append(item)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def get(self, timeout: float | None):
        if not self.items:
            loop = asyncio.get_running_loop()
            self.waiter = loop.create_future()
            timer = loop.call_later(timeout, _expire, self.waiter, timeout) if timeout else None
            try:
                await self.waiter
            finally:
                self.waiter = None
                if timer is not None:
                    timer.cancel()
        return self.items.popleft()


def as_messages(messages: list[dict] | str) -> list[dict]:
    return [{"role": "user", "content": messages}] if isinstance(messages, str) else messages


def _expire(fut: asyncio.Future, timeout: float) -> None:
    if not fut.done():
        fut.set_exception(ClientTimeout(f"nothing arrived from the router within {timeout:g}s"))


class AsyncStream:
    """Async iterator of ``StreamChunk``; closing it before the end cancels the request."""

    def __init__(self, client: "AsyncClient", rid: str, inbox: _Inbox):
        self._client, self.rid, self._inbox = client, rid, inbox
        self._done = False
        self.arrival = 0.0  # time.perf_counter() when the last chunk reached the socket

    def __aiter__(self) -> "AsyncStream":
        return self

    async def __anext__(self) -> StreamChunk:
        if self._done:
            raise StopAsyncIteration
        try:
            msg, self.arrival = await self._inbox.get(self._client.timeout)
        except BaseException:
            self._close(cancel=True)
            raise
        if isinstance(msg, P.Error):
            self._close(cancel=False)
            raise error_for(msg.code, msg.message)
        if msg.finish_reason is not None:
            self._close(cancel=False)
        return StreamChunk(msg.token_ids, msg.text, msg.finish_reason, msg.num_prompt_tokens)

    async def aclose(self) -> None:
        self._close(cancel=True)

    def _close(self, cancel: bool) -> None:
        if not self._done:
            self._done = True
            self._client._end(self.rid, cancel)

    def __del__(self):
        if not self._done:
            self._done = True
            self._client._end_from_anywhere(self.rid)


class AsyncClient:
    """A connection to a pdserve router. ``curve``: a key directory (``pdserve keys``) or
    CurveKeys, needed when the router uses CurveZMQ."""

    def __init__(self, endpoint: str, *, timeout: float | None = DEFAULT_TIMEOUT_S,
                 curve: str | Path | CurveKeys | None = None):
        check_endpoint(endpoint, "endpoint")
        if timeout is not None and not (is_number(timeout) and 0 < timeout < math.inf):
            raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
        self.endpoint = endpoint
        self.timeout = timeout
        self._curve = CurveKeys.for_peer(curve, "client") if isinstance(curve, (str, Path)) else curve
        self._sock: LoopSocket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ctx: zmq.Context | None = None
        self._inboxes: dict[str, _Inbox] = {}
        self._prefix = secrets.token_hex(4)
        self._ids = itertools.count(1)
        self._closed = False

    async def __aenter__(self) -> "AsyncClient":
        self._connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def _connect(self) -> LoopSocket:
        """Connect once. Raises Unavailable when nothing listens at the endpoint, or after close()."""
        if self._closed:
            raise Unavailable(P.ERR_UNAVAILABLE, CLOSED)
        if self._sock is None:
            why = why_no_listener(self.endpoint)
            if why is not None:
                raise Unavailable(P.ERR_UNAVAILABLE, f"no router at {self.endpoint}: {why}; start one with "
                                                     "`pdserve serve` or pass the right endpoint")
            self._loop = asyncio.get_running_loop()
            self._ctx = zmq.Context()
            sock = self._ctx.socket(zmq.DEALER)
            sock.linger = 0
            sock.rcvhwm = 0  # a stream's chunks are never dropped; the router bounds the backlog
            sock.set(zmq.MAXMSGSIZE, P.MAX_MESSAGE_BYTES)
            if self._curve is not None:
                self._curve.apply_client(sock)
            # Watch before connecting: a refused handshake is not retried, so its event is
            # the only word of the refusal (see router/sockets.py).
            self._sock = LoopSocket(sock, self._on_message, on_disconnect=self._on_disconnect)
            sock.connect(self.endpoint)
        return self._sock

    # -- requests ---------------------------------------------------------------------------
    def generate(self, prompt: str | None = None, *, prompt_token_ids: list[int] | None = None,
                 messages: list[dict] | None = None,
                 max_tokens: int = 16, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None, stop: str | list[str] | None = None,
                 stop_token_ids: list[int] | None = None, ignore_eos: bool = False,
                 timeout_s: float | None = None) -> AsyncStream:
        """Start a streaming request; iterate the result for ``StreamChunk``s.

        Give one of ``prompt`` (text), ``prompt_token_ids`` and ``messages`` (a chat,
        ``[{"role": "user", "content": "..."}]``, rendered by the router with the model's chat
        template). ``timeout_s`` is the server-side deadline (``RequestTimeout``). Raises
        InvalidRequest at once for a request over the protocol's size limits, Unavailable if no
        router listens,
        ServerError subclasses while iterating, ClientTimeout if the router falls silent.
        """
        _check_sizes(prompt, prompt_token_ids)
        params = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
                  "top_k": top_k, "seed": seed, "stop": stop, "stop_token_ids": stop_token_ids,
                  "ignore_eos": ignore_eos}
        rid, inbox = self._open()
        try:
            self._send(P.Generate(rid, prompt, prompt_token_ids, params, True, timeout_s, messages))
        except BaseException:
            self._inboxes.pop(rid, None)
            raise
        return AsyncStream(self, rid, inbox)

    async def complete(self, prompt: str | None = None, **kwargs: Any) -> Completion:
        """Run a request to the end (same arguments as ``generate``), with client-side metrics."""
        start = time.perf_counter()
        token_ids: list[int] = []
        texts: list[str] = []
        times: list[float] = []
        finish, num_prompt = P.FINISH_ABORT, 0
        stream = self.generate(prompt, **kwargs)
        async for chunk in stream:
            token_ids += chunk.token_ids
            times += [stream.arrival] * len(chunk.token_ids)
            texts.append(chunk.text)
            num_prompt = chunk.num_prompt_tokens
            if chunk.finish_reason is not None:
                finish = chunk.finish_reason
        end = stream.arrival
        ttft = (times[0] - start) if times else end - start
        itl = [b - a for a, b in zip(times, times[1:])]
        tpot = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else 0.0
        return Completion(token_ids, "".join(texts), finish, num_prompt,
                          RequestMetrics(ttft=ttft, tpot=tpot, itl=itl, e2e=end - start))

    def chat(self, messages: list[dict] | str, **kwargs: Any) -> AsyncStream:
        """Stream the answer to a chat: ``messages`` as in ``generate`` (a plain string is one
        user message); the other arguments are those of ``generate``."""
        return self.generate(messages=as_messages(messages), **kwargs)

    async def chat_complete(self, messages: list[dict] | str, **kwargs: Any) -> Completion:
        """The whole answer to a chat, with metrics (``complete`` for ``messages``)."""
        return await self.complete(messages=as_messages(messages), **kwargs)

    async def status(self) -> dict:
        """The router's status: its totals and every worker (see ``pdserve status``)."""
        return (await self._ask(P.StatusRequest)).status

    async def scale(self, *, prefill: int | None = None, decode: int | None = None) -> dict:
        """Ask the router to run ``prefill`` prefill and ``decode`` decode workers (None: keep
        that count). Returns at once with ``{"added": [ids], "draining": [ids], "prefill": N,
        "decode": M}``; added workers take load once registered, removed ones drain first.
        Raises InvalidRequest when the router cannot start or stop workers, or a count is bad."""
        try:
            check_counts(prefill, decode)
        except ValueError as exc:
            raise InvalidRequest(P.ERR_INVALID, str(exc)) from None
        return (await self._ask(lambda rid: P.ScaleRequest(rid, prefill, decode))).result

    async def _ask(self, make) -> P.Message:
        """Send one request made by ``make(rid)`` and return its single reply."""
        rid, inbox = self._open()
        try:
            self._send(make(rid))
            msg, _ = await inbox.get(self.timeout)
        finally:
            self._inboxes.pop(rid, None)
        if isinstance(msg, P.Error):
            raise error_for(msg.code, msg.message)
        return msg

    async def close(self) -> None:
        """Cancel every open request and close the connection; the client cannot be used again."""
        if self._sock is not None:
            for rid in list(self._inboxes):
                self._send(P.Cancel(rid))
        self._closed = True
        if self._sock is None:
            return
        self._fail_all(Unavailable(P.ERR_UNAVAILABLE, "the client was closed"))
        await asyncio.sleep(0)  # let the socket flush the cancels before closing
        self._sock.close()
        self._sock = None
        self._ctx.term()

    # -- internals --------------------------------------------------------------------------
    def _open(self) -> tuple[str, _Inbox]:
        refused = self._connect().refused
        if refused is not None:  # no handshake succeeded since the router refused this client
            raise Unavailable(P.ERR_UNAVAILABLE, self._refusal(refused))
        rid = f"{self._prefix}-{next(self._ids)}"
        inbox = self._inboxes[rid] = _Inbox()
        return rid, inbox

    def _send(self, msg: P.Message) -> None:
        try:
            payload = P.encode(msg)
        except OverflowError:  # msgpack carries integers of at most 64 bits
            raise InvalidRequest(P.ERR_INVALID, "cannot encode the request: an integer in it does not fit "
                                                "in 64 bits; check the token ids, max_tokens and seed") from None
        except (TypeError, ValueError) as exc:
            raise InvalidRequest(P.ERR_INVALID, f"cannot encode the request: {exc}") from None
        if len(payload) > P.MAX_MESSAGE_BYTES:
            raise InvalidRequest(P.ERR_INVALID, f"the request packs to {len(payload)} bytes, over the "
                                                f"{P.MAX_MESSAGE_BYTES}-byte message limit; shorten the prompt")
        self._connect().send([payload])

    def _on_message(self, frames: list[bytes]) -> None:
        try:
            msg = P.decode(frames[-1], _FROM_ROUTER)
        except P.ProtocolError:
            return
        inbox = self._inboxes.get(msg.rid)
        if inbox is not None:
            inbox.put((msg, time.perf_counter()))

    def _refusal(self, reason: bytes) -> str:
        fix = ("pass the key directory made by `pdserve keys` (curve= / --curve-dir) whose client key is "
               "in the router's clients/ directory, or none if the router has none")
        if reason == AUTH_FAILED:
            return f"the router at {self.endpoint} refused this client: CurveZMQ authentication failed; {fix}"
        return (f"{self.endpoint} closed {SILENT_REFUSALS} connections in a row during the ZeroMQ handshake: "
                f"either CurveZMQ authentication failed ({fix}) or it is not a pdserve router's client "
                "endpoint (the HTTP port is another)")

    def _on_disconnect(self, reason: bytes) -> None:
        if reason in (AUTH_FAILED, HANDSHAKE_FAILED):
            why = self._refusal(reason)
        else:
            why = f"lost the connection to the router at {self.endpoint}; the request is lost"
        self._fail_all(Unavailable(P.ERR_UNAVAILABLE, why))

    def _fail_all(self, exc: ServerError) -> None:
        for rid, inbox in list(self._inboxes.items()):
            inbox.put((P.Error(rid, exc.code, exc.message), time.perf_counter()))

    def _end(self, rid: str, cancel: bool) -> None:
        if self._inboxes.pop(rid, None) is not None and cancel and self._sock is not None:
            self._send(P.Cancel(rid))

    def _end_from_anywhere(self, rid: str) -> None:
        """Cancel from a finalizer, which may run on any thread."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._end, rid, True)
        except RuntimeError:
            pass  # the loop is shutting down


def _check_sizes(prompt, prompt_token_ids) -> None:
    """Refuse what the router could only refuse: over its list and prompt limits."""
    if isinstance(prompt_token_ids, (list, tuple)) and len(prompt_token_ids) > _MAX_LIST_ITEMS:
        raise InvalidRequest(P.ERR_INVALID, f"prompt_token_ids has {len(prompt_token_ids)} items, over the "
                                            f"protocol's limit of {_MAX_LIST_ITEMS} (and any model's length)")
    if isinstance(prompt, str) and len(prompt) > MAX_PROMPT_CHARS:
        raise InvalidRequest(P.ERR_INVALID, f"the prompt has {len(prompt)} characters, over the router's "
                                            f"limit of {MAX_PROMPT_CHARS}; shorten it")


def __getattr__(name: str):
    # ``Client``, the blocking twin, lives in router/sync_client.py and is imported from here
    # (``from router.client import Client``); loaded on first use, which also keeps the two
    # modules free of an import cycle.
    if name == "Client":
        from router.sync_client import Client
        return Client
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
