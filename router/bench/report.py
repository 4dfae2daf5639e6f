"""Output of the load test: progress bar, comparison table, JSON file and plot.

JSON layout (``--json PATH``): against ``--endpoint`` one flat object with the run's parameters
and its metrics (the keys of ``metrics.summarize`` plus ``errors``); with ``--spawn`` the
parameters at the top and ``"configs": {name: metrics}``, one object per configuration.
With ``--sweep-rate`` each configuration's object holds the metrics of its best run (the highest
rate meeting the attainment target, else the lowest rate tried), ``max_rate_at_slo`` and
``sweep``: every run, by rate. JSON has no infinity, so an unbounded rate is written ``"inf"``
(as vLLM does).
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from router.bench.metrics import LATENCY_METRICS, STATISTICS


@dataclass
class ConfigResult:
    """Everything reported about one configuration (one server setup)."""

    name: str
    summary: dict  # the headline run: summarize() keys + request_rate, model, vocab_size, errors
    samples_ms: dict[str, list[float]]  # latency samples of that run, for the CDFs
    sweep: list[dict] = field(default_factory=list)  # one summary per swept rate, by rate
    max_rate_at_slo: float | None = None


class ProgressBar:
    """A one-line carriage-return progress bar, redrawn at most every ``min_interval_s``."""

    def __init__(self, total: int, label: str = "", stream: TextIO = sys.stderr,
                 enabled: bool = True, width: int = 30, min_interval_s: float = 0.1):
        self.total, self.label, self.stream, self.enabled = total, label, stream, enabled
        self.width, self.min_interval_s = width, min_interval_s
        self.num_done = self.num_failed = 0
        self._start = time.monotonic()
        self._last_draw = -math.inf

    def update(self, failed: bool = False) -> None:
        self.num_done += 1
        self.num_failed += failed
        now = time.monotonic()
        if self.enabled and (now - self._last_draw >= self.min_interval_s or self.num_done == self.total):
            self._last_draw = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        filled = self.width * self.num_done // max(self.total, 1)
        rate = self.num_done / max(now - self._start, 1e-9)
        failed = f", {self.num_failed} failed" if self.num_failed else ""
        self.stream.write(f"\r{self.label}[{'#' * filled}{'.' * (self.width - filled)}] "
                          f"{self.num_done}/{self.total} ({rate:.1f} req/s{failed})")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


# -- table ---------------------------------------------------------------------------------
_NAMES = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2EL"}
_STAT_NAMES = {"mean": "Mean", "median": "Median", "p90": "P90", "p99": "P99"}
_TITLES = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st)",
           "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}
_ROWS = [("Successful requests", "completed", "{:d}"),
         ("Failed requests", "failed", "{:d}"),
         ("Request rate (req/s)", "request_rate", "{:g}"),
         ("Benchmark duration (s)", "duration_s", "{:.2f}"),
         ("Total input tokens", "total_input_tokens", "{:d}"),
         ("Total generated tokens", "total_output_tokens", "{:d}"),
         ("Request throughput (req/s)", "request_throughput", "{:.2f}"),
         ("Output token throughput (tok/s)", "output_throughput", "{:.2f}"),
         ("Total token throughput (tok/s)", "total_token_throughput", "{:.2f}"),
         ("Goodput (req/s)", "goodput", "{:.2f}"),
         ("SLO attainment", "slo_attainment", "{:.1%}")]


def _cell(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def format_table(results: list[ConfigResult]) -> str:
    """The comparison table: one row per metric, one column per configuration."""
    rows: list[tuple[str, list[str]] | str] = [
        (label, [_cell(r.summary.get(key), fmt) for r in results]) for label, key, fmt in _ROWS]
    if any(r.sweep for r in results):
        rows.append(("Max rate at SLO target (req/s)",
                     [_cell(r.max_rate_at_slo, "{:.2f}") for r in results]))
        rows.append(("Rates tried", [str(len(r.sweep)) if r.sweep else "-" for r in results]))
    for metric in LATENCY_METRICS:
        rows.append(_TITLES[metric])
        for stat in STATISTICS:
            label = f"{_STAT_NAMES[stat]} {_NAMES[metric]} (ms)"
            rows.append((label, [_cell(r.summary.get(f"{stat}_{metric}_ms"), "{:.2f}") for r in results]))
    label_width = max(len(row[0]) for row in rows if isinstance(row, tuple))
    column_width = max([12] + [len(r.name) for r in results]
                       + [len(cell) for row in rows if isinstance(row, tuple) for cell in row[1]])
    total_width = label_width + (column_width + 2) * len(results)
    lines = [" Serving Benchmark Result ".center(total_width, "="),
             " " * label_width + "".join(r.name.rjust(column_width + 2) for r in results)]
    for row in rows:
        if isinstance(row, str):
            lines.append(f" {row} ".center(total_width, "-"))
        else:
            lines.append(row[0].ljust(label_width) + "".join(c.rjust(column_width + 2) for c in row[1]))
    lines.append("=" * total_width)
    return "\n".join(lines)


# -- JSON ----------------------------------------------------------------------------------
def json_safe(value):
    """Replace infinities (not JSON) by the string "inf", recursively."""
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def config_json(result: ConfigResult) -> dict:
    obj = dict(result.summary)
    if result.sweep:
        obj["max_rate_at_slo"] = result.max_rate_at_slo
        obj["sweep"] = result.sweep
    return obj


def results_json(params: dict, results: list[ConfigResult], compare: bool) -> dict:
    """The ``--json`` object (layout in the module docstring)."""
    if compare:
        return json_safe({**params, "configs": {r.name: config_json(r) for r in results}})
    return json_safe({**params, **config_json(results[0])})


def write_json(path: str | Path, obj: dict) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n", encoding="utf-8")


# -- plot ----------------------------------------------------------------------------------
class PlotUnavailable(RuntimeError):
    """--plot was asked for but matplotlib is not installed."""


def check_plot_available(path: str | Path | None = None) -> None:
    """Raise PlotUnavailable (with the install command) when matplotlib is missing, and
    ValueError when it cannot write the image format ``path`` ends in."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotUnavailable("--plot needs matplotlib: install it with "
                              "pip install 'pdserve[plot]' (or pip install matplotlib)") from None
    if path is None:
        return
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    suffix = Path(path).suffix.lstrip(".").lower()
    if suffix and suffix not in formats:  # no suffix: matplotlib writes a PNG
        raise ValueError(f"--plot {path}: matplotlib cannot write .{suffix} files; end the name in .png "
                         f"(or {', '.join('.' + name for name in sorted(formats))})")


def _rate_points(result: ConfigResult) -> list[tuple[float, dict]]:
    """(offered rate, summary) per run; an unbounded rate is placed at the achieved throughput."""
    runs = result.sweep or [result.summary]
    points = []
    for run in runs:
        rate = run["request_rate"]
        points.append((run["request_throughput"] if math.isinf(rate) else rate, run))
    return sorted(points, key=lambda point: point[0])


def plot_results(path: str | Path, results: list[ConfigResult], slo_target: float | None = None) -> None:
    """Latency CDFs (TTFT, TPOT, ITL, E2EL) and goodput / SLO attainment against request rate,
    one line per configuration, to a PNG; ``slo_target`` is marked on the attainment axis.
    Raises PlotUnavailable."""
    check_plot_available()
    import matplotlib
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    for ax, metric in zip(axes.flat, LATENCY_METRICS):
        for result in results:
            samples = np.sort(np.asarray(result.samples_ms[metric]))
            if samples.size:  # the empirical CDF, rising from 0 at the smallest sample
                ax.step(np.concatenate((samples[:1], samples)),
                        np.arange(samples.size + 1) / samples.size, where="post", label=result.name)
        ax.set(title=f"{_NAMES[metric]} CDF", xlabel="ms", ylabel="fraction of samples", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax, key, label in ((axes.flat[4], "goodput", "goodput (req/s)"),
                           (axes.flat[5], "slo_attainment", "SLO attainment")):
        for result in results:
            points = _rate_points(result)
            ax.plot([p[0] for p in points], [p[1][key] for p in points], marker="o", label=result.name)
        ax.set(title=f"{label} vs request rate", xlabel="request rate (req/s)", ylabel=label)
        if key == "slo_attainment" and slo_target is not None:
            ax.axhline(slo_target, color="gray", linestyle="--", label=f"target {slo_target:g}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
