"""Small GGUF files for tests, written with the gguf package's own writer and quantizers.

``write_gguf`` writes tensors of any type (quantizing with ``gguf.quants.quantize`` where gguf
can, else taking raw blocks); ``gguf_from_checkpoint`` turns a tiny Hugging Face checkpoint
into the GGUF llama.cpp's convert script would write (its names, its q/k row permutation).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize
from safetensors.numpy import load_file

# Byte offsets of the float16 scales in one block of the K-quants gguf cannot quantize: random
# bytes elsewhere are valid codes, but random scales could be inf or NaN.
K_SCALE_OFFSETS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2),
                   "Q6_K": (208,)}
HF_TO_GGUF = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def llama_cpp_permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """``LlamaModel.permute`` of llama.cpp's convert_hf_to_gguf.py (Hugging Face -> GGUF)."""
    return (w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def encode(values: np.ndarray, type_name: str, rng: np.random.Generator) -> np.ndarray:
    """``values`` in GGUF storage of ``type_name``: quantized by gguf, or for the K-quants
    gguf cannot quantize, random blocks with sane scales (``values`` only gives the shape)."""
    qtype = GGMLQuantizationType[type_name]
    if type_name not in K_SCALE_OFFSETS:
        return quantize(values.astype(np.float32), qtype)
    block, nbytes = GGML_QUANT_SIZES[qtype]
    rows, cols = values.shape
    blocks = rng.integers(0, 256, (rows * cols // block, nbytes), dtype=np.uint8)
    for offset in K_SCALE_OFFSETS[type_name]:
        scales = (rng.random(len(blocks)) * 0.02 + 0.001).astype(np.float16)
        blocks[:, offset:offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, cols // block * nbytes)


def write_gguf(path: str | Path, tensors: dict[str, tuple[np.ndarray, str]], *,
               arch: str = "llama", metadata: dict | None = None, seed: int = 0) -> Path:
    """Write ``{gguf name: (float32 values, type name)}`` and ``metadata`` (``{key: value}``
    with ``{arch}.`` keys written as given) to ``path``; returns the path."""
    rng = np.random.default_rng(seed)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(str(path), arch)
    for key, value in (metadata or {}).items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    for name, (values, type_name) in tensors.items():
        if type_name in ("F32", "F16") or values.ndim == 1:
            writer.add_tensor(name, values.astype(np.float16 if type_name == "F16" else np.float32))
            continue
        data = encode(values, type_name, rng)
        writer.add_tensor(name, data, raw_dtype=GGMLQuantizationType[type_name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def gguf_from_checkpoint(hf_dir: Path, path: Path, type_name: str = "F32") -> Path:
    """The GGUF of a tiny llama/qwen2/qwen3 checkpoint, as llama.cpp's converter lays it out
    (matrices stored as ``type_name``, 1-D tensors as F32)."""
    config = json.loads((hf_dir / "config.json").read_text())
    arch = config["model_type"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    tensors = {}
    for name, w in load_file(str(hf_dir / "model.safetensors")).items():
        w = w.astype(np.float32)
        if name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            w = llama_cpp_permute(w, heads)
        elif arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            w = llama_cpp_permute(w, kv_heads)
        tensors[_gguf_name(name)] = (w, type_name if w.ndim == 2 else "F32")
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    metadata = {
        f"{arch}.block_count": config["num_hidden_layers"],
        f"{arch}.context_length": config["max_position_embeddings"],
        f"{arch}.embedding_length": config["hidden_size"],
        f"{arch}.feed_forward_length": config["intermediate_size"],
        f"{arch}.attention.head_count": heads,
        f"{arch}.attention.head_count_kv": kv_heads,
        f"{arch}.attention.key_length": head_dim,
        f"{arch}.attention.value_length": head_dim,
        f"{arch}.rope.freq_base": float(config.get("rope_theta")
                                        or config["rope_parameters"]["rope_theta"]),
        f"{arch}.attention.layer_norm_rms_epsilon": float(config["rms_norm_eps"]),
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 1,
    }
    return write_gguf(path, tensors, arch=arch, metadata=metadata)


def _gguf_name(hf_name: str) -> str:
    base, suffix = hf_name.rsplit(".", 1)
    if base == "model.embed_tokens":
        return f"token_embd.{suffix}"
    if base == "model.norm":
        return f"output_norm.{suffix}"
    if base == "lm_head":
        return f"output.{suffix}"
    _, _, layer, module = base.split(".", 3)
    return f"blk.{layer}.{HF_TO_GGUF[module]}.{suffix}"
