"""The HTTP gateway: uvicorn on the router's own event loop, and in-process clients that hand
requests to the scheduler and take its output straight back (``Router.local_clients``).

One HTTP request is one ``HttpClient`` with its own client id (``\\x00http`` + a counter:
libzmq reserves routing ids that start with a zero byte, so no ZMQ client can collide) and
one scheduler request per choice (client rid = the choice index). When the HTTP client goes
away before its request ends, ``release`` aborts every choice, which frees its KV on every
worker (``RequestScheduler.client_gone``).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections import deque
from typing import Callable, TypeVar

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from router import protocol as P
from router.chat_template import ChatTemplate
from router.http.config import DEFAULT_READ_TIMEOUT_S, HttpConfig
from router.http.errors import APIError
from router.http.responses import Choice
from router.tokenizing import TokenizerFull

log = logging.getLogger("pdserve.http")
T = TypeVar("T")
MAX_PENDING_EVENTS = 1 << 16  # a client this far behind is dropped (its requests aborted)


class HttpClient:
    """The output of one HTTP request's choices, queued for its handler.

    ``chunk``/``error`` are called by the scheduler (synchronously, on the loop); the handler
    drains ``pending`` after ``wait()``. An event is ``(choice, token_ids, text, reason, logprobs)``.
    """

    def __init__(self, identity: bytes, num_choices: int):
        self.identity = identity
        self.choices = [Choice(i) for i in range(num_choices)]
        self.pending: deque = deque()
        self.num_open = num_choices
        self.failure: APIError | None = None
        self.gone = False  # the HTTP client disconnected
        self._loop = asyncio.get_running_loop()
        self._waiter: asyncio.Future | None = None
        # lead choice index -> submissions of the prompt's other samples, made once the lead's
        # first token shows its prompt is in the prefill worker's prefix cache
        self._followers: dict[int, list[Callable[[], None]]] = {}

    def after_first_token(self, lead: int, submit: Callable[[], None]) -> None:
        """Call ``submit()`` once choice ``lead`` has produced its first token (unless the
        request failed or its client left by then)."""
        self._followers.setdefault(lead, []).append(submit)

    def _submit_followers(self, lead: int) -> None:
        for submit in self._followers.pop(lead, ()):
            if self.done:
                return
            submit()

    @property
    def done(self) -> bool:
        return self.num_open == 0 or self.failure is not None or self.gone

    def disconnected(self) -> None:
        """The HTTP client went away: whoever waits stops waiting."""
        self.gone = True
        self._wake()

    def chunk(self, req, token_ids: list[int], text: str, finish_reason: str | None) -> bool:
        choice = self.choices[int(req.client_rid)]
        if self._followers and choice.index in self._followers:
            # Not from inside the scheduler's own call: submit on the next loop turn.
            self._loop.call_soon(self._submit_followers, choice.index)
        logprobs = None
        if req.logprobs is not None:
            logprobs = req.logprobs[len(req.logprobs) - len(token_ids):] if token_ids else []
        if finish_reason is not None:
            choice.finish_reason = finish_reason
            choice.num_prompt_tokens = req.num_prompt_tokens
            choice.num_cached_tokens = req.num_cached_tokens
            self.num_open -= 1
        self.pending.append((choice, token_ids, text, finish_reason, logprobs))
        self._wake()
        return len(self.pending) < MAX_PENDING_EVENTS

    def error(self, client_rid: str, code: str, message: str) -> None:
        if self.failure is None:
            self.failure = APIError.from_router(code, message)
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        """Until there is output to take, or the request failed or finished."""
        while not self.pending and not self.done:
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None


class HttpGateway:
    """Serves the OpenAI-compatible routes (router/http/app.py) for ``router``."""

    def __init__(self, router, config: HttpConfig, metrics=None):
        self.router = router
        self.config = config
        self.metrics = metrics
        self.url: str | None = None
        self.created = int(time.time())
        self._chat_template: tuple[str | None, ChatTemplate | None] | None = None
        self._next_client = 0
        self._server = None
        self._task: asyncio.Task | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> str:
        """Bind and serve; return the base URL (with the real port when 0 was asked for).
        Raises ValueError if the address cannot be bound."""
        from router.http.app import build_app

        family = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.config.host.strip("[]"), self.config.port))
        except OSError as exc:
            sock.close()
            raise ValueError(f"cannot bind HTTP on {self.config.host}:{self.config.port}: {exc}; "
                             "choose another --port (0: any free one) or --no-http") from None
        sock.listen(2048)
        sock.setblocking(False)
        # uvicorn makes one protocol object a connection from a class: this one has our timeout.
        protocol = type("Protocol", (_Protocol,), {"read_timeout_s": self.config.read_timeout_s})
        uv_config = uvicorn.Config(build_app(self), loop="none", http=protocol, lifespan="off",
                                   log_level="warning", access_log=False, server_header=False,
                                   timeout_graceful_shutdown=2, backlog=2048)
        self._server = _Server(uv_config)
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise ValueError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)
        self.url = self.config.url(sock.getsockname()[1])
        self.router.http_url = self.url
        log.info("HTTP (OpenAI-compatible) on %s", self.url)
        return self.url

    async def close(self) -> None:
        """Stop accepting, let open responses end (the router fails live requests first)."""
        if self._server is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(self._task, 5)
        self._server = None

    # -- requests ----------------------------------------------------------------------------
    def open(self, num_choices: int) -> HttpClient:
        self._next_client += 1
        client = HttpClient(b"\x00http" + self._next_client.to_bytes(8, "big"), num_choices)
        self.router.local_clients[client.identity] = client
        return client

    def submit(self, client: HttpClient, index: int, prompt, params: dict, *,
               want_logprobs: bool, stream: bool) -> None:
        """Hand choice ``index`` to the scheduler. A refusal (invalid, overloaded, unknown
        model) sets ``client.failure`` before this returns."""
        msg = P.Generate(rid=str(index), prompt=prompt.text, prompt_token_ids=prompt.token_ids,
                         params=params, stream=stream)
        scheduler = self.router.scheduler
        scheduler.submit(client.identity, msg)
        if want_logprobs and client.failure is None:
            req = scheduler.by_client.get(client.identity, {}).get(msg.rid)
            if req is not None:  # submit cannot have produced a token yet
                req.logprobs = []

    async def off_loop(self, fn: Callable[..., T], *args) -> T:
        """``fn(*args)`` on the router's tokenizer thread (a long prompt, a large chat), so
        the loop keeps streaming meanwhile; 429 when that thread already has its limit of work."""
        try:
            return await self.router.scheduler.tokenizer.run(fn, *args)
        except TokenizerFull as exc:
            raise APIError(429, str(exc)) from None

    def release(self, client: HttpClient) -> None:
        """The HTTP exchange is over: abort whatever is still running (client gone)."""
        self.router.local_clients.pop(client.identity, None)
        self.router.scheduler.client_gone(client.identity)  # nothing left to abort: a no-op

    # -- model -------------------------------------------------------------------------------
    @property
    def model(self):
        return self.router.scheduler.model

    def model_name(self) -> str | None:
        if self.config.served_model_name:
            return self.config.served_model_name
        model = self.model
        return model.name if model is not None else None

    def max_model_len(self) -> int | None:
        model = self.model
        if model is None:
            return None
        return min(model.max_model_len, self.router.registry.max_model_len() or model.max_model_len)

    def max_new_tokens(self, num_prompt_tokens: int) -> int:
        """The most tokens a prompt of this length can be given by default: up to the max
        model length, and no more than the largest decode worker's KV pool can hold."""
        limit = (self.max_model_len() or 0) - num_prompt_tokens
        spec, largest = self.router.registry.kv_spec, self.router.registry.max_decode_blocks()
        if spec is not None and largest:
            limit = min(limit, largest * spec.block_size + 1 - num_prompt_tokens)
        return max(1, limit)

    def model_dir(self) -> str | None:
        if self.router.config.model_dir:
            return self.router.config.model_dir
        for worker in self.router.registry.alive():
            if worker.info.get("model_dir"):
                return worker.info["model_dir"]
        return None

    def chat_template(self) -> ChatTemplate | None:
        """The model's chat template (or --chat-template's), loaded once the model directory
        is known. Raises ChatTemplateError if it cannot be read."""
        model_dir = self.model_dir()
        if self._chat_template is None or self._chat_template[0] != model_dir:
            override = self.config.chat_template
            if model_dir is not None:
                template = ChatTemplate.from_model_dir(model_dir, override)
            elif override is not None:
                template = ChatTemplate.from_model_dir(os.path.dirname(override) or ".", override)
            else:
                template = None
            self._chat_template = (model_dir, template)
        return self._chat_template[1]

    def missing_roles(self) -> list[str]:
        """Worker roles that must register before requests can be served."""
        roles = {w.role for w in self.router.registry.alive()}
        if "both" in roles:
            return []
        return [r for r in ("prefill", "decode") if r not in roles]


class _Protocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline on request headers: a connection that has
    not sent a request's whole headers ``read_timeout_s`` after connecting, or after that
    request's first byte, is closed. uvicorn itself bounds only the idle time between requests,
    so a client that connects and trickles (or sends nothing) would hold its socket forever."""

    read_timeout_s = DEFAULT_READ_TIMEOUT_S
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._deadline is None:
            self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._deadline = self.loop.call_later(self.read_timeout_s, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()


class _Server(uvicorn.Server):
    """uvicorn's Server without its signal handling: the router's runtime owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


async def start_http(router, config: HttpConfig) -> HttpGateway:
    """Serve HTTP and /metrics for ``router`` on the running loop. Raises ValueError."""
    from router.metrics import RouterMetrics

    metrics = RouterMetrics(router)
    router.scheduler.observer = metrics
    gateway = HttpGateway(router, config, metrics)
    await gateway.start()
    return gateway
