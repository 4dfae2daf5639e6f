"""Client-side serving metrics, with the definitions of vLLM's serving benchmark.

Per completed request (times on the client, from the moment the request was sent):
- TTFT: until the first chunk that carries tokens;
- ITL: the gap between consecutive token-carrying chunks (one value per chunk after the first;
  all requests' gaps are pooled before taking statistics);
- E2EL: until the final chunk (the one with the finish reason);
- TPOT = (E2EL - TTFT) / (output_len - 1); a request that generated a single token has no TPOT
  and is left out of the TPOT statistics (for goodput its TPOT counts as 0, as in vLLM).

Statistics: mean, median, p90 and p99 (numpy's linear interpolation), in milliseconds; ``None``
when there is no sample (for example TPOT when every request generated one token).

Throughput over the run's duration: completed requests/s, generated tokens/s, and prompt plus
generated tokens/s (completed requests only).

Goodput (DistServe): completed requests/s that met every SLO given (``ttft <= slo_ttft_ms`` and
``tpot <= slo_tpot_ms``). SLO attainment: the fraction of all requests sent, failed ones included,
that completed within the SLOs. With no SLO given every completed request counts as good: goodput
equals the request throughput and attainment is the fraction that completed (1.0 when none failed).

Everything here is a pure function of the recorded timestamps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
STATISTICS = ("mean", "median", "p90", "p99")


@dataclass(frozen=True)
class SLO:
    """Latency objectives in milliseconds; ``None`` = no objective on that metric."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None

    def __post_init__(self) -> None:
        for name in ("ttft_ms", "tpot_ms"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"--slo-{name.replace('_', '-')} must be a positive number of "
                                 f"milliseconds, got {value}")

    @property
    def is_set(self) -> bool:
        return self.ttft_ms is not None or self.tpot_ms is not None


@dataclass
class RequestRecord:
    """What the load generator saw of one request (``time.perf_counter`` seconds).

    ``chunk_times``: arrival of every chunk that carried tokens. ``end``: arrival of the final
    chunk. ``error`` is set when the request failed (then the times are not used); ``lost``
    when that failure may mean the server is gone (a lost or refused connection), ``invalid``
    when the server refused the request itself (too long a prompt, ...), whatever the load.
    """

    start: float
    chunk_times: list[float] = field(default_factory=list)
    end: float = 0.0
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    error: str | None = None
    lost: bool = False
    invalid: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.start

    @property
    def e2el(self) -> float:
        return self.end - self.start

    @property
    def tpot(self) -> float | None:
        """Seconds per output token after the first; None for a single-token output."""
        if self.num_output_tokens <= 1:
            return None
        return (self.e2el - self.ttft) / (self.num_output_tokens - 1)

    @property
    def itl(self) -> list[float]:
        times = self.chunk_times
        return [later - earlier for earlier, later in zip(times, times[1:])]


def latency_samples_ms(records: list[RequestRecord]) -> dict[str, list[float]]:
    """Per-metric samples in ms over the completed requests (the CDFs are drawn from these)."""
    done = [r for r in records if r.ok]
    return {
        "ttft": [r.ttft * 1000 for r in done],
        "tpot": [r.tpot * 1000 for r in done if r.tpot is not None],
        "itl": [gap * 1000 for r in done for gap in r.itl],
        "e2el": [r.e2el * 1000 for r in done],
    }


def statistics(samples: list[float]) -> dict[str, float | None]:
    """mean, median, p90, p99 of ``samples`` (numpy linear interpolation); None when empty."""
    if not samples:
        return dict.fromkeys(STATISTICS)
    values = np.asarray(samples, dtype=np.float64)
    p50, p90, p99 = np.percentile(values, [50, 90, 99]).tolist()
    return {"mean": float(values.mean()), "median": p50, "p90": p90, "p99": p99}


def meets_slo(record: RequestRecord, slo: SLO) -> bool:
    """Whether a request completed within every given objective (inclusive bounds)."""
    if not record.ok:
        return False
    if slo.ttft_ms is not None and record.ttft * 1000 > slo.ttft_ms:
        return False
    tpot = record.tpot or 0.0
    return slo.tpot_ms is None or tpot * 1000 <= slo.tpot_ms


def summarize(records: list[RequestRecord], duration_s: float, slo: SLO = SLO()) -> dict:
    """The run's metrics under the field's key names (see the module docstring).

    Keys: completed, failed, duration_s, total_input_tokens, total_output_tokens,
    request_throughput, output_throughput, total_token_throughput,
    {mean,median,p90,p99}_{ttft,tpot,itl,e2el}_ms, goodput, slo_attainment.
    Raises ValueError if ``duration_s`` is not positive.
    """
    if not duration_s > 0:
        raise ValueError(f"the run's duration must be positive, got {duration_s}")
    done = [r for r in records if r.ok]
    input_tokens = sum(r.num_prompt_tokens for r in done)
    output_tokens = sum(r.num_output_tokens for r in done)
    num_good = sum(meets_slo(r, slo) for r in done)
    result: dict = {
        "completed": len(done),
        "failed": len(records) - len(done),
        "duration_s": duration_s,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(done) / duration_s,
        "output_throughput": output_tokens / duration_s,
        "total_token_throughput": (input_tokens + output_tokens) / duration_s,
    }
    for metric, samples in latency_samples_ms(records).items():
        for stat, value in statistics(samples).items():
            result[f"{stat}_{metric}_ms"] = value
    result["goodput"] = num_good / duration_s
    result["slo_attainment"] = num_good / len(records) if records else None
    return result


def error_counts(records: list[RequestRecord]) -> dict[str, int]:
    """How many requests failed with each error message, most frequent first."""
    counts: dict[str, int] = {}
    for record in records:
        if record.error is not None:
            counts[record.error] = counts.get(record.error, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: -item[1]))
