"""GGUF checkpoints: the metadata a Llama-family model needs, and a tensor index for loading.

gguf's ``GGUFReader`` parses every metadata field when it opens a file, the vocabulary
included (about six seconds for a 49k-token vocabulary on a small CPU). So the header is read
once, when a GGUF is converted (``models/gguf_convert.py``), and its tensor table is written
to ``gguf_index.json`` next to the converted config. Workers map the file and take each
tensor's bytes from that table (``open_tensors``) without parsing the header again; the file's
size and modification time, recorded in the index, guard against a file that changed since.

torch-free (numpy and gguf only): the CLI and the router use it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

INDEX_FILE = "gguf_index.json"
INDEX_VERSION = 1
# Types gguf.quants dequantizes with numpy and pdserve loads; the others are named in an error.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# GGUF general.architecture -> (Hugging Face architecture, q/k rows permuted by llama.cpp)
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", True),
    "qwen2": ("Qwen2ForCausalLM", False),
    "qwen3": ("Qwen3ForCausalLM", False),
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                 "output": "lm_head"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Metadata arrays that only the tokenizer conversion needs (and that are slow to turn into lists).
_SKIPPED_FIELDS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
                   "tokenizer.ggml.merges")
_MISSING_GGUF = "GGUF checkpoints need the gguf package: pip install 'pdserve[gguf]'"


def import_gguf():
    """The ``gguf`` package, or a ValueError saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise ValueError(_MISSING_GGUF) from None
    return gguf


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Where one tensor's bytes are: ``shape`` in numpy order (rows first, as in Hugging Face
    checkpoints), ``offset`` from the start of the file."""

    name: str
    type_name: str
    shape: tuple[int, ...]
    offset: int
    num_bytes: int


@dataclass(frozen=True)
class GGUFIndex:
    """The tensor table of one GGUF file and the file's identity when it was read."""

    file: str            # as recorded: relative to the index's directory, or absolute
    size: int
    mtime_ns: int
    architecture: str
    tensors: tuple[GGUFTensorInfo, ...]

    def names(self) -> set[str]:
        return {t.name for t in self.tensors}

    def path(self, model_dir: str | Path) -> Path:
        return Path(model_dir) / self.file  # an absolute file replaces the directory

    def save(self, model_dir: str | Path) -> None:
        data = {"version": INDEX_VERSION, "file": self.file, "size": self.size,
                "mtime_ns": self.mtime_ns, "architecture": self.architecture,
                "tensors": [[t.name, t.type_name, list(t.shape), t.offset, t.num_bytes]
                            for t in self.tensors]}
        path = Path(model_dir) / INDEX_FILE
        tmp = path.with_name(f".{INDEX_FILE}.{os.getpid()}")
        tmp.write_text(json.dumps(data) + "\n")
        os.replace(tmp, path)  # readers see the whole index or none

    @classmethod
    def load(cls, model_dir: str | Path) -> "GGUFIndex":
        """Read ``gguf_index.json``. Raises ValueError if it is missing or malformed."""
        path = Path(model_dir) / INDEX_FILE
        try:
            data = json.loads(path.read_text())
            if data.get("version") != INDEX_VERSION:
                raise ValueError(f"version {data.get('version')!r}, expected {INDEX_VERSION}")
            tensors = tuple(GGUFTensorInfo(str(n), str(t), tuple(int(d) for d in s), int(o), int(b))
                            for n, t, s, o, b in data["tensors"])
            return cls(str(data["file"]), int(data["size"]), int(data["mtime_ns"]),
                       str(data["architecture"]), tensors)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path} is not a valid GGUF index ({e}); delete {Path(model_dir)} "
                             "so that pdserve converts the GGUF file again") from None

    def is_current(self, model_dir: str | Path) -> bool:
        """Whether the GGUF file is still the one this index describes."""
        try:
            stat = self.path(model_dir).stat()
        except OSError:
            return False
        return stat.st_size == self.size and stat.st_mtime_ns == self.mtime_ns

    def check_types(self) -> None:
        """Raise ValueError naming every tensor of a type pdserve cannot load."""
        bad = sorted({(t.type_name, t.name) for t in self.tensors
                      if t.type_name not in SUPPORTED_TYPES})
        if bad:
            shown = ", ".join(f"{name} ({kind})" for kind, name in bad[:5])
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            raise ValueError(f"GGUF tensor type(s) {sorted({k for k, _ in bad})} are not supported "
                             f"(tensors {shown}{more}); supported: {', '.join(SUPPORTED_TYPES)}. "
                             "Use a GGUF quantized to one of those")


def read_gguf(path: str | Path, recorded_file: str | None = None) -> tuple[dict, GGUFIndex]:
    """Parse a GGUF header: (metadata without the vocabulary arrays, tensor index).

    ``recorded_file`` is how the index names the file (default: its absolute path).
    Raises ValueError on a missing, truncated or corrupt file, or without the gguf package.
    """
    gguf = import_gguf()
    path = Path(path)
    try:
        stat = path.stat()
        reader = gguf.GGUFReader(path)
        metadata = {key: field.contents() for key, field in reader.fields.items()
                    if not key.startswith("GGUF.") and key not in _SKIPPED_FIELDS}
    except OSError as e:
        raise ValueError(f"cannot read GGUF file {path}: {e.strerror or e}") from None
    except Exception as e:  # the reader raises ValueError, IndexError, struct/numpy errors
        raise ValueError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); it is "
                         "truncated or corrupt: download or convert it again") from None
    tensors = []
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        tensors.append(GGUFTensorInfo(t.name, t.tensor_type.name, shape, int(t.data_offset),
                                      int(t.n_bytes)))
        if t.data_offset + t.n_bytes > stat.st_size:
            raise ValueError(f"{path} ends inside tensor {t.name}: the file is truncated; "
                             "download it again")
    arch = metadata.get("general.architecture")
    index = GGUFIndex(recorded_file or str(path.resolve()), stat.st_size, stat.st_mtime_ns,
                      str(arch), tuple(tensors))
    return metadata, index


def open_tensors(model_dir: str | Path, index: GGUFIndex) -> dict[str, np.ndarray]:
    """Each tensor of the indexed file as a read-only numpy view of the mapped file: float
    arrays for F32/F16, rows of raw blocks (uint8, one row per matrix row) for the others.
    Raises ValueError if the file changed since the index was written."""
    gguf = import_gguf()
    path = index.path(model_dir)
    if not index.is_current(model_dir):
        raise ValueError(f"the GGUF file {path} is missing or changed since it was converted; "
                         f"delete {Path(model_dir)} so that pdserve converts it again")
    index.check_types()
    data = np.memmap(path, dtype=np.uint8, mode="r")
    views = {}
    for t in index.tensors:
        raw = data[t.offset:t.offset + t.num_bytes]
        if t.type_name == "F32":
            views[t.name] = raw.view(np.float32).reshape(t.shape)
        elif t.type_name == "F16":
            views[t.name] = raw.view(np.float16).reshape(t.shape)
        else:
            qtype = gguf.GGMLQuantizationType[t.type_name]
            views[t.name] = raw.reshape(gguf.quant_shape_to_byte_shape(t.shape, qtype))
    return views


def hf_tensor_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor (``blk.3.attn_q.weight`` ->
    ``model.layers.3.self_attn.q_proj.weight``), or None for a name pdserve does not know."""
    base, dot, suffix = gguf_name.rpartition(".")
    if not dot or suffix not in ("weight", "bias"):
        return None
    if base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{suffix}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}.{suffix}"
    return None


def permuted_heads(gguf_name: str, architecture: str, num_heads: int,
                   num_kv_heads: int) -> int | None:
    """Heads of a tensor whose rows llama.cpp permuted (q: attention heads, k: kv heads)."""
    if not ARCHITECTURES.get(architecture, ("", False))[1]:
        return None
    base = gguf_name.rpartition(".")[0]
    if base.endswith(".attn_q"):
        return num_heads
    if base.endswith(".attn_k"):
        return num_kv_heads
    return None


def hf_config(metadata: dict, index: GGUFIndex) -> tuple[dict, dict]:
    """(config.json, generation_config.json) of the model a GGUF holds, from its metadata.

    Raises ValueError on an unsupported architecture or a setting pdserve cannot serve.
    """
    arch = metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: "
                         f"{', '.join(ARCHITECTURES)} (the Llama family)")

    def get(key: str, default=None, required: bool = False):
        value = metadata.get(f"{arch}.{key}", default)
        if required and value is None:
            raise ValueError(f"the GGUF metadata has no {arch}.{key}; it is required")
        if value is not None and (isinstance(value, (list, bool, str))):
            raise ValueError(f"GGUF {arch}.{key} = {value!r} is not supported (expected a number)")
        return value

    names = index.names()
    embed = next((t for t in index.tensors if t.name == "token_embd.weight"), None)
    if embed is None or len(embed.shape) != 2:
        raise ValueError("the GGUF file has no 2-D token_embd.weight tensor")
    hidden, heads = get("embedding_length", required=True), get("attention.head_count", required=True)
    head_dim = get("attention.key_length") or hidden // heads
    for key in ("attention.value_length", "rope.dimension_count"):
        if get(key, head_dim) != head_dim:
            raise ValueError(f"GGUF {arch}.{key} = {get(key)} differs from the head size "
                             f"{head_dim}; only full-head rotary attention is supported")
    if "rope_freqs.weight" in names:
        raise ValueError("GGUF rope_freqs (per-frequency rope scaling, Llama 3.1+) is not "
                         "supported; use a checkpoint without it")
    config = {
        "architectures": [ARCHITECTURES[arch][0]], "model_type": arch,
        "vocab_size": embed.shape[0], "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length", required=True),
        "num_hidden_layers": get("block_count", required=True),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv") or heads,
        "head_dim": head_dim,
        "max_position_embeddings": get("context_length", required=True),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", required=True),
        "rope_theta": get("rope.freq_base", 10000.0),
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "dtype": "float32",
    }
    scaling = metadata.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise ValueError(f"GGUF rope scaling {scaling!r} is not supported; supported: linear")
        config["rope_scaling"] = {"rope_type": "linear",
                                  "factor": get("rope.scaling.factor", 1.0)}
    generation = {}
    bos = metadata.get("tokenizer.ggml.bos_token_id")
    if bos is not None:
        config["bos_token_id"] = generation["bos_token_id"] = int(bos)
    eos = [int(metadata[key]) for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                          "tokenizer.ggml.eom_token_id") if key in metadata]
    eos = list(dict.fromkeys(eos))
    if eos:
        config["eos_token_id"] = eos[0]
        generation["eos_token_id"] = eos if len(eos) > 1 else eos[0]
    return config, generation


def fingerprint_fields(index: GGUFIndex) -> list:
    """What identifies a GGUF's weights wherever the file lives: names, types, shapes."""
    return sorted([t.name, t.type_name, list(t.shape)] for t in index.tensors)


def file_key(path: str | Path) -> str:
    """A short key for a GGUF file's identity (path, size, modification time)."""
    import hashlib

    path = Path(path).resolve()
    stat = os.stat(path)
    return hashlib.sha256(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:12]
