"""The arrival process: configured mean rate and burstiness, checked statistically (fixed seed)."""
import asyncio
import math
import time

import numpy as np
import pytest

from router.bench.arrivals import LoadShape, arrival_offsets, paced

NUM_REQUESTS = 40_000


@pytest.mark.parametrize("rate", [2.0, 50.0, 3000.0])
@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_gaps_have_the_configured_mean_and_coefficient_of_variation(rate, burstiness):
    offsets = arrival_offsets(NUM_REQUESTS, LoadShape(rate, burstiness), seed=0)
    gaps = np.diff(offsets)
    assert offsets[0] == 0.0 and np.all(gaps >= 0)
    # standard error of the mean gap is cv / sqrt(n) <= 2 / 200 = 1%: 4% is beyond 4 sigma
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.04)
    assert (NUM_REQUESTS - 1) / offsets[-1] == pytest.approx(rate, rel=0.04)
    # gamma(shape k): cv = 1 / sqrt(k); burstiness 1 is Poisson (exponential gaps, cv 1)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)


def test_poisson_counts_per_window_have_variance_equal_to_mean():
    offsets = arrival_offsets(NUM_REQUESTS, LoadShape(100.0, 1.0), seed=3)
    counts = np.bincount(offsets.astype(int))[:-1]  # arrivals per full second
    assert counts.mean() == pytest.approx(100, rel=0.03)
    assert counts.var() / counts.mean() == pytest.approx(1.0, abs=0.2)


def test_schedule_is_reproducible_from_the_seed():
    shape = LoadShape(10.0, 0.5)
    assert np.array_equal(arrival_offsets(100, shape, seed=7), arrival_offsets(100, shape, seed=7))
    assert not np.array_equal(arrival_offsets(100, shape, seed=7), arrival_offsets(100, shape, seed=8))


def test_infinite_rate_sends_everything_at_once():
    assert arrival_offsets(5, LoadShape(), seed=0).tolist() == [0.0] * 5
    assert arrival_offsets(0, LoadShape(4.0), seed=0).tolist() == []


@pytest.mark.parametrize("kwargs, match", [
    (dict(request_rate=0.0), "--request-rate must be a positive"),
    (dict(request_rate=float("nan")), "--request-rate"),
    (dict(burstiness=0.0), "--burstiness must be a positive"),
    (dict(burstiness=float("inf")), "--burstiness"),
    (dict(max_concurrency=0), "--max-concurrency must be a positive integer"),
    (dict(max_concurrency=2.5), "--max-concurrency"),
])
def test_bad_shapes_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoadShape(**kwargs)


def test_paced_yields_in_order_and_never_early():
    offsets = np.array([0.0, 0.01, 0.01, 0.03])

    async def collect():
        start = time.perf_counter()
        return [(index, time.perf_counter() - start) async for index in paced(offsets, start)]

    sent = asyncio.run(collect())
    assert [index for index, _ in sent] == [0, 1, 2, 3]
    # asyncio may wake up to one clock tick early; allow 2 ms
    assert all(elapsed >= offsets[index] - 0.002 for index, elapsed in sent)
