"""Checkpoint loading: layouts, dtypes, and a clear error for every way a checkpoint breaks."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.batch import SequenceChunk
from models.loader import cpu_has_native_bf16
from models.runner import ModelRunner
from tests.tiny_models import make_tiny_checkpoint, single_thread

PROMPT = [3, 14, 15, 92, 65, 35, 89, 79, 32]
CORRUPT = r"cannot read .*model.safetensors: .*truncated or corrupt"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("base"), "qwen2", seed=5)


@pytest.fixture
def ckpt(base, tmp_path):
    """A private copy of the base checkpoint to damage."""
    return shutil.copytree(base, tmp_path / "ckpt")


def logits(model_dir, **kwargs):
    runner = ModelRunner(model_dir, block_size=4, num_blocks=8, **kwargs)
    out = runner.prompt_logits([SequenceChunk(PROMPT, 0, [5, 1, 6])])[0]
    runner.close()
    return out


def edit_weights(model_dir, edit):
    path = model_dir / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_sharded_checkpoint_loads_like_a_single_file(base, tmp_path):
    sharded = make_tiny_checkpoint(tmp_path / "sharded", "qwen2", seed=5, sharded=True)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    assert torch.equal(logits(sharded), logits(base))


def test_missing_tensor_is_named(ckpt):
    edit_weights(ckpt, lambda t: t.pop("model.layers.1.self_attn.v_proj.weight"))
    with pytest.raises(ValueError,
                       match=r"lacks tensor\(s\): \['model.layers.1.self_attn.v_proj.weight'\]"):
        logits(ckpt)


def test_unexpected_tensor_is_named(ckpt):
    edit_weights(ckpt, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"does not use: \['model.layers.0.mlp.extra.weight'\]"):
        logits(ckpt)


def test_mis_shaped_tensor_is_named(ckpt):
    bad = {"model.layers.0.mlp.up_proj.weight": torch.zeros(128, 63)}
    edit_weights(ckpt, lambda t: t.update(bad))
    with pytest.raises(ValueError, match=r"tensor model.layers.0.mlp.up_proj.weight in model."
                       r"safetensors: checkpoint shape \[128, 63\] does not match the model's "
                       r"\[128, 64\]"):
        logits(ckpt)


def test_truncated_file_is_reported(ckpt):
    path = ckpt / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=CORRUPT):
        logits(ckpt)


def test_corrupt_header_is_reported(ckpt):
    path = ckpt / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"\x00not json at all\xff" * 2
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=CORRUPT):
        logits(ckpt)


def test_index_naming_a_missing_shard_is_reported(tmp_path):
    sharded = make_tiny_checkpoint(tmp_path / "sharded", "llama", sharded=True)
    victim = sorted(sharded.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(ValueError, match=f"shard.*{victim.name}.*incomplete"):
        logits(sharded)
    (sharded / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid safetensors index"):
        logits(sharded)


def test_no_weights_is_reported(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no model.safetensors"):
        logits(ckpt)


def test_recomputed_buffers_and_a_duplicated_tied_head_are_accepted(tmp_path):
    tied = make_tiny_checkpoint(tmp_path / "tied", "llama", tie=True, seed=2)
    expected = logits(tied)
    tensors = load_file(str(tied / "model.safetensors"))
    assert "lm_head.weight" not in tensors
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(tensors, str(tied / "model.safetensors"), metadata={"format": "pt"})
    assert torch.equal(logits(tied), expected)


def test_dtype_auto_follows_the_checkpoint_where_the_cpu_runs_it_natively(tmp_path):
    bf16 = make_tiny_checkpoint(tmp_path / "bf16", "llama", dtype="bfloat16", seed=4)
    runner = ModelRunner(bf16, block_size=4, num_blocks=8)
    native = cpu_has_native_bf16()
    expected, name = (torch.bfloat16, "bfloat16") if native else (torch.float32, "float32")
    assert runner.dtype == expected and runner.pool.kv.dtype == expected
    assert runner.kv_spec.dtype == name
    assert runner.model.lm_head.weight.dtype == expected
    runner.close()
    runner = ModelRunner(bf16, dtype="bfloat16", block_size=4, num_blocks=8)
    assert runner.model.lm_head.weight.dtype == torch.bfloat16  # asked for: always honoured
    runner.close()
    fp16 = make_tiny_checkpoint(tmp_path / "fp16", "llama", dtype="float16", seed=4)
    runner = ModelRunner(fp16, block_size=4, num_blocks=8)
    assert runner.dtype == torch.float32  # fp16 checkpoints run in float32 on CPU
    runner.close()
    as_fp32 = logits(bf16, dtype="float32")
    as_bf16 = logits(bf16)
    assert as_fp32.dtype == as_bf16.dtype == torch.float32  # logits are always float32
    torch.testing.assert_close(as_bf16, as_fp32, rtol=0.05, atol=0.1)


def test_unknown_dtype_is_rejected(base):
    with pytest.raises(ValueError, match="dtype 'int8' is not supported"):
        logits(base, dtype="int8")
