"""/metrics parsed with prometheus_client moves by exactly what a known workload did; a client
that disconnects mid-stream has its request aborted and its KV freed on every worker."""
from __future__ import annotations

import time

import pytest

from router.client import Client
from tests.router.http.conftest import MODEL_NAME

httpx = pytest.importorskip("httpx2")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

pytestmark = pytest.mark.slow


def scrape(url: str) -> dict:
    """{(sample name, frozenset(labels)): value} of every sample."""
    text = httpx.get(url + "/metrics").text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def delta(before: dict, after: dict, name: str, **labels) -> float:
    key = (name, frozenset(labels.items()))
    return after.get(key, 0.0) - before.get(key, 0.0)


def transport_of(samples: dict) -> str:
    return next(dict(labels)["transport"] for name, labels in samples
                if name == "pdserve:kv_transfer_seconds_count")


def test_counters_move_by_exactly_the_workload(http_cluster):
    url = http_cluster.http_url
    before = scrape(url)
    for prompt in ([40, 41, 42, 43, 44, 45, 46], list(range(50, 59))):  # 7 + 9 prompt tokens
        response = httpx.post(url + "/v1/completions", json={
            "model": MODEL_NAME, "prompt": prompt, "max_tokens": 5, "temperature": 0,
            "ignore_eos": True}, timeout=60)
        assert response.status_code == 200
    stream = httpx.post(url + "/v1/completions", json={
        "prompt": [60, 61, 62], "max_tokens": 4, "stream": True, "ignore_eos": True}, timeout=60)
    assert stream.text.endswith("data: [DONE]\n\n")
    assert httpx.post(url + "/v1/completions", json={"prompt": "x", "top_p": 5}).status_code == 400
    after = scrape(url)
    assert delta(before, after, "pdserve:prompt_tokens_total") == 7 + 9 + 3
    assert delta(before, after, "pdserve:generation_tokens_total") == 5 + 5 + 4
    assert delta(before, after, "pdserve:prefix_cache_queries_total") == 7 + 9 + 3
    assert delta(before, after, "pdserve:request_success_total", finished_reason="length") == 3
    assert delta(before, after, "pdserve:request_failure_total", code="invalid_request") == 1
    assert delta(before, after, "pdserve:time_to_first_token_seconds_count") == 3
    assert delta(before, after, "pdserve:inter_token_latency_seconds_count") == 4 + 4 + 3
    assert delta(before, after, "pdserve:time_per_output_token_seconds_count") == 3
    assert delta(before, after, "pdserve:e2e_request_latency_seconds_count") == 3
    assert delta(before, after, "pdserve:request_queue_time_seconds_count") == 3
    assert delta(before, after, "pdserve:e2e_request_latency_seconds_bucket", le="+Inf") == 3
    transport = transport_of(after)
    assert delta(before, after, "pdserve:kv_transfer_seconds_count", transport=transport) == 3
    assert after[("pdserve:num_requests_running", frozenset())] == 0
    roles = {dict(labels)["role"] for name, labels in after if name == "pdserve:kv_cache_usage_perc"}
    assert roles == {"prefill", "decode"}


def test_disconnect_mid_stream_frees_kv_everywhere(http_cluster):
    from tests.e2e.helpers import wait_all_blocks_free

    url = http_cluster.http_url
    before = scrape(url)
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", url + "/v1/completions", json={
                "prompt": list(range(40, 80)), "max_tokens": 400, "stream": True,
                "ignore_eos": True}) as response:
            lines = response.iter_lines()
            received = [line for line, _ in zip((x for x in lines if x.startswith("data:")), range(3))]
    assert len(received) == 3  # streaming had begun; leaving the block closes the connection
    with Client(http_cluster.endpoint, timeout=60) as zmq:
        deadline = time.monotonic() + 30
        while zmq.status()["router"]["active"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert zmq.status()["router"]["active"] == 0
        workers = wait_all_blocks_free(zmq)
    assert {w["role"] for w in workers} == {"prefill", "decode"}
    after = scrape(url)
    assert delta(before, after, "pdserve:request_success_total", finished_reason="abort") == 1
    assert delta(before, after, "pdserve:generation_tokens_total") < 400


def test_dashboard_queries_only_exported_metrics(http_cluster):
    """docs/grafana-dashboard.json refers to metrics /metrics really exports."""
    import json
    import re
    from pathlib import Path

    dashboard = json.loads((Path(__file__).parents[3] / "docs" / "grafana-dashboard.json").read_text())
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"pdserve:\w+", target["expr"])}
    exported = {name for name, _ in scrape(http_cluster.http_url)}
    assert queried and queried <= exported, queried - exported


def test_samples_of_one_prompt_reuse_its_prefix(http_cluster):
    """n=3: the second and third samples start after the first's prefill, from its cached blocks."""
    from tests.router.http.conftest import BLOCK_SIZE

    url = http_cluster.http_url
    prompt = list(range(90, 90 + 2 * BLOCK_SIZE + 8))
    before = scrape(url)
    response = httpx.post(url + "/v1/completions", json={
        "prompt": prompt, "n": 3, "max_tokens": 3, "temperature": 1.0, "seed": 3, "ignore_eos": True},
        timeout=60).json()
    after = scrape(url)
    assert sorted(c["index"] for c in response["choices"]) == [0, 1, 2]
    assert response["usage"]["completion_tokens"] == 9 and response["usage"]["prompt_tokens"] == len(prompt)
    assert delta(before, after, "pdserve:prefix_cache_queries_total") == 3 * len(prompt)
    assert delta(before, after, "pdserve:prefix_cache_hits_total") == 2 * 2 * BLOCK_SIZE
