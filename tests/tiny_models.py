"""Tiny Hugging Face checkpoints for tests, written by transformers' own model classes.

Weights are random (seeded) with a larger-than-default init scale and perturbed norms and
biases, so logits have clear margins and every tensor matters. Import from any test:

    from tests.tiny_models import make_tiny_checkpoint
    model_dir = make_tiny_checkpoint(tmp_path / "m", arch="qwen2", num_kv_heads=1)
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

ARCHS = ("llama", "mistral", "qwen2", "qwen3")
DTYPES = ("float32", "bfloat16", "float16")
TOKENIZER_VOCAB = 258  # byte-level demo tokenizer: 256 bytes, <s>, </s>


def make_tiny_checkpoint(path: str | Path, arch: str = "llama", *, num_kv_heads: int = 2,
                         vocab_size: int = 128, head_dim: int | None = None, tie: bool = False,
                         rope_scaling: dict | None = None, sharded: bool = False, seed: int = 0,
                         with_tokenizer: bool = False, dtype: str = "float32",
                         num_layers: int = 2, hidden_size: int = 64, num_heads: int = 4,
                         intermediate_size: int = 128, max_position_embeddings: int = 512,
                         sliding_window: int | None = None, eos_token_id: int | list | None = None,
                         init_scale: float = 0.1) -> Path:
    """Write a tiny ``arch`` checkpoint into ``path`` and return it.

    ``rope_scaling``: e.g. ``{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 64}`` or
    ``{"rope_type": "linear", "factor": 2.0}``. ``sharded``: several safetensors files with
    an index. ``with_tokenizer``: the demo model's byte-level tokenizer (vocab >= 258).
    ``sliding_window``: Mistral's window (default: none).
    """
    import torch
    import transformers

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if with_tokenizer and vocab_size < TOKENIZER_VOCAB:
        raise ValueError(f"with_tokenizer needs vocab_size >= {TOKENIZER_VOCAB}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    bos_token_id = TOKENIZER_VOCAB - 2 if with_tokenizer else 0
    if eos_token_id is None:
        eos_token_id = TOKENIZER_VOCAB - 1 if with_tokenizer else [1, 2]
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if rope_scaling:
        rope = {"rope_theta": 10000.0, **rope_scaling}
    kwargs = dict(vocab_size=vocab_size, hidden_size=hidden_size,
                  intermediate_size=intermediate_size, num_hidden_layers=num_layers,
                  num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                  max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-5,
                  tie_word_embeddings=tie, initializer_range=init_scale, rope_parameters=rope,
                  bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    if arch != "qwen2":
        kwargs["head_dim"] = head_dim or hidden_size // num_heads
    elif head_dim not in (None, hidden_size // num_heads):
        raise ValueError("qwen2 has no head_dim option; leave head_dim None")
    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }
    config_cls, model_cls = classes[arch]
    if arch == "mistral":
        kwargs["sliding_window"] = sliding_window
    elif sliding_window is not None:
        raise ValueError("only mistral takes sliding_window here")
    config = config_cls(**kwargs)
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:  # norm weights and biases: not the trivial 1 or 0
                param.add_(torch.randn_like(param) * (0.1 if "norm" in name else init_scale))
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(path, max_shard_size="40KB" if sharded else "50GB")
    generation = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "do_sample": False}
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2))
    if with_tokenizer:
        _write_tokenizer(path)
    return path


def _write_tokenizer(path: Path) -> None:
    from models.demo import BOS, EOS, build_tokenizer

    (path / "tokenizer.json").write_text(build_tokenizer().to_str(), encoding="utf-8")
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
        "add_bos_token": True, "add_eos_token": False}, indent=2))


@contextmanager
def single_thread():
    """Run torch on one thread: tiny models gain nothing from two, and on a shared machine
    spinning worker threads make tiny ops very slow."""
    import torch

    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(num_threads)


def load_hf_model(path: str | Path):
    """The transformers reference model for a checkpoint (eager attention, eval mode)."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager", dtype="auto").eval()
