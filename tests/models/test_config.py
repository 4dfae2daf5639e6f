"""ModelConfig parsing, KV spec and fingerprint."""
import json
import shutil

import pytest

from kvtransfer.spec import KVSpec
from models.config import ModelConfig, RopeScaling, model_fingerprint
from tests.tiny_models import make_tiny_checkpoint

LLAMA = {
    "architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
    "eos_token_id": 2,
}


def parse(generation=None, **changes):
    hf = {**LLAMA, **changes}
    return ModelConfig.from_hf_dict({k: v for k, v in hf.items() if v is not None}, generation)


@pytest.mark.parametrize("arch, kw, expected", [
    ("llama", dict(num_kv_heads=1), dict(num_kv_heads=1, head_dim=16, attention_bias=False)),
    ("mistral", dict(head_dim=24, tie=True), dict(head_dim=24, tie_word_embeddings=True)),
    ("qwen2", dict(num_kv_heads=2), dict(attention_bias=True, qk_norm=False)),
    ("qwen3", dict(num_kv_heads=4, head_dim=32), dict(qk_norm=True, attention_bias=False,
                                                      head_dim=32, num_kv_heads=4)),
])
def test_checkpoints_written_by_transformers(tmp_path, arch, kw, expected):
    config = ModelConfig.from_pretrained(make_tiny_checkpoint(tmp_path, arch, **kw))
    assert config.family == arch
    assert (config.num_layers, config.num_heads, config.hidden_size) == (2, 4, 64)
    assert config.dtype == "float32"
    assert config.eos_token_ids == (1, 2)
    assert config.sliding_window is None
    for name, value in expected.items():
        assert getattr(config, name) == value, name


def test_both_rope_spellings():
    old = parse(rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 4.0})
    new = parse(rope_parameters={"rope_type": "linear", "rope_theta": 500000.0, "factor": 4.0})
    assert old.rope_theta == new.rope_theta == 500000.0
    assert old.rope_scaling == new.rope_scaling == RopeScaling("linear", factor=4.0)
    llama3 = parse(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 8192})
    assert llama3.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    assert parse(rope_parameters={"rope_type": "default", "rope_theta": 1e4}).rope_scaling is None
    assert parse().rope_theta == 10000.0


def test_eos_from_generation_config_int_or_list_else_config():
    assert parse().eos_token_ids == (2,)
    assert parse({"eos_token_id": 7}).eos_token_ids == (7,)
    assert parse({"eos_token_id": [7, 9]}).eos_token_ids == (7, 9)
    assert parse({"eos_token_id": None}, eos_token_id=[3, 4]).eos_token_ids == (3, 4)
    assert parse(eos_token_id=None).eos_token_ids == ()


def test_dtype_spellings_and_defaults():
    assert parse(torch_dtype="bfloat16").dtype == "bfloat16"
    assert parse(dtype="float16").dtype == "float16"
    assert parse().dtype is None
    assert parse(head_dim=None).head_dim == 16
    assert parse(num_key_value_heads=None).num_kv_heads == 4


def test_mistral_sliding_window_kept_only_when_it_binds():
    assert parse(architectures=["MistralForCausalLM"], sliding_window=64).sliding_window == 64
    assert parse(architectures=["MistralForCausalLM"], sliding_window=4096).sliding_window is None
    qwen = parse(architectures=["Qwen2ForCausalLM"], sliding_window=64, use_sliding_window=False)
    assert qwen.sliding_window is None


@pytest.mark.parametrize("changes, message", [
    (dict(architectures=["GPT2LMHeadModel"]), "architecture 'GPT2LMHeadModel' is not supported"),
    (dict(architectures=None), "must name exactly one architecture"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "rope type 'yarn'"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "rope type 'dynamic'"),
    (dict(rope_parameters={"full_attention": {"rope_type": "default"}}), "rope_parameters"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(pretraining_tp=2), "pretraining_tp=2"),
    (dict(architectures=["Qwen2ForCausalLM"], use_sliding_window=True), "use_sliding_window"),
    (dict(layer_types=["full_attention", "sliding_attention"]), "layer_types"),
    (dict(quantization_config={"quant_method": "gptq"}), "quantized"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
    (dict(num_key_value_heads=3), "multiple of num_key_value_heads"),
    (dict(hidden_size=66), "not a multiple of num_attention_heads"),
    (dict(head_dim=15), "head_dim must be even"),
    (dict(vocab_size=0), "vocab_size must be a positive integer"),
    (dict(intermediate_size=None), "no 'intermediate_size'"),
    (dict(dtype="float8"), "dtype 'float8'"),
    (dict(eos_token_id="</s>"), "eos_token_id"),
    (dict(rms_norm_eps="small"), "rms_norm_eps must be a number"),
    (dict(rope_scaling=[2.0]), "rope_scaling .* must be a mapping"),
])
def test_unsupported_or_invalid_options_name_themselves(changes, message):
    with pytest.raises(ValueError, match=message):
        parse(**changes)


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(ValueError, match="config.json not found"):
        ModelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_pretrained(tmp_path)


def test_kv_spec():
    assert parse(head_dim=32).kv_spec(16, "bfloat16") == KVSpec(
        num_layers=2, num_kv_heads=2, head_dim=32, block_size=16, dtype="bfloat16")


def test_fingerprint_is_stable_across_paths_and_tracks_content(tmp_path):
    a = make_tiny_checkpoint(tmp_path / "a", "llama", sharded=True)
    b = shutil.copytree(a, tmp_path / "elsewhere" / "b")
    fp = model_fingerprint(a)
    assert len(fp) == 16 and fp == model_fingerprint(b)
    config = json.loads((b / "config.json").read_text())
    config["rms_norm_eps"] = 1e-6
    (b / "config.json").write_text(json.dumps(config))
    assert model_fingerprint(b) != fp
    other = make_tiny_checkpoint(tmp_path / "c", "llama", vocab_size=129)
    assert model_fingerprint(other) != fp


def test_fingerprint_reports_a_bad_header(tmp_path):
    model_dir = make_tiny_checkpoint(tmp_path / "m", "llama")
    (model_dir / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        model_fingerprint(model_dir)
