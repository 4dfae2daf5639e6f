"""Report output: the comparison table, the JSON layout, the progress bar and the plot."""
import importlib.util
import io
import json
import math
import re

import pytest

from router.bench.metrics import RequestRecord, latency_samples_ms, summarize
from router.bench.report import (ConfigResult, PlotUnavailable, ProgressBar, format_table, plot_results,
                                 results_json, write_json)

HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def _result(name, ttft_s, rate=math.inf, sweep=()):
    records = [RequestRecord(start=0.0, chunk_times=[ttft_s, ttft_s + 0.25], end=ttft_s + 0.25,
                             num_prompt_tokens=8, num_output_tokens=2),
               RequestRecord(start=0.5, chunk_times=[0.5 + ttft_s], end=0.5 + ttft_s,
                             num_prompt_tokens=8, num_output_tokens=1)]
    summary = summarize(records, duration_s=2.0)
    summary.update(request_rate=rate, errors={})
    return ConfigResult(name, summary, latency_samples_ms(records), sweep=list(sweep),
                        max_rate_at_slo=rate if sweep else None)


def test_table_has_one_column_per_configuration():
    table = format_table([_result("disagg:1p1d", 0.125), _result("colocated:2", 0.5)])
    lines = table.splitlines()
    assert "Serving Benchmark Result" in lines[0]
    assert lines[1].split() == ["disagg:1p1d", "colocated:2"]
    row = {cells[0]: cells[1:] for cells in (re.split(r"\s{2,}", line) for line in lines[2:])}
    assert row["Successful requests"] == ["2", "2"]
    assert row["Request rate (req/s)"] == ["inf", "inf"]
    assert row["Mean TTFT (ms)"] == ["125.00", "500.00"]
    assert row["P99 ITL (ms)"] == ["250.00", "250.00"]
    assert row["SLO attainment"] == ["100.0%", "100.0%"]
    assert "Max rate at SLO target (req/s)" not in table


def test_table_shows_missing_values_and_sweep_rows():
    result = _result("a", 0.25, rate=4.0, sweep=[{"request_rate": 4.0}])
    result.summary["mean_tpot_ms"] = None
    table = format_table([result])
    assert [line.split()[-1] for line in table.splitlines() if line.startswith("Mean TPOT")] == ["-"]
    assert [line.split()[-1] for line in table.splitlines() if line.startswith("Max rate at SLO")] == ["4.00"]


def test_json_flat_for_one_endpoint_and_per_config_when_comparing(tmp_path):
    params = {"num_prompts": 2, "request_rate": math.inf}
    flat = results_json(params, [_result("tcp://x", 0.125)], compare=False)
    assert flat["num_prompts"] == 2 and flat["request_rate"] == "inf"
    assert flat["completed"] == 2 and flat["mean_ttft_ms"] == 125.0 and "configs" not in flat
    compared = results_json(params, [_result("disagg:1p1d", 0.125, rate=2.0, sweep=[{"request_rate": 2.0}]),
                                     _result("colocated:2", 0.5)], compare=True)
    assert list(compared["configs"]) == ["disagg:1p1d", "colocated:2"]
    assert compared["configs"]["disagg:1p1d"]["max_rate_at_slo"] == 2.0
    assert compared["configs"]["disagg:1p1d"]["sweep"] == [{"request_rate": 2.0}]
    assert "sweep" not in compared["configs"]["colocated:2"]
    path = tmp_path / "out.json"
    write_json(path, compared)
    assert json.loads(path.read_text()) == compared  # strict JSON: no Infinity / NaN


def test_progress_bar_draws_to_its_stream_and_ends_the_line():
    stream = io.StringIO()
    bar = ProgressBar(3, "[x] ", stream=stream, width=6, min_interval_s=0.0)
    for failed in (False, True, False):
        bar.update(failed)
    bar.close()
    text = stream.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n")
    assert "[x] [######] 3/3 (" in text and "1 failed" in text
    quiet = io.StringIO()
    bar = ProgressBar(3, stream=quiet, enabled=False)
    bar.update()
    bar.close()
    assert quiet.getvalue() == ""


@pytest.mark.skipif(HAVE_MATPLOTLIB, reason="matplotlib is installed")
def test_plot_without_matplotlib_says_how_to_install(tmp_path):
    with pytest.raises(PlotUnavailable, match=r"pip install 'pdserve\[plot\]'"):
        plot_results(tmp_path / "p.png", [_result("a", 0.125)])


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="the plot extra (matplotlib) is not installed")
def test_plot_writes_a_png(tmp_path):
    path = tmp_path / "p.png"
    sweep = [{"request_rate": 1.0, "request_throughput": 1.0, "goodput": 1.0, "slo_attainment": 1.0},
             {"request_rate": 2.0, "request_throughput": 1.8, "goodput": 1.5, "slo_attainment": 0.8}]
    plot_results(path, [_result("disagg:1p1d", 0.125, rate=1.0, sweep=sweep), _result("colocated:2", 0.5)])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
