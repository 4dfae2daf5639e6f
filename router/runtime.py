"""Running a Router: as the main program (``pdserve router``) or in a background thread
(``LocalCluster``, tests, benchmarks). Both run the loop on uvloop when it is installed."""
from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from typing import Any, Callable

from router.config import RouterConfig
from router.model_info import ModelInfo
from router.server import Router

log = logging.getLogger("pdserve.router")


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


async def _start_http(router: Router, http):
    """The HTTP gateway, imported only when HTTP is on (it loads Starlette and uvicorn)."""
    if http is None:
        return None
    from router.http.gateway import start_http
    try:
        return await start_http(router, http)
    except BaseException:
        router.close()
        raise


def run_router(config: RouterConfig, on_ready: Callable[[Router], None] | None = None, *,
               stop_workers: bool = False, http=None) -> None:
    """Serve until SIGINT/SIGTERM, then close. Workers keep running and re-register with the
    next router, unless ``stop_workers`` (they get Shutdown). ``http``: an HttpConfig to serve
    the OpenAI-compatible API too. Raises ValueError when the router cannot start."""

    async def main() -> None:
        router = Router(config)
        router.start()
        gateway = await _start_http(router, http)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if on_ready is not None:
            on_ready(router)
        await stop.wait()
        log.info("router stopping")
        if stop_workers:
            await _shut_down_workers(router)
        router.close(stop_workers=stop_workers)
        if gateway is not None:
            await gateway.close()

    loop = new_event_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


async def _shut_down_workers(router: Router, timeout_s: float = 2.0) -> None:
    """Send the workers their Shutdown and wait (up to ``timeout_s``) until each has hung up:
    closing the sockets at once could drop a Shutdown a worker had not read yet."""
    router.stop_workers()
    deadline = time.monotonic() + timeout_s
    while router.registry.alive() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


class RouterThread:
    """A Router on its own event loop in a daemon thread."""

    def __init__(self, config: RouterConfig, model: ModelInfo | None = None, http=None):
        self.config = config
        self._model = model
        self._http = http  # an HttpConfig, or None for no HTTP
        self.gateway = None
        self._loop = new_event_loop()
        self._thread = threading.Thread(target=self._run, name="pdserve-router", daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.router: Router | None = None

    def start(self, timeout_s: float = 60.0) -> "RouterThread":
        """Start serving; raises the router's start error (ValueError) if it cannot bind."""
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise RuntimeError(f"the router did not start within {timeout_s:g}s")
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self.router = Router(self.config, self._model)
            self._loop.run_until_complete(self._start())
        except BaseException as exc:  # reported to start()'s caller
            self._error = exc
            self._ready.set()
            self._loop.close()
            return
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    async def _start(self) -> None:
        self.router.start()
        self.gateway = await _start_http(self.router, self._http)

    def call(self, fn: Callable[..., Any], *args: Any, timeout_s: float = 10.0) -> Any:
        """Run ``fn(*args)`` on the router's loop and return its result (thread-safe)."""
        async def wrapper():
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(wrapper(), self._loop).result(timeout_s)

    def post(self, fn: Callable[[Router], Any]) -> None:
        """Run ``fn(router)`` on the router's loop soon, without waiting (thread-safe)."""
        self._loop.call_soon_threadsafe(fn, self.router)

    def stop(self, stop_workers: bool = True) -> None:
        """Close the router (telling workers to shut down if ``stop_workers``) and the thread.
        Never raises: a failure to close cleanly is logged and the thread is stopped anyway."""
        if not self._thread.is_alive():
            return
        try:
            self.call(self.router.close, stop_workers)
            if self.gateway is not None:
                asyncio.run_coroutine_threadsafe(self.gateway.close(), self._loop).result(10)
        except Exception:
            log.exception("stopping the router")
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
