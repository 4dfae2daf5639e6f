"""Metric definitions against hand-worked examples.

Times are multiples of 1/8 s so every value below is exact in binary floating point.
"""
import pytest

from router.bench.metrics import SLO, RequestRecord, error_counts, latency_samples_ms, statistics, summarize


def _records():
    return [
        # 3 tokens in 3 chunks: TTFT 250, E2EL 625, TPOT (625-250)/2 = 187.5, ITL 125, 250
        RequestRecord(start=0.0, chunk_times=[0.25, 0.375, 0.625], end=0.625,
                      num_prompt_tokens=10, num_output_tokens=3),
        # one token: TTFT = E2EL = 500, no TPOT, no ITL
        RequestRecord(start=1.0, chunk_times=[1.5], end=1.5, num_prompt_tokens=5, num_output_tokens=1),
        # 3 tokens in 2 chunks (1 + 2): TTFT 125, E2EL 250, TPOT 125/2 = 62.5, one ITL of 125
        RequestRecord(start=2.0, chunk_times=[2.125, 2.25], end=2.25,
                      num_prompt_tokens=20, num_output_tokens=3),
        RequestRecord(start=3.0, error="Overloaded: queue full"),
    ]


def test_per_request_definitions():
    a, b, c, _ = _records()
    assert (a.ttft, a.e2el, a.tpot, a.itl) == (0.25, 0.625, 0.1875, [0.125, 0.25])
    assert (b.ttft, b.e2el, b.tpot, b.itl) == (0.5, 0.5, None, [])
    assert (c.ttft, c.e2el, c.tpot, c.itl) == (0.125, 0.25, 0.0625, [0.125])


def test_tpot_uses_the_final_chunk_even_when_it_carries_no_token():
    record = RequestRecord(start=0.0, chunk_times=[0.25, 0.5], end=0.75, num_output_tokens=2)
    assert record.tpot == 0.5 and record.e2el == 0.75 and record.itl == [0.25]


def test_samples_pool_itl_per_chunk_and_skip_single_token_tpot():
    samples = latency_samples_ms(_records())
    assert samples == {"ttft": [250.0, 500.0, 125.0], "tpot": [187.5, 62.5],
                       "itl": [125.0, 250.0, 125.0], "e2el": [625.0, 500.0, 250.0]}


def test_percentiles_interpolate_linearly():
    # sorted [125, 250, 500]: p90 at rank 1.8 -> 250 + 0.8 * 250; p99 at rank 1.98
    assert statistics([250.0, 500.0, 125.0]) == {
        "mean": pytest.approx(875 / 3), "median": 250.0, "p90": 450.0, "p99": 495.0}
    assert statistics([7.0]) == {"mean": 7.0, "median": 7.0, "p90": 7.0, "p99": 7.0}
    assert statistics([]) == {"mean": None, "median": None, "p90": None, "p99": None}


def test_summary_counts_throughput_and_latency_statistics():
    result = summarize(_records(), duration_s=4.0)
    assert {k: result[k] for k in ("completed", "failed", "duration_s", "total_input_tokens",
                                   "total_output_tokens")} == {
        "completed": 3, "failed": 1, "duration_s": 4.0, "total_input_tokens": 35, "total_output_tokens": 7}
    assert result["request_throughput"] == 0.75
    assert result["output_throughput"] == 1.75
    assert result["total_token_throughput"] == 10.5
    assert (result["mean_tpot_ms"], result["median_tpot_ms"], result["p90_tpot_ms"],
            result["p99_tpot_ms"]) == (125.0, 125.0, 175.0, 186.25)
    assert (result["median_itl_ms"], result["p90_itl_ms"], result["p99_itl_ms"]) == (125.0, 225.0, 247.5)
    assert result["mean_itl_ms"] == pytest.approx(500 / 3)
    assert (result["median_e2el_ms"], result["p90_e2el_ms"], result["p99_e2el_ms"]) == (500.0, 600.0, 622.5)
    assert result["p99_ttft_ms"] == 495.0


def test_tpot_statistics_are_none_when_every_request_made_one_token():
    record = RequestRecord(start=0.0, chunk_times=[0.5], end=0.5, num_output_tokens=1)
    result = summarize([record], duration_s=1.0)
    assert result["mean_tpot_ms"] is None and result["p99_itl_ms"] is None
    assert result["mean_ttft_ms"] == 500.0


def test_goodput_without_slo_is_request_throughput():
    ok = _records()[:3]
    result = summarize(ok, duration_s=2.0)
    assert result["goodput"] == result["request_throughput"] == 1.5
    assert result["slo_attainment"] == 1.0
    # a failed request is never good: attainment is the fraction completed
    result = summarize(_records(), duration_s=4.0)
    assert result["goodput"] == 0.75 and result["slo_attainment"] == 0.75


@pytest.mark.parametrize("slo, num_good", [
    (SLO(ttft_ms=250), 2),               # bounds are inclusive: 250 ms passes, the 500 ms one misses
    (SLO(tpot_ms=62.5), 2),              # the one-token request counts as TPOT 0 and passes
    (SLO(ttft_ms=250, tpot_ms=62.5), 1),  # every objective must hold
    (SLO(ttft_ms=100), 0),
])
def test_goodput_and_attainment_under_slos(slo, num_good):
    result = summarize(_records(), duration_s=4.0, slo=slo)
    assert result["goodput"] == num_good / 4.0
    assert result["slo_attainment"] == num_good / 4


def test_bad_inputs_are_refused_with_what_to_change():
    with pytest.raises(ValueError, match="--slo-ttft-ms must be a positive"):
        SLO(ttft_ms=0)
    with pytest.raises(ValueError, match="--slo-tpot-ms"):
        SLO(tpot_ms=float("nan"))
    with pytest.raises(ValueError, match="duration must be positive"):
        summarize(_records(), duration_s=0.0)


def test_error_counts_most_frequent_first():
    records = [RequestRecord(0.0, error="B"), RequestRecord(0.0, error="A"), RequestRecord(0.0, error="A"),
               RequestRecord(0.0, chunk_times=[1.0], end=1.0, num_output_tokens=1)]
    assert list(error_counts(records).items()) == [("A", 2), ("B", 1)]
