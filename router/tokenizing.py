"""Long text prompts are tokenized on a thread, so a 4 MiB prompt never stalls the router loop.

One thread, in arrival order; at most ``limit`` prompts wait or run there (past it: the caller
refuses with ``overloaded``). A job is keyed by (client routing id, client rid) and lives only
here until its ids are back: a Cancel marks it (the request is then admitted and aborted, so
the client gets its usual final abort chunk) and a disconnect drops it without an answer.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, TypeVar

from router import protocol as P

T = TypeVar("T")


class TokenizerFull(Exception):
    """``limit`` prompts are already waiting for the tokenizer thread."""


@dataclass(eq=False)
class TokenizeJob:
    """A Generate whose text prompt is being tokenized."""
    client: bytes
    msg: P.Generate
    cancelled: bool = False   # the client cancelled it: abort it once admitted
    gone: bool = False        # the client disconnected: drop it silently


class PromptTokenizer:
    """Tokenizes prompts off the loop; ``on_done(job, ids_or_exception)`` runs on the loop."""

    def __init__(self, limit: int, on_done: Callable[[TokenizeJob, "list[int] | Exception"], None]):
        self.limit = limit
        self.on_done = on_done
        self.jobs: dict[tuple[bytes, str], TokenizeJob] = {}
        self.num_side_jobs = 0  # ``run`` calls not finished on the thread
        self._thread: ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        return len(self.jobs) + self.num_side_jobs

    def __contains__(self, key: tuple[bytes, str]) -> bool:
        return key in self.jobs

    @property
    def is_full(self) -> bool:
        return len(self.jobs) >= self.limit

    def _executor(self) -> ThreadPoolExecutor:
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="pdserve-tokenize")
        return self._thread

    def start(self, client: bytes, msg: P.Generate, encode: Callable[[], list[int]]) -> None:
        """Run ``encode()`` (``msg``'s prompt or chat to token ids) on the thread; call from the loop."""
        job = self.jobs[(client, msg.rid)] = TokenizeJob(client, msg)
        future = asyncio.get_running_loop().run_in_executor(self._executor(), encode)
        future.add_done_callback(lambda f: self._done(job, f))

    def run(self, fn: Callable[..., T], *args) -> asyncio.Future[T]:
        """Run ``fn(*args)`` on the tokenizer thread, behind the prompts already there (the
        HTTP gateway's chat templates and long text prompts). It counts toward ``limit`` until
        it has finished on the thread, even if the caller stops waiting. Raises TokenizerFull
        when ``limit`` jobs are already waiting or running."""
        if self.is_full:
            raise TokenizerFull(f"{len(self)} long prompts are already being tokenized (the limit); retry later")
        self.num_side_jobs += 1
        future = asyncio.get_running_loop().run_in_executor(self._executor(), fn, *args)
        future.add_done_callback(self._side_done)
        return future

    def _side_done(self, future: asyncio.Future) -> None:
        self.num_side_jobs -= 1

    def _done(self, job: TokenizeJob, future: asyncio.Future) -> None:
        if self.jobs.get((job.client, job.msg.rid)) is job:
            del self.jobs[(job.client, job.msg.rid)]
        if job.gone or future.cancelled():
            return
        exc = future.exception()
        self.on_done(job, exc if exc is not None else future.result())

    def cancel(self, client: bytes, client_rid: str) -> bool:
        job = self.jobs.get((client, client_rid))
        if job is not None:
            job.cancelled = True
        return job is not None

    def client_gone(self, client: bytes) -> None:
        for key in [k for k in self.jobs if k[0] == client]:
            self.jobs.pop(key).gone = True

    def close(self) -> list[TokenizeJob]:
        """Stop; returns the jobs whose clients still wait for an answer."""
        waiting = [job for job in self.jobs.values() if not job.gone]
        self.jobs.clear()
        if self._thread is not None:
            self._thread.shutdown(wait=False, cancel_futures=True)
        return waiting
