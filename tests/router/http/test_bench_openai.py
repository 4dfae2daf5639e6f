"""``pdserve bench --backend openai|openai-chat`` against the HTTP gateway: the same workload
as the ZMQ backend, with exact token counts from the servers' usage."""
from __future__ import annotations

import argparse
import json

import pytest

from router.bench.main import add_arguments, run
from tests.router.http.conftest import MODEL_NAME

pytestmark = pytest.mark.slow
WORKLOAD = ["--input-len", "12", "--output-len", "5", "--ignore-eos", "--num-warmups", "1",
            "--num-prompts", "6", "--timeout", "60", "--no-progress"]


@pytest.mark.parametrize("backend", ["openai", "openai-chat", "zmq"])
def test_backends_run_the_same_workload(http_cluster, backend, tmp_path):
    out = tmp_path / "result.json"
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    target = (["--endpoint", http_cluster.endpoint] if backend == "zmq" else
              ["--backend", backend, "--base-url", http_cluster.http_url, "--model", MODEL_NAME])
    assert run(parser.parse_args([*target, "--json", str(out), *WORKLOAD])) == 0
    result = json.loads(out.read_text())
    assert (result["completed"], result["failed"]) == (6, 0), result["errors"]
    assert result["total_output_tokens"] == 6 * 5
    assert result["p99_itl_ms"] >= result["median_itl_ms"] > 0
    if backend != "openai-chat":  # chat prompts are text, tokenized through the template
        assert result["total_input_tokens"] == 6 * 12


def test_bench_reports_an_unreachable_server(capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--backend", "openai", "--base-url", "http://127.0.0.1:9", *WORKLOAD])
    assert run(args) == 1
    assert "cannot reach http://127.0.0.1:9" in capsys.readouterr().err
