"""The colocated engine against transformers: reserve, prefill into the reservation, decode."""
import pytest
import torch

from decode.engine import DecodeEngine
from kvtransfer.allocator import NoFreeBlocks
from models.request_options import RequestOptions
from models.runner import ModelRunner
from tests.tiny_models import make_tiny_checkpoint

GREEDY = {"temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("m") / "llama", arch="llama", vocab_size=128)


def _hf_greedy(model_dir, prompt, n):
    from transformers import AutoModelForCausalLM
    # A plain argmax loop: generate() would mask EOS until min_new_tokens, unlike ignore_eos.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def _run(engine, expected_rids):
    outputs = {rid: [] for rid in expected_rids}
    finished = set()
    for _ in range(200):
        plan = engine.build_plan()
        if plan is None:
            break
        out = engine.apply(engine.execute_plan(plan))
        for rid, _, result, reason in out.first_tokens:
            outputs[rid].append(result.token_id)
        for item in out.items:
            outputs[item.rid].append(item.token_id)
        finished.update(out.finished)
    assert finished == set(expected_rids)
    return outputs


def test_colocated_engine_matches_transformers_and_frees_everything(model_dir):
    runner = ModelRunner(model_dir, block_size=4, num_blocks=64)
    engine = DecodeEngine(runner, colocated=True, max_num_batched_tokens=16)
    prompts = {"a": [3, 17, 42, 9, 88, 5, 61], "b": list(range(20, 45)), "c": [7]}
    for rid, prompt in prompts.items():
        engine.reserve(rid, f"t-{rid}", prompt, RequestOptions(**GREEDY, max_tokens=12), 0)
        engine.prefill_local(rid, f"t-{rid}")
    outputs = _run(engine, prompts)
    for rid, prompt in prompts.items():
        assert outputs[rid] == _hf_greedy(model_dir, prompt, 12), rid
    assert engine.allocator.num_free_blocks == 64


def test_prefix_cache_hit_gives_the_same_tokens(model_dir):
    runner = ModelRunner(model_dir, block_size=4, num_blocks=64)
    engine = DecodeEngine(runner, colocated=True)
    prompt = list(range(30, 50))
    engine.reserve("a", "t-a", prompt, RequestOptions(**GREEDY, max_tokens=5), 0)
    engine.prefill_local("a", "t-a")
    first = _run(engine, ["a"])["a"]
    seq = engine.reserve("b", "t-b", prompt, RequestOptions(**GREEDY, max_tokens=5), 0)
    assert seq.num_prefix_hit == 16
    engine.prefill_local("b", "t-b")
    assert _run(engine, ["b"])["b"] == first
    assert engine.allocator.num_free_blocks == 64


def test_free_mid_step_defers_block_release(model_dir):
    runner = ModelRunner(model_dir, block_size=4, num_blocks=8)
    engine = DecodeEngine(runner, colocated=True)
    engine.reserve("a", "t-a", [1, 2, 3], RequestOptions(**GREEDY, max_tokens=20), 0)
    engine.prefill_local("a", "t-a")
    plan = engine.build_plan()
    assert engine.free("a")
    assert engine.allocator.num_free_blocks == 2      # still owned by the step in flight
    with pytest.raises(NoFreeBlocks):
        engine.reserve("b", "t-b", [1, 2, 3], RequestOptions(**GREEDY, max_tokens=20), 0)
    out = engine.apply(engine.execute_plan(plan))
    assert out.first_tokens == [] and engine.allocator.num_free_blocks == 8
