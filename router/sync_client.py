"""``Client``: the blocking twin of ``router.client.AsyncClient``, the same methods run on an
event loop in a thread; ``generate`` returns a plain iterator. Import it as
``from router.client import Client``."""
from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any, Iterator

from router import protocol as P
from router.client import (CLOSED, DEFAULT_TIMEOUT_S, AsyncClient, AsyncStream, Completion,
                           StreamChunk, Unavailable, as_messages)
from router.runtime import new_event_loop
from router.security import CurveKeys


class Client:
    """Blocking twin of AsyncClient: same methods; ``generate`` returns a plain iterator."""

    def __init__(self, endpoint: str, *, timeout: float | None = DEFAULT_TIMEOUT_S,
                 curve: str | Path | CurveKeys | None = None):
        self._async = AsyncClient(endpoint, timeout=timeout, curve=curve)
        self._loop = new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pdserve-client", daemon=True)
        self._thread.start()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self, coro, timeout: float | None = None):
        if not self._thread.is_alive():
            coro.close()
            raise Unavailable(P.ERR_UNAVAILABLE, CLOSED)
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def generate(self, prompt: str | None = None, **kwargs: Any) -> Iterator[StreamChunk]:
        async def start():
            return self._async.generate(prompt, **kwargs)
        return _SyncStream(self, self._run(start()))

    def complete(self, prompt: str | None = None, **kwargs: Any) -> Completion:
        return self._run(self._async.complete(prompt, **kwargs))

    def chat(self, messages: list[dict] | str, **kwargs: Any) -> Iterator[StreamChunk]:
        return self.generate(messages=as_messages(messages), **kwargs)

    def chat_complete(self, messages: list[dict] | str, **kwargs: Any) -> Completion:
        return self._run(self._async.chat_complete(messages, **kwargs))

    def status(self) -> dict:
        return self._run(self._async.status())

    def scale(self, *, prefill: int | None = None, decode: int | None = None) -> dict:
        return self._run(self._async.scale(prefill=prefill, decode=decode))

    def close(self) -> None:
        if self._thread.is_alive():
            self._run(self._async.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()


class _SyncStream:
    def __init__(self, client: Client, stream: AsyncStream):
        self._client, self._stream = client, stream

    def __iter__(self) -> "_SyncStream":
        return self

    def __next__(self) -> StreamChunk:
        if self._stream._done:
            raise StopIteration
        try:
            return self._client._run(self._stream.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None

    def close(self) -> None:
        """Stop early: cancels the request on the server (dropping the iterator does too)."""
        if self._client._thread.is_alive():
            self._client._run(self._stream.aclose())
