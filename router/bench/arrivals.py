"""When the load test sends each request: an open loop (Poisson / gamma arrivals) or a closed loop.

Open loop, as vLLM's serving benchmark: the gaps between consecutive requests are drawn from a
gamma distribution with ``shape = burstiness`` and ``scale = 1 / (rate * burstiness)``, so the mean
gap is ``1 / rate`` whatever the burstiness, and the coefficient of variation of the gaps is
``1 / sqrt(burstiness)``. ``burstiness = 1`` is a Poisson process; below 1 the arrivals clump
together, above 1 they are more evenly spaced. ``rate = inf`` sends every request at once.

Closed loop: ``max_concurrency`` caps the requests in flight (a new one starts when one ends).
Both can apply at once: requests arrive at ``rate`` and wait for a free slot.

The whole schedule is drawn up front from ``seed`` (precomputed offsets from the start of the
run), so two runs with the same seed offer exactly the same load, and pacing costs nothing
per request beyond one sleep.
"""
from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import AsyncIterator

import numpy as np

# Independent random streams drawn from one --seed: the workload uses 0, the arrivals 1.
ARRIVAL_STREAM = 1


@dataclass(frozen=True)
class LoadShape:
    """How requests arrive: ``request_rate`` (requests/s, ``inf`` = all at once), ``burstiness``
    (gamma shape of the gaps), ``max_concurrency`` (``None`` = unbounded)."""

    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None

    def __post_init__(self) -> None:
        if math.isnan(self.request_rate) or self.request_rate <= 0:
            raise ValueError(f"--request-rate must be a positive number of requests/s or inf, "
                             f"got {self.request_rate}")
        if not math.isfinite(self.burstiness) or self.burstiness <= 0:
            raise ValueError(f"--burstiness must be a positive finite number (1 = Poisson), "
                             f"got {self.burstiness}")
        if self.max_concurrency is not None and (
                isinstance(self.max_concurrency, bool) or not isinstance(self.max_concurrency, int)
                or self.max_concurrency <= 0):
            raise ValueError(f"--max-concurrency must be a positive integer, got {self.max_concurrency!r}")

    def with_rate(self, request_rate: float) -> "LoadShape":
        return LoadShape(request_rate, self.burstiness, self.max_concurrency)

    def describe(self) -> str:
        rate = "inf" if math.isinf(self.request_rate) else f"{self.request_rate:g}"
        text = f"rate={rate} req/s, burstiness={self.burstiness:g}"
        if self.max_concurrency is not None:
            text += f", max concurrency={self.max_concurrency}"
        return text


def arrival_offsets(num_requests: int, shape: LoadShape, seed: int) -> np.ndarray:
    """Send time of each request, in seconds from the start of the run: ``[num_requests]`` float64.

    The first request goes at 0; request ``i`` goes after ``i`` gamma-distributed gaps.
    """
    if num_requests < 0:
        raise ValueError(f"num_requests must be >= 0, got {num_requests}")
    if math.isinf(shape.request_rate) or num_requests == 0:
        return np.zeros(num_requests)
    rng = np.random.default_rng([seed, ARRIVAL_STREAM])
    gaps = rng.gamma(shape=shape.burstiness, scale=1.0 / (shape.request_rate * shape.burstiness),
                     size=num_requests - 1)
    return np.concatenate(([0.0], np.cumsum(gaps)))


async def paced(offsets: np.ndarray, start: float | None = None) -> AsyncIterator[int]:
    """Yield each request's index once its send time has come (``start`` on the perf_counter
    clock; now if None). Sleeps against the absolute schedule, so lateness never accumulates;
    requests already due are yielded without sleeping."""
    if start is None:
        start = time.perf_counter()
    for index, offset in enumerate(offsets.tolist()):
        delay = start + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        yield index
