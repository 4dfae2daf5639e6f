"""``--sweep-rate``: the highest request rate whose SLO attainment stays at or above a target
(DistServe's goodput), found with a bounded number of runs.

Search: measure at the start rate; while runs pass, double the rate (while they fail, halve it)
until the outcome flips; then bisect between the highest passing and the lowest failing rate
until they are within ``tolerance`` of each other (relative) or the run budget is spent. Every
run is kept, so the caller can report and plot attainment against rate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Awaitable, Callable


@dataclass(frozen=True)
class SweepConfig:
    """``start_rate`` req/s, ``target`` attainment in (0, 1], at most ``max_runs`` runs."""

    start_rate: float = 1.0
    target: float = 0.9
    max_runs: int = 8
    tolerance: float = 0.1

    def __post_init__(self) -> None:
        if not (math.isfinite(self.start_rate) and self.start_rate > 0):
            raise ValueError(f"the sweep's start rate must be a positive finite number of req/s, "
                             f"got {self.start_rate}; set a finite --request-rate to start from")
        if not 0 < self.target <= 1:
            raise ValueError(f"--slo-target must be in (0, 1], got {self.target}")
        if isinstance(self.max_runs, bool) or not isinstance(self.max_runs, int) or self.max_runs < 2:
            raise ValueError(f"--sweep-max-runs must be an integer >= 2, got {self.max_runs!r}")
        if not self.tolerance > 0:
            raise ValueError(f"the sweep tolerance must be positive, got {self.tolerance}")


@dataclass
class SweepOutcome:
    """``best_rate``: highest passing rate (None if none passed); ``runs``: (rate, attainment)
    in the order measured."""

    best_rate: float | None = None
    runs: list[tuple[float, float]] = field(default_factory=list)


async def find_max_rate(measure: Callable[[float], Awaitable[float]], config: SweepConfig) -> SweepOutcome:
    """Search the highest rate with ``await measure(rate) >= config.target`` (see module doc)."""
    outcome = SweepOutcome()
    passing: float | None = None  # highest rate that met the target
    failing: float | None = None  # lowest rate that missed it

    async def run(rate: float) -> bool:
        nonlocal passing, failing
        attainment = await measure(rate)
        outcome.runs.append((rate, attainment))
        if attainment >= config.target:
            passing = rate if passing is None else max(passing, rate)
            return True
        failing = rate if failing is None else min(failing, rate)
        return False

    rate = config.start_rate
    ok = await run(rate)
    while len(outcome.runs) < config.max_runs and (failing is None if ok else passing is None):
        rate = rate * 2 if ok else rate / 2
        ok = await run(rate)
    while (len(outcome.runs) < config.max_runs and passing is not None and failing is not None
           and failing / passing > 1 + config.tolerance):
        await run((passing + failing) / 2)
    outcome.best_rate = passing
    return outcome
