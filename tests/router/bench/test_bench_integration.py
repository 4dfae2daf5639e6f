"""The load test against real clusters of the demo model: spawned configurations compared in one
run, and a running server targeted by endpoint (dataset prompts, rate sweep)."""
import argparse
import json
import subprocess
import sys

import pytest

pytest.importorskip("router.launcher", reason="the local launcher is not part of this tree yet")
from router.bench.main import add_arguments, run  # noqa: E402
from router.bench.metrics import LATENCY_METRICS, STATISTICS  # noqa: E402
from router.launcher import LocalCluster  # noqa: E402

pytestmark = pytest.mark.slow

REQUIRED_KEYS = ["completed", "failed", "duration_s", "request_throughput", "output_throughput",
                 "total_token_throughput", "goodput", "slo_attainment"] + [
    f"{stat}_{metric}_ms" for metric in LATENCY_METRICS for stat in STATISTICS]
# --timeout: a request the server loses fails the test instead of stalling it
WORKLOAD = ["--input-len", "12", "--output-len", "4", "--ignore-eos", "--num-warmups", "1",
            "--timeout", "60", "--slo-ttft-ms", "60000", "--slo-tpot-ms", "60000", "--no-progress"]


def _check_filled(metrics, num_requests, num_output_tokens):
    missing = [key for key in REQUIRED_KEYS if metrics.get(key) is None]
    assert not missing, f"fields not filled: {missing}"
    assert (metrics["completed"], metrics["failed"]) == (num_requests, 0), metrics["errors"]
    assert metrics["total_output_tokens"] == num_output_tokens  # --ignore-eos: exact lengths
    assert metrics["goodput"] == metrics["request_throughput"] and metrics["slo_attainment"] == 1.0
    assert 0 < metrics["mean_ttft_ms"] <= metrics["mean_e2el_ms"]
    assert metrics["p99_itl_ms"] >= metrics["median_itl_ms"] > 0


def test_spawned_configurations_are_compared_in_one_table(tmp_path):
    out = tmp_path / "compare.json"
    proc = subprocess.run(
        [sys.executable, "-m", "router.bench", "--spawn", "disagg:1p1d", "colocated:1",
         "--num-prompts", "6", "--request-rate", "50", "--json", str(out), *WORKLOAD],
        capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    header = proc.stdout.splitlines()[1].split()
    assert header == ["disagg:1p1d", "colocated:1"]
    result = json.loads(out.read_text())
    assert result["spawn"] == ["disagg:1p1d", "colocated:1"] and result["request_rate"] == 50
    assert list(result["configs"]) == ["disagg:1p1d", "colocated:1"]
    for metrics in result["configs"].values():
        _check_filled(metrics, num_requests=6, num_output_tokens=24)
        assert metrics["total_input_tokens"] == 6 * 12


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster("demo", mode="colocated", num_workers=1) as running:
        yield running


def test_endpoint_with_a_dataset_and_a_rate_sweep(cluster, tmp_path):
    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text(json.dumps({"prompt": "Hello, bench!", "output_len": 3}) + "\n"
                       + json.dumps({"prompt_token_ids": [72, 105, 33], "output_len": 5}) + "\n")
    out = tmp_path / "sweep.json"
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--endpoint", cluster.endpoint, "--dataset", str(dataset), "--num-prompts", "4",
                              "--request-rate", "4", "--sweep-rate", "--sweep-max-runs", "2",
                              "--json", str(out), *WORKLOAD])
    assert run(args) == 0
    result = json.loads(out.read_text())
    assert result["endpoint"] == cluster.endpoint and "configs" not in result
    _check_filled(result, num_requests=4, num_output_tokens=2 * (3 + 5))
    # "Hello, bench!" is 13 bytes: 13 tokens (or 14 with BOS) for the byte-level demo tokenizer
    assert result["total_input_tokens"] in (2 * (13 + 3), 2 * (14 + 3))
    # generous SLOs: every run passes, so the search only doubles
    assert [run_["request_rate"] for run_ in result["sweep"]] == [4.0, 8.0]
    assert result["max_rate_at_slo"] == 8.0 and result["request_rate"] == 8.0


def test_requests_the_server_refuses_are_counted_as_failed(cluster, tmp_path, capsys):
    dataset = tmp_path / "mixed.jsonl"
    too_long = [65] * 3000  # past the demo model's 2048-token context: the router refuses it
    dataset.write_text(json.dumps({"prompt_token_ids": [72, 105], "output_len": 3}) + "\n"
                       + json.dumps({"prompt_token_ids": too_long, "output_len": 3}) + "\n")
    out = tmp_path / "mixed.json"
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--endpoint", cluster.endpoint, "--dataset", str(dataset), "--num-prompts", "4",
                              "--num-warmups", "0", "--ignore-eos", "--timeout", "60", "--no-progress",
                              "--json", str(out)])
    assert run(args) == 0
    result = json.loads(out.read_text())
    assert (result["completed"], result["failed"]) == (2, 2)
    assert result["total_input_tokens"] == 4 and result["total_output_tokens"] == 6
    assert result["slo_attainment"] == 0.5  # no SLO: the fraction of requests that completed
    [(message, count)] = result["errors"].items()
    assert count == 2 and "InvalidRequest" in message
    assert f"2 request(s) failed: {message}" in capsys.readouterr().err


def test_many_different_errors_are_summed_up_in_a_few_lines(cluster, tmp_path, capsys):
    # each prompt is refused with its own length in the message: 8 messages, 5 lines + 1
    dataset = tmp_path / "too_long.jsonl"
    dataset.write_text("".join(json.dumps({"prompt_token_ids": [65] * (3000 + i), "output_len": 2}) + "\n"
                               for i in range(8)))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--endpoint", cluster.endpoint, "--dataset", str(dataset), "--num-prompts", "8",
                              "--num-warmups", "0", "--timeout", "60", "--no-progress"])
    assert run(args) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if "failed" in line]
    assert len(lines) == 6, lines
    assert lines[5].endswith("3 more request(s) failed with 3 other message(s); --json PATH keeps them all")
