"""Named pause points: a test hook that holds one request at an exact stage of its life, so a
test can cancel it there with timing that cannot miss.

Inert unless armed. A worker started with ``PDSERVE_PAUSE_AT=point[,point...]`` (names from
``POINTS``) and ``PDSERVE_PAUSE_DIR=DIR`` arms those points; every other worker pays one set
lookup per point passed (``ENABLED`` guards the call sites that would compute a request id).

Protocol, with files in DIR (written by the test, read by the worker):
- the test creates ``<point>.go``; the next thread to pass ``point`` claims it by removing it
  (one pause per file, so other requests pass freely);
- the claiming thread writes ``<point>.reached`` (``"<rid> <pid>"``) and blocks (or, on the
  event loop, awaits) until ``<point>.release`` exists, removes it and goes on;
- ``note(point, rid)`` marks an event without waiting: it creates ``<point>.<rid>.<pid>``.
A pause ends by itself after ``MAX_PAUSE_S`` (with a warning), so a test that died never leaves
a worker held for good.

Where the points are (each in the thread named):
- ``allocate``: decode/both event loop, the reservation made and ``Allocated`` not yet sent
  (the loop is blocked, as a slow reservation would block it: heartbeats stop meanwhile, so
  keep such a pause under the router's heartbeat timeout and the link's 3 s router timeout);
- ``prefill_queued``: the step loop, before planning, while a prompt no step has run waits;
- ``mid_chunk`` / ``last_chunk``: the model thread, before a step with a chunk of a prompt that
  is neither its first nor its last / that is its last;
- ``kv_in_flight``: the prefill rank's KV sender thread, after a batch of layers went out;
- ``decoding``: the model thread, before a step with a running sequence;
- ``finishing``: the step loop, after a step that ended a sequence, before its last token is sent;
- ``free`` (a note): a worker handled the router's ``Free`` for ``rid``.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time

log = logging.getLogger("pdserve.pause")

POINTS = frozenset({"allocate", "prefill_queued", "mid_chunk", "last_chunk", "kv_in_flight",
                    "decoding", "finishing", "free"})
MAX_PAUSE_S = 300.0
POLL_S = 0.005


def _armed_points(environ) -> tuple[frozenset, str]:
    names = frozenset(p.strip() for p in environ.get("PDSERVE_PAUSE_AT", "").split(",") if p.strip())
    unknown = names - POINTS
    if unknown:
        raise ValueError(f"PDSERVE_PAUSE_AT names unknown pause points {sorted(unknown)}; "
                         f"known: {sorted(POINTS)}")
    directory = environ.get("PDSERVE_PAUSE_DIR", "")
    if names and not os.path.isdir(directory):
        raise ValueError(f"PDSERVE_PAUSE_AT needs PDSERVE_PAUSE_DIR naming an existing directory, "
                         f"got {directory!r}")
    return names, directory


ARMED, DIRECTORY = _armed_points(os.environ)
ENABLED = bool(ARMED)


class _Hold:
    """A claimed pause: over once the test's release file appears (or after MAX_PAUSE_S)."""

    def __init__(self, point: str):
        self.point = point
        self.release = os.path.join(DIRECTORY, f"{point}.release")
        self.since = time.monotonic()

    def is_over(self) -> bool:
        try:
            os.unlink(self.release)
            return True
        except FileNotFoundError:
            if time.monotonic() - self.since > MAX_PAUSE_S:
                log.warning("pause point %s was not released within %gs; going on", self.point, MAX_PAUSE_S)
                return True
            return False


def _claim(point: str, rid: str) -> _Hold | None:
    """A hold if ``point`` is armed and this thread took its one-shot trigger."""
    if point not in ARMED:
        return None
    try:
        os.unlink(os.path.join(DIRECTORY, f"{point}.go"))
    except FileNotFoundError:
        return None
    reached = os.path.join(DIRECTORY, f"{point}.reached")
    with open(f"{reached}.{os.getpid()}.tmp", "w") as f:
        f.write(f"{rid} {os.getpid()}\n")
    os.replace(f"{reached}.{os.getpid()}.tmp", reached)   # the test never reads half a line
    return _Hold(point)


def pause(point: str, rid: str) -> None:
    """Block this thread at ``point`` if it is armed and its trigger is set (see module doc)."""
    hold = _claim(point, rid)
    while hold is not None and not hold.is_over():
        time.sleep(POLL_S)


async def pause_async(point: str, rid: str) -> None:
    """``pause`` for the event loop: awaits, so sockets and heartbeats keep being served."""
    hold = _claim(point, rid)
    while hold is not None and not hold.is_over():
        await asyncio.sleep(POLL_S)


def pause_chunks(chunks) -> None:
    """The model thread's chunk points for a step's prefill chunks (``ScheduledChunk``s)."""
    for chunk in chunks:
        if chunk.is_last:
            pause("last_chunk", chunk.request.rid)
        elif chunk.start > 0:
            pause("mid_chunk", chunk.request.rid)


def note(point: str, rid: str) -> None:
    """Mark that ``point`` happened for ``rid`` (never waits)."""
    if point in ARMED:
        open(os.path.join(DIRECTORY, f"{point}.{rid}.{os.getpid()}"), "w").close()
