"""The built-in demo model: a small Llama checkpoint with deterministic random weights.

It exists so that ``pdserve serve`` works with no download: every process that needs it writes
(or finds) the same bytes. The weights are random, so its text is gibberish; it exercises the
whole serving path (tokenizer, prefill, KV transfer, decode, sampling) at a speed that a laptop
CPU handles. Its tokenizer is byte-level: one token per byte (ids 0-255 are the byte values)
plus ``<s>`` (256) and ``</s>`` (257), so any text round-trips and multi-byte characters span
several tokens.

Torch-free: numpy writes the weights through ``safetensors.numpy``.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

DEMO_VERSION = "v1"
DEMO_SEED = 20240611
BOS, EOS = "<s>", "</s>"
BOS_ID, EOS_ID = 256, 257
PRINTABLE_IDS = (ord("\n"), *range(ord(" "), ord("~") + 1))

DEMO_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 258,
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
    "dtype": "float32",
}
FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
         "model.safetensors")


def demo_model_dir(cache_dir: str | Path | None = None) -> Path:
    """Path of the demo checkpoint, written on first use.

    It lives in ``<root>/demo-v1`` where root is ``cache_dir``, else ``$PDSERVE_CACHE``, else
    ``~/.cache/pdserve``. The checkpoint is written to a temporary directory and renamed into
    place, so processes starting together never see a half-written one. Raises OSError if the
    cache directory cannot be written.
    """
    root = Path(cache_dir or os.environ.get("PDSERVE_CACHE") or Path.home() / ".cache" / "pdserve")
    target = root / f"demo-{DEMO_VERSION}"
    if _is_complete(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".demo-{DEMO_VERSION}-", dir=root))
    try:
        write_demo_checkpoint(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            os.rename(tmp, target)  # atomic; fails if another process got there first
        except OSError as e:
            if not _is_complete(target):
                raise OSError(f"cannot install the demo model at {target} ({e}); if that "
                              "directory is left over from an interrupted run, delete it") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _is_complete(directory: Path) -> bool:
    return all((directory / name).is_file() for name in FILES)


def write_demo_checkpoint(directory: str | Path) -> None:
    """Write the demo checkpoint (Hugging Face layout) into an existing ``directory``."""
    directory = Path(directory)
    _write_json(directory / "config.json", DEMO_CONFIG)
    _write_json(directory / "generation_config.json",
                {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "do_sample": False})
    _write_json(directory / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "add_bos_token": True, "add_eos_token": False,
        "model_max_length": DEMO_CONFIG["max_position_embeddings"],
    })
    (directory / "tokenizer.json").write_text(build_tokenizer().to_str(), encoding="utf-8")
    save_file(demo_weights(), str(directory / "model.safetensors"), metadata={"format": "pt"})


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def byte_to_unicode() -> list[str]:
    """The GPT-2 byte-level alphabet: printable characters standing for the bytes 0-255."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def build_tokenizer() -> Tokenizer:
    """Byte-level BPE with no merges: one token per byte, then ``<s>`` and ``</s>``."""
    vocab = {char: b for b, char in enumerate(byte_to_unicode())}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([BOS, EOS])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID)])
    return tokenizer


def demo_weights() -> dict[str, np.ndarray]:
    """Deterministic float32 weights, scaled so activations stay O(1) through the layers and
    the logits are peaked enough that greedy decoding wanders instead of repeating one token."""
    rng = np.random.default_rng(DEMO_SEED)
    cfg = DEMO_CONFIG
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    q_dim = cfg["num_attention_heads"] * cfg["head_dim"]
    kv_dim = cfg["num_key_value_heads"] * cfg["head_dim"]

    def normal(shape: tuple[int, int], std: float) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def linear(out_features: int, in_features: int, gain: float = 1.0) -> np.ndarray:
        return normal((out_features, in_features), gain / np.sqrt(in_features))

    weights = {"model.embed_tokens.weight": normal((cfg["vocab_size"], hidden), 1.0)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights[p + "input_layernorm.weight"] = np.ones(hidden, np.float32)
        weights[p + "post_attention_layernorm.weight"] = np.ones(hidden, np.float32)
        weights[p + "self_attn.q_proj.weight"] = linear(q_dim, hidden, gain=2.0)
        weights[p + "self_attn.k_proj.weight"] = linear(kv_dim, hidden, gain=2.0)
        weights[p + "self_attn.v_proj.weight"] = linear(kv_dim, hidden)
        weights[p + "self_attn.o_proj.weight"] = linear(hidden, q_dim, gain=0.5)
        weights[p + "mlp.gate_proj.weight"] = linear(inter, hidden)
        weights[p + "mlp.up_proj.weight"] = linear(inter, hidden)
        weights[p + "mlp.down_proj.weight"] = linear(hidden, inter, gain=0.5)
    weights["model.norm.weight"] = np.ones(hidden, np.float32)
    # Printable ASCII rows get a larger norm, so the gibberish is mostly readable characters
    # rather than stray bytes that decode to U+FFFD; other bytes and </s> stay possible.
    gains = np.full((cfg["vocab_size"], 1), 0.5, np.float32)
    gains[[*PRINTABLE_IDS]] = 4.0
    weights["lm_head.weight"] = linear(cfg["vocab_size"], hidden) * gains
    return weights
