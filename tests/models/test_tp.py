"""Tensor parallelism: per-rank weight slicing, and a real 2-process gloo group that must
reproduce the single-process model."""
import json
import multiprocessing
import traceback

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from models.batch import SequenceChunk
from models.embedding import ParallelLMHead, VocabParallelEmbedding
from models.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from models.parallel import (ParallelContext, all_gather, all_reduce, broadcast_plan,
                             destroy_tensor_parallel, init_tensor_parallel)
from models.runner import ModelRunner
from models.sampler import SamplingParams
from tests.tiny_models import make_tiny_checkpoint, single_thread

GREEDY = SamplingParams(temperature=0)
CASES = {
    "llama-1-kv-head-odd-vocab": dict(arch="llama", num_kv_heads=1, vocab_size=131),
    "qwen2-bias-2-kv-heads": dict(arch="qwen2", num_kv_heads=2),
    "qwen3-tied-odd-vocab": dict(arch="qwen3", num_kv_heads=2, vocab_size=127, tie=True),
}


def rank(r, world=2):
    return ParallelContext(rank=r, world_size=world)  # no group: loaders only need the rank


class RecordingSlice:
    """A real safetensors slice that records which index each read asked for."""

    def __init__(self, inner):
        self.inner, self.reads = inner, []

    def get_shape(self):
        return self.inner.get_shape()

    def __getitem__(self, index):
        self.reads.append(index)
        return self.inner[index]


@pytest.fixture
def tensors(tmp_path):
    w = torch.arange(12 * 6, dtype=torch.float32).reshape(12, 6)
    data = {"w": w, "q": w.clone(), "k": w[:3].clone(), "v": w[3:6].clone(),
            "vocab": torch.arange(5 * 4, dtype=torch.float32).reshape(5, 4)}
    save_file(data, str(tmp_path / "t.safetensors"))
    with safe_open(str(tmp_path / "t.safetensors"), framework="pt") as f:
        yield data, f


def test_qkv_rank_reads_only_its_heads_and_replicates_a_single_kv_head(tensors):
    data, f = tensors
    w = data["w"]  # q: 12 rows = 4 heads of dim 3; k, v: 1 kv head of dim 3
    for r in range(2):
        layer = QKVParallelLinear(6, 3, num_heads=4, num_kv_heads=1, ctx=rank(r))
        reads = []
        for shard_id in ("q", "k", "v"):
            sl = RecordingSlice(f.get_slice(shard_id))
            layer.weight_loader(layer.weight, sl, shard_id)
            reads.append(sl.reads)
        assert reads == [[slice(6 * r, 6 * r + 6)], [slice(0, 3)], [slice(0, 3)]]
        expected = torch.cat([w[6 * r:6 * r + 6], w[:3], w[3:6]])
        assert torch.equal(layer.weight, expected)


def test_column_row_and_merged_layers_slice_their_part(tensors):
    data, f = tensors
    w = data["w"]
    row = RowParallelLinear(6, 12, ctx=rank(1))
    sl = RecordingSlice(f.get_slice("w"))
    row.weight_loader(row.weight, sl)
    assert sl.reads == [(slice(None), slice(3, 6))]
    assert torch.equal(row.weight, w[:, 3:6])

    merged = MergedColumnParallelLinear(6, [6, 6], ctx=rank(1))
    merged.weight_loader(merged.weight, w[:6], 0)
    merged.weight_loader(merged.weight, w[6:], 1)
    assert torch.equal(merged.weight, torch.cat([w[3:6], w[9:12]]))


def test_odd_vocab_is_padded_and_lm_head_trims(tensors):
    data, f = tensors
    vocab = data["vocab"]  # 5 tokens over 2 ranks: 3 rows each, the last one padding
    emb = VocabParallelEmbedding(5, 4, ctx=rank(1))
    sl = RecordingSlice(f.get_slice("vocab"))
    emb.weight_loader(emb.weight, sl)
    assert sl.reads == [slice(3, 5)]
    assert torch.equal(emb.weight, torch.cat([vocab[3:5], torch.zeros(1, 4)]))
    assert (emb.vocab_start, emb.vocab_end) == (3, 5)
    head = ParallelLMHead(5, 4, ctx=rank(0))
    assert head.weight.shape == (3, 4)


def test_mis_shaped_tensor_is_reported():
    layer = QKVParallelLinear(6, 3, num_heads=4, num_kv_heads=2, ctx=rank(0))
    with pytest.raises(ValueError,
                       match=r"checkpoint shape \[5, 6\] does not match the model's \[6, 6\]"):
        layer.weight_loader(layer.weight, torch.zeros(5, 6), "k")


def test_incompatible_tp_degree_is_a_clear_error():
    with pytest.raises(ValueError, match="number of attention heads"):
        QKVParallelLinear(6, 3, num_heads=3, num_kv_heads=1, ctx=rank(0))
    with pytest.raises(ValueError, match="not a multiple of the 2 kv heads"):
        QKVParallelLinear(6, 3, num_heads=6, num_kv_heads=2, ctx=rank(0, world=3))
    with pytest.raises(ValueError, match="outside a group"):
        ParallelContext(rank=2, world_size=2)


def test_collectives_are_identity_on_one_rank():
    ctx = ParallelContext()
    x = torch.arange(4.0)
    assert all_reduce(ctx, x) is x and all_gather(ctx, x) is x
    assert broadcast_plan(ctx, {"a": 1}) == {"a": 1}


# -- two real processes ------------------------------------------------------------------
PROMPTS = [[5, 9, 3, 17, 22, 8, 40], [11, 4], [60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70]]


def greedy(model_dir, ctx=None, num_new=12):
    runner = ModelRunner(model_dir, tp=ctx, block_size=4, num_blocks=40)
    tables = [list(range(i * 8, i * 8 + 8)) for i in range(len(PROMPTS))]
    logits = runner.prompt_logits([SequenceChunk(PROMPTS[0], 0, [39, 38])])[0]
    first = runner.step([SequenceChunk(p, 0, t, GREEDY) for p, t in zip(PROMPTS, tables)])
    outputs = [[r.token_id] for r in first]
    for step in range(1, num_new):
        chunks = [SequenceChunk([o[-1]], len(p) + step - 1, t, GREEDY, step)
                  for p, t, o in zip(PROMPTS, tables, outputs)]
        for o, r in zip(outputs, runner.step(chunks)):
            o.append(r.token_id)
    runner.close()
    return {"tokens": outputs, "logits": logits.tolist()}


def tp_worker(r, world, init_file, jobs, out_path):
    torch.set_num_threads(1)
    result = {}
    ctx = None
    try:
        ctx = init_tensor_parallel(r, world, f"file://{init_file}", backend="gloo", timeout_s=60)
        result["plan"] = broadcast_plan(ctx, {"step": 3, "ids": [1, 2]} if r == 0 else None)
        result["gathered"] = all_gather(ctx, torch.tensor([[r, r + 10]]), dim=-1).tolist()
        result["reduced"] = all_reduce(ctx, torch.tensor([r + 1.0])).tolist()
        for name, model_dir in jobs:
            result[name] = greedy(model_dir, ctx)
    except BaseException:
        result = {"error": traceback.format_exc()}
    finally:
        with open(out_path, "w") as f:
            json.dump(result, f)
        if ctx is not None:
            destroy_tensor_parallel(ctx)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    return {name: str(make_tiny_checkpoint(root / name, seed=11, **kw))
            for name, kw in CASES.items()}


def test_tp2_matches_tp1(checkpoints, tmp_path):
    jobs = list(checkpoints.items())
    mp = multiprocessing.get_context("spawn")
    procs = [mp.Process(target=tp_worker, args=(r, 2, str(tmp_path / "init"), jobs,
                                                str(tmp_path / f"rank{r}.json")))
             for r in range(2)]
    try:
        for p in procs:
            p.start()
        with single_thread():
            expected = {name: greedy(model_dir) for name, model_dir in jobs}
        for p in procs:
            p.join(timeout=240)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    results = []
    for r, p in enumerate(procs):
        path = tmp_path / f"rank{r}.json"
        assert path.exists(), f"rank {r} wrote no result (exit code {p.exitcode})"
        results.append(json.loads(path.read_text()))
    for result in results:
        assert "error" not in result, result.get("error")
        assert result["plan"] == {"step": 3, "ids": [1, 2]}
        assert result["gathered"] == [[0, 10, 1, 11]]
        assert result["reduced"] == [3.0]
        for name, _ in jobs:
            assert result[name]["tokens"] == expected[name]["tokens"], name
            torch.testing.assert_close(torch.tensor(result[name]["logits"]),
                                       torch.tensor(expected[name]["logits"]),
                                       rtol=1e-4, atol=1e-4)
