"""ModelRunner: pool sizing and backends, the per-layer callback, results and options."""
import os

import pytest
import torch

from kvtransfer.pool import KVPool
from models.batch import SampleResult, SequenceChunk
from models.runner import ModelRunner
from models.sampler import SamplingParams
from tests.tiny_models import make_tiny_checkpoint, single_thread

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("m"), "llama", num_layers=3,
                                max_position_embeddings=64, seed=3)


@pytest.fixture
def runner(model_dir):
    runner = ModelRunner(model_dir, block_size=4, num_blocks=16)
    yield runner
    runner.close()


def test_pool_and_spec_follow_the_model(runner):
    assert runner.kv_spec.num_layers == 3 and runner.kv_spec.num_kv_heads == 2
    assert runner.kv_spec.head_dim == 16 and runner.kv_spec.dtype == "float32"
    assert runner.pool.kv.shape == (3, 2, 16, 4, 2, 16)
    assert runner.max_model_len == 64 and runner.config.vocab_size == 128


def test_kv_budget_sets_the_number_of_blocks(model_dir):
    block_bytes = 2 * 3 * 4 * 2 * 16 * 4  # K and V, 3 layers, 4 tokens, 2 heads, dim 16, fp32
    runner = ModelRunner(model_dir, block_size=4, kv_budget_bytes=10 * block_bytes + 7)
    assert runner.num_blocks == 10
    runner.close()
    runner = ModelRunner(model_dir, block_size=4)  # default: 64 full-length sequences
    assert runner.num_blocks == 64 * 64 // 4
    runner.close()


def test_on_layer_done_fires_after_each_layer_wrote_its_kv(runner):
    prompt, table = [5, 6, 7, 8, 9], [9, 2]
    seen = []

    def on_layer_done(layer):
        k, v = runner.pool.layer(layer)
        written = k[9].abs().sum(dim=(1, 2)) > 0  # [block_size]: slots of block 9
        later = [runner.pool.layer(l)[0][9].abs().sum().item() for l in range(layer + 1, 3)]
        seen.append((layer, written.tolist(), bool(v[2, 0].abs().sum() > 0), later))

    result = runner.step([SequenceChunk(prompt, 0, table, GREEDY)], on_layer_done)
    assert [s[0] for s in seen] == [0, 1, 2]
    for layer, written, v_written, later in seen:
        assert written == [True] * 4 and v_written
        assert later == [0.0] * (2 - layer)  # later layers not written yet
    assert isinstance(result[0], SampleResult)


def test_results_come_back_in_caller_order(runner):
    a, b = [10, 11, 12, 13, 14, 15], [20, 21, 22]
    ta, tb, tc = [0, 1], [2], [3]
    alone = [runner.step([SequenceChunk(a, 0, ta, GREEDY)])[0],
             runner.step([SequenceChunk(b, 0, tb, GREEDY)])[0]]
    decode = runner.step([SequenceChunk([alone[1].token_id], 3, tb, GREEDY, 1)])[0]
    mixed = runner.step([
        SequenceChunk([alone[1].token_id], 3, tb, GREEDY, 1),  # decode, listed first
        SequenceChunk([30, 31], 0, tc, None),                  # no sample wanted
        SequenceChunk(a, 0, ta, GREEDY),                       # prefill
    ])
    assert mixed[1] is None
    assert mixed[0].token_id == decode.token_id and mixed[2].token_id == alone[0].token_id
    assert mixed[2].logprob == pytest.approx(alone[0].logprob, abs=1e-5)
    assert mixed[2].logprob < 0


def test_seeded_sampling_does_not_depend_on_the_batch(runner):
    seeded = SamplingParams(temperature=1.0, seed=1234)
    prompt = [40, 41, 42, 43, 44]
    alone = runner.step([SequenceChunk(prompt, 0, [4, 5], seeded, output_index=3)])[0]
    batched = runner.step([SequenceChunk([1, 2, 3, 9, 9, 9], 0, [6, 7], SamplingParams()),
                           SequenceChunk(prompt, 0, [8, 10], seeded, output_index=3)])[1]
    assert alone == batched


def test_shared_memory_pool_is_visible_to_an_attached_process_view(model_dir):
    runner = ModelRunner(model_dir, block_size=4, num_blocks=8, pool_backend="shm")
    path = runner.pool.shm_path
    try:
        runner.step([SequenceChunk([1, 2, 3], 0, [6], GREEDY)])
        view = KVPool.attach(runner.kv_spec, 8, path)
        assert torch.equal(view.kv, runner.pool.kv) and view.kv[:, :, 6].abs().sum() > 0
        view.close()
    finally:
        runner.close()
    assert not os.path.exists(path)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_blocks=4, kv_budget_bytes=1 << 20), "not both"),
    (dict(num_blocks=0), "num_blocks must be a positive integer"),
    (dict(kv_budget_bytes=10), "holds no block"),
    (dict(num_blocks=4, max_model_len=65), "exceeds the model's max_position_embeddings 64"),
    (dict(num_blocks=4, block_size=0), "block_size must be a positive integer"),
    (dict(num_blocks=4, pool_backend="cuda"), "needs a CUDA device"),
    (dict(num_blocks=4, pool_backend="disk"), "unknown KV pool backend"),
])
def test_bad_options_are_clear_errors(model_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelRunner(model_dir, **kwargs)


def test_bad_model_dir_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="config.json not found"):
        ModelRunner(tmp_path)


def test_a_bad_chunk_changes_nothing(runner):
    before = runner.pool.kv.clone()
    with pytest.raises(ValueError, match="chunk 1"):
        runner.step([SequenceChunk([1, 2], 0, [0], GREEDY), SequenceChunk([3], 0, [99], GREEDY)])
    assert torch.equal(runner.pool.kv, before)


def test_max_model_len_bounds_positions(model_dir):
    runner = ModelRunner(model_dir, block_size=4, num_blocks=16, max_model_len=8)
    assert runner.max_model_len == 8 and runner.model.rotary.cos_sin.shape == (8, 16)
    with pytest.raises(ValueError, match="past the maximum model length 8"):
        runner.step([SequenceChunk([1] * 9, 0, [0, 1, 2], GREEDY)])
    runner.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(model_dir):
    cpu = ModelRunner(model_dir, block_size=4, num_blocks=8)
    gpu = ModelRunner(model_dir, block_size=4, num_blocks=8, device="cuda", pool_backend="cuda")
    chunks = [SequenceChunk([5, 6, 7, 8, 9], 0, [3, 1], GREEDY)]
    torch.testing.assert_close(gpu.prompt_logits(chunks)[0].cpu(), cpu.prompt_logits(chunks)[0],
                               rtol=1e-3, atol=1e-3)
