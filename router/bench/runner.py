"""The load generator: sends a precomputed workload over one client connection on a schedule.

One ``AsyncClient`` (one socket) carries every request; each request is one task that only
records timestamps (perf_counter per token-carrying chunk) and token counts, so the generator
stays far below the server's cost per request even at thousands of requests/s. Nothing is printed
per token; the progress bar is redrawn at a bounded rate.

A request counts as failed when the client raises (server error, timeout, lost connection), when
the server aborts it, or when its stream ends without a finish reason or without a token; the
error messages are kept for the summary.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Callable, Coroutine, TypeVar

from router.bench.arrivals import LoadShape, arrival_offsets, paced
from router.bench.metrics import RequestRecord
from router.bench.workload import BenchRequest
from router.client import AsyncClient

T = TypeVar("T")


@dataclass
class RunResult:
    """One measured run: a record per request (workload order) and the wall time it took."""

    records: list[RequestRecord]
    duration_s: float


async def send_request(client: AsyncClient, request: BenchRequest, sampling: dict[str, Any]) -> RequestRecord:
    """Send one request, stream its answer, and record when each chunk arrived. Never raises
    for a failed request: the record carries the error instead."""
    record = RequestRecord(start=time.perf_counter(),
                           num_prompt_tokens=len(request.prompt_token_ids or ()))
    finish_reason = None
    try:
        async for chunk in client.generate(request.prompt, prompt_token_ids=request.prompt_token_ids,
                                           max_tokens=request.output_len, **sampling):
            now = time.perf_counter()
            if chunk.token_ids:
                record.chunk_times.append(now)
                record.num_output_tokens += len(chunk.token_ids)
            if chunk.num_prompt_tokens:
                record.num_prompt_tokens = chunk.num_prompt_tokens
            if chunk.finish_reason is not None:
                record.end = now
                finish_reason = chunk.finish_reason
    except Exception as exc:  # any failure of one request is that request's result, not the run's
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
    runs from the first send to the end of the last request.
    """
    offsets = arrival_offsets(len(requests), shape, seed)
    slots = asyncio.Semaphore(shape.max_concurrency) if shape.max_concurrency else None
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[RequestRecord]] = []

    def finished(task: asyncio.Task[RequestRecord]) -> None:
        if slots is not None:
            slots.release()
        if on_done is not None and not task.cancelled():
            on_done(task.result())

    start = time.perf_counter()
    try:
        async for index in paced(offsets, start):
            if slots is not None:
                await slots.acquire()
            task = loop.create_task(send_request(client, requests[index], sampling))
            task.add_done_callback(finished)
            tasks.append(task)
        records = await asyncio.gather(*tasks)
    finally:  # interrupted (Ctrl-C, cancelled): leave no request task behind
        for task in tasks:
            task.cancel()
    return RunResult(list(records), time.perf_counter() - start)


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
