"""The rate search: doubling or halving until the outcome flips, then bisection, within budget."""
import asyncio

import pytest

from router.bench.sweep import SweepConfig, find_max_rate


def _search(capacity, config):
    """A server that meets the target exactly up to ``capacity`` req/s."""
    async def measure(rate):
        return 1.0 if rate <= capacity else 0.5
    return asyncio.run(find_max_rate(measure, config))


def test_doubles_then_bisects_within_the_run_budget():
    outcome = _search(5.0, SweepConfig(start_rate=1.0, max_runs=8, tolerance=0.01))
    assert [rate for rate, _ in outcome.runs] == [1, 2, 4, 8, 6, 5, 5.5, 5.25]
    assert outcome.best_rate == 5.0


def test_stops_once_within_tolerance():
    outcome = _search(5.0, SweepConfig(start_rate=1.0, max_runs=20, tolerance=0.25))
    assert [rate for rate, _ in outcome.runs] == [1, 2, 4, 8, 6, 5]
    assert outcome.best_rate == 5.0  # 6 / 5 = 1.2 <= 1.25


def test_halves_when_the_start_rate_fails():
    outcome = _search(1.0, SweepConfig(start_rate=8.0, max_runs=5, tolerance=0.1))
    assert [rate for rate, _ in outcome.runs] == [8, 4, 2, 1, 1.5]
    assert outcome.best_rate == 1.0


def test_reports_none_when_nothing_passes_within_budget():
    outcome = _search(0.01, SweepConfig(start_rate=4.0, max_runs=3))
    assert [rate for rate, _ in outcome.runs] == [4, 2, 1]
    assert outcome.best_rate is None


def test_attainment_at_the_target_passes():
    async def measure(rate):
        return 0.9 if rate <= 3 else 0.89
    outcome = asyncio.run(find_max_rate(measure, SweepConfig(start_rate=3.0, max_runs=2)))
    assert outcome.runs == [(3.0, 0.9), (6.0, 0.89)] and outcome.best_rate == 3.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(start_rate=float("inf")), "set a finite --request-rate"),
    (dict(target=0.0), r"--slo-target must be in \(0, 1\]"),
    (dict(max_runs=1), "--sweep-max-runs must be an integer >= 2"),
])
def test_bad_sweep_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SweepConfig(**kwargs)
