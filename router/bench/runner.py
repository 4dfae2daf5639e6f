"""The load generator: sends a precomputed workload over one client connection on a schedule.

One ``AsyncClient`` (one socket) carries every request; each request is one task that only
records timestamps (perf_counter per token-carrying chunk) and token counts, so the generator
stays far below the server's cost per request even at thousands of requests/s. Nothing is printed
per token; the progress bar is redrawn at a bounded rate.

A request counts as failed when the client raises (server error, timeout, lost connection), when
the server aborts it, or when its stream ends without a finish reason or without a token; the
error messages are kept for the summary.

A watchdog asks the server for its status every ``WATCH_INTERVAL_S`` seconds of the run, and at
once after a failure that may mean the server itself is gone (a lost or refused connection);
when a status request goes unanswered for ``ALIVE_TIMEOUT_S`` and no request heard from the
server meanwhile (a router busy enough to answer status late is still streaming), the run stops
(``ServerGone``)
instead of sending the rest into the void, each request then waiting out its ``--timeout``.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Callable, Coroutine, TypeVar

from router.bench.arrivals import LoadShape, arrival_offsets, paced
from router.bench.metrics import RequestRecord
from router.bench.workload import BenchRequest
from router.client import AsyncClient, ClientTimeout, ServerError, Unavailable
from router.protocol import ERR_INVALID

T = TypeVar("T")
# Seconds the server may take to answer the status probe after a lost connection: a live
# router answers status at once, even when loaded.
ALIVE_TIMEOUT_S = 5.0
WATCH_INTERVAL_S = 5.0
# Failures that may mean the server is gone (the openai backend raises ConnectionError).
_LOST = (Unavailable, ConnectionError)
# Error codes of a request refused for what it is, not for the load (the openai backend's are HTTP).
_INVALID = (ERR_INVALID, "400", "413", "422")


class ServerGone(RuntimeError):
    """The server stopped answering mid-run; ``records`` are those of the requests that ended
    before (workload order, the unsent and cut-off ones left out), ``total`` the run's size."""

    def __init__(self, message: str, records: list[RequestRecord], total: int):
        super().__init__(message)
        self.records, self.total = records, total


@dataclass
class RunResult:
    """One measured run: a record per request (workload order) and the wall time it took."""

    records: list[RequestRecord]
    duration_s: float


class Pulse:
    """When a chunk last arrived for any request (perf_counter seconds): the server's pulse."""

    def __init__(self) -> None:
        self.last = 0.0


async def send_request(client: AsyncClient, request: BenchRequest, sampling: dict[str, Any],
                       pulse: Pulse | None = None) -> RequestRecord:
    """Send one request, stream its answer, and record when each chunk arrived (and in
    ``pulse``). Never raises for a failed request: the record carries the error instead."""
    record = RequestRecord(start=time.perf_counter(),
                           num_prompt_tokens=len(request.prompt_token_ids or ()))
    finish_reason = None
    try:
        async for chunk in client.generate(request.prompt, prompt_token_ids=request.prompt_token_ids,
                                           max_tokens=request.output_len, **sampling):
            now = time.perf_counter()
            if pulse is not None:
                pulse.last = now
            if chunk.token_ids:
                record.chunk_times.append(now)
                record.num_output_tokens += len(chunk.token_ids)
            if chunk.num_prompt_tokens:
                record.num_prompt_tokens = chunk.num_prompt_tokens
            if chunk.finish_reason is not None:
                record.end = now
                finish_reason = chunk.finish_reason
    except Exception as exc:  # any failure of one request is that request's result, not the run's
        record.lost = isinstance(exc, _LOST)
        record.invalid = isinstance(exc, ServerError) and exc.code in _INVALID
        record.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return record
    if finish_reason is None:
        record.error = "the stream ended without a finish reason"
    elif finish_reason == "abort":
        record.error = "aborted by the server"
    elif not record.chunk_times:
        record.error = f"finished ({finish_reason}) without generating a token"
    return record


async def run_load(client: AsyncClient, requests: list[BenchRequest], shape: LoadShape, seed: int,
                   sampling: dict[str, Any],
                   on_done: Callable[[RequestRecord], None] | None = None) -> RunResult:
    """Send ``requests`` paced by ``shape`` (arrival times drawn from ``seed``), wait for all.

    ``on_done`` is called with each record as its request ends (the progress bar). The duration
    runs from the first send to the end of the last request. Raises ServerGone (see the module
    docstring).
    """
    offsets = arrival_offsets(len(requests), shape, seed)
    slots = asyncio.Semaphore(shape.max_concurrency) if shape.max_concurrency else None
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[RequestRecord]] = []

    lost = asyncio.Event()
    pulse = Pulse()

    def finished(task: asyncio.Task[RequestRecord]) -> None:
        if slots is not None:
            slots.release()
        if task.cancelled():
            return
        if task.result().lost:
            lost.set()
        if on_done is not None:
            on_done(task.result())

    async def send_all() -> list[RequestRecord]:
        async for index in paced(offsets, start):
            if slots is not None:
                await slots.acquire()
            task = loop.create_task(send_request(client, requests[index], sampling, pulse))
            task.add_done_callback(finished)
            tasks.append(task)
        return await asyncio.gather(*tasks)

    start = time.perf_counter()
    sender = loop.create_task(send_all())
    watchdog = loop.create_task(_watch(client, lost, pulse))
    watchdog.add_done_callback(lambda done: _gone(done) and sender.cancel())
    try:
        records = await sender
    except asyncio.CancelledError:
        why = _gone(watchdog) if watchdog.done() else None
        if why is None:  # cancelled from outside (Ctrl-C): not ours to swallow
            raise
        ended = [task.result() for task in tasks if task.done() and not task.cancelled()]
        raise ServerGone(why, ended, len(requests)) from None
    finally:  # interrupted (Ctrl-C, cancelled, server gone): leave no request task behind
        sender.cancel()
        watchdog.cancel()
        for task in tasks:
            task.cancel()
    return RunResult(list(records), time.perf_counter() - start)


def _gone(watchdog: asyncio.Task[str | None]) -> str | None:
    return None if watchdog.cancelled() else watchdog.result()


async def _watch(client: AsyncClient, lost: asyncio.Event, pulse: Pulse) -> str:
    """Return why the server is gone, once it is (see the module docstring)."""
    while True:
        try:
            await asyncio.wait_for(lost.wait(), WATCH_INTERVAL_S)
        except TimeoutError:
            pass
        lost.clear()
        heard = pulse.last
        why = await _why_gone(client)
        if why is not None and pulse.last == heard:
            return why


async def _why_gone(client: AsyncClient) -> str | None:
    """None when the server answers a status request within ALIVE_TIMEOUT_S, else why not."""
    try:
        await asyncio.wait_for(client.status(), ALIVE_TIMEOUT_S)
    except (TimeoutError, ClientTimeout):
        return f"the server stopped answering (no status reply within {ALIVE_TIMEOUT_S:g} s)"
    except (Unavailable, ConnectionError) as exc:
        return f"the server is gone ({exc})"
    except Exception:  # it answered, if only with an error: alive
        pass
    return None


async def warm_up(client: AsyncClient, requests: list[BenchRequest], shape: LoadShape,
                  sampling: dict[str, Any]) -> list[RequestRecord]:
    """Send the warm-up requests (at once, within ``shape.max_concurrency``); not measured."""
    if not requests:
        return []
    result = await run_load(client, requests, LoadShape(max_concurrency=shape.max_concurrency), 0, sampling)
    return result.records


def reported_vocab_size(status: dict) -> int | None:
    """The served model's vocabulary size if a status reply reports it (at the top level or one
    level down, e.g. ``status["router"]["vocab_size"]``), else None."""
    for place in [status] + [value for value in status.values() if isinstance(value, dict)]:
        value = place.get("vocab_size")
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def run_event_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop (asyncio's loop where uvloop is not installed)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
