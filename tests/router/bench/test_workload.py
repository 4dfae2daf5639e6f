"""Workloads: random length ranges, shared prefixes, the JSONL dataset and its errors."""
import json

import pytest

from router.bench.workload import (DEFAULT_VOCAB_SIZE, BenchRequest, DatasetError, WorkloadConfig,
                                   build_workload, length_range, load_dataset, random_requests)


def test_length_range_follows_vllm_random_dataset():
    assert length_range(100, 0.0) == (100, 100)
    assert length_range(100, 0.25) == (75, 125)
    assert length_range(10, 0.33) == (6, 14)  # floor(6.7), ceil(13.3)
    assert length_range(1, 0.9) == (1, 2)     # never below one token


def test_random_lengths_cover_the_range_and_nothing_else():
    requests = random_requests(WorkloadConfig(input_len=40, output_len=8, range_ratio=0.5),
                               2000, vocab_size=1000, seed=0)
    input_lens = {len(r.prompt_token_ids) for r in requests}
    output_lens = {r.output_len for r in requests}
    assert input_lens == set(range(20, 61))
    assert output_lens == set(range(4, 13))
    assert all(r.prompt is None for r in requests)
    assert all(0 <= t < 1000 for r in requests for t in r.prompt_token_ids)


def test_fixed_lengths_without_range_ratio():
    requests = random_requests(WorkloadConfig(input_len=17, output_len=5), 50, vocab_size=100, seed=1)
    assert {len(r.prompt_token_ids) for r in requests} == {17}
    assert {r.output_len for r in requests} == {5}


def test_shared_prefix_is_prepended_to_every_prompt():
    requests = random_requests(WorkloadConfig(input_len=8, prefix_len=32), 20, vocab_size=5000, seed=2)
    prefix = requests[0].prompt_token_ids[:32]
    assert all(len(r.prompt_token_ids) == 40 and r.prompt_token_ids[:32] == prefix for r in requests)
    suffixes = {tuple(r.prompt_token_ids[32:]) for r in requests}
    assert len(suffixes) == 20  # the rest of each prompt is its own


def test_workload_is_reproducible_from_the_seed():
    config = WorkloadConfig(input_len=16, range_ratio=0.5)
    assert random_requests(config, 10, 500, seed=4) == random_requests(config, 10, 500, seed=4)
    assert random_requests(config, 10, 500, seed=4) != random_requests(config, 10, 500, seed=5)


def test_unknown_vocabulary_falls_back_to_the_default_range():
    requests = build_workload(WorkloadConfig(input_len=500), 4, vocab_size=None, seed=0)
    assert max(t for r in requests for t in r.prompt_token_ids) < DEFAULT_VOCAB_SIZE


@pytest.mark.parametrize("kwargs, match", [
    (dict(input_len=0), "--input-len must be a positive integer"),
    (dict(output_len=-3), "--output-len must be a positive integer"),
    (dict(range_ratio=1.0), r"--range-ratio must be in \[0, 1\)"),
    (dict(prefix_len=-1), "--prefix-len must be an integer >= 0"),
    (dict(prefix_len=4, dataset="x.jsonl"), "drop it when using --dataset"),
])
def test_bad_workload_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WorkloadConfig(**kwargs)


def test_dataset_lines_text_and_token_ids(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join([
        json.dumps({"prompt": "Hello there", "output_len": 7, "note": "extra keys are ignored"}),
        "",
        json.dumps({"prompt_token_ids": [1, 2, 3]}),
    ]) + "\n")
    assert load_dataset(path, default_output_len=11) == [
        BenchRequest("Hello there", None, 7), BenchRequest(None, [1, 2, 3], 11)]
    # a run takes the first entries and wraps around
    requests = build_workload(WorkloadConfig(output_len=11, dataset=str(path)), 5, vocab_size=4, seed=0)
    assert [r.output_len for r in requests] == [7, 11, 7, 11, 7]


@pytest.mark.parametrize("line, match", [
    ("{not json", "line 2: not valid JSON"),
    ("[1, 2]", "line 2: expected a JSON object, got list"),
    ('{"output_len": 3}', "line 2: give exactly one of \"prompt\""),
    ('{"prompt": "a", "prompt_token_ids": [1]}', "line 2: give exactly one of"),
    ('{"prompt": ""}', "line 2: \"prompt\" must be a non-empty string"),
    ('{"prompt_token_ids": [1, -2]}', "line 2: \"prompt_token_ids\" must be a non-empty list"),
    ('{"prompt_token_ids": [1, true]}', "line 2: \"prompt_token_ids\" must be"),
    ('{"prompt_token_ids": [1, 999]}', "line 2: token id 999 is outside the model's vocabulary of 100"),
    ('{"prompt": "a", "output_len": 0}', "line 2: \"output_len\" must be a positive integer"),
    ('{"prompt": "a", "output_len": "5"}', "line 2: \"output_len\" must be a positive integer"),
])
def test_dataset_errors_name_the_line(tmp_path, line, match):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(DatasetError, match=match) as info:
        load_dataset(path, default_output_len=4, vocab_size=100)
    assert str(path) in str(info.value)


def test_missing_or_empty_dataset(tmp_path):
    with pytest.raises(DatasetError, match="cannot read dataset"):
        load_dataset(tmp_path / "absent.jsonl", default_output_len=4)
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    with pytest.raises(DatasetError, match="has no prompts"):
        load_dataset(tmp_path / "empty.jsonl", default_output_len=4)
