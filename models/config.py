"""Model configuration parsed from a Hugging Face checkpoint directory.

Torch-free (the router reads it to check fingerprints and KV specs). Understands the
Llama family: ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM`` and
``Qwen3ForCausalLM``, with both spellings of the rope settings (``rope_theta`` +
``rope_scaling`` before transformers 5, ``rope_parameters`` since).
"""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

from kvtransfer.spec import DTYPE_SIZES, KVSpec
from models.gguf_file import INDEX_FILE as GGUF_INDEX
from models.gguf_file import GGUFIndex, fingerprint_fields

# architecture name in config.json -> (family, has q/k/v bias by default, has q/k RMSNorm)
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", False, False),
    "MistralForCausalLM": ("mistral", False, False),
    "Qwen2ForCausalLM": ("qwen2", True, False),
    "Qwen3ForCausalLM": ("qwen3", False, True),
}
ROPE_TYPES = ("default", "linear", "llama3")
CONFIG_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16",
                 "fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16",
                 "float": "float32"}
SAFETENSORS_MAX_HEADER = 100 << 20


@dataclass(frozen=True)
class RopeScaling:
    """Rotary frequency scaling: ``linear`` divides positions by ``factor``; ``llama3``
    rescales low frequencies only (Llama 3.1+)."""

    rope_type: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in ("linear", "llama3"):
            raise ValueError(f"rope scaling type {self.rope_type!r} is not supported; "
                             "supported: linear, llama3 (or none)")
        if not self.factor > 0:
            raise ValueError(f"rope scaling factor must be positive, got {self.factor}")
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ValueError("llama3 rope scaling needs high_freq_factor > low_freq_factor, got "
                             f"{self.high_freq_factor} and {self.low_freq_factor}")


@dataclass(frozen=True)
class ModelConfig:
    """The architecture hyper-parameters the engine needs, validated at construction."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    attention_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    dtype: str | None = None
    sliding_window: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture {self.architecture!r} is not supported; "
                             f"supported: {', '.join(ARCHITECTURES)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"model config {name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads ({self.num_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not self.rms_norm_eps > 0 or not self.rope_theta > 0:
            raise ValueError("rms_norm_eps and rope_theta must be positive, got "
                             f"{self.rms_norm_eps} and {self.rope_theta}")
        if self.dtype is not None and self.dtype not in DTYPE_SIZES:
            raise ValueError(f"model dtype {self.dtype!r} is not supported; use one of "
                             f"{sorted(DTYPE_SIZES)}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(
                f"sliding_window must be positive or absent, got {self.sliding_window}")

    @property
    def family(self) -> str:
        return ARCHITECTURES[self.architecture][0]

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "ModelConfig":
        """Parse ``config.json`` (and ``generation_config.json`` for EOS ids) in ``model_dir``.

        Raises ``ValueError`` naming the missing file, unsupported architecture or option.
        """
        model_dir = Path(model_dir)
        hf = _read_json(model_dir / "config.json", required=True)
        generation = _read_json(model_dir / "generation_config.json", required=False)
        return cls.from_hf_dict(hf, generation)

    @classmethod
    def from_hf_dict(cls, hf: dict, generation: dict | None = None) -> "ModelConfig":
        """Build from the dict of a Hugging Face ``config.json`` (see ``from_pretrained``)."""
        archs = hf.get("architectures") or []
        if not isinstance(archs, list) or len(archs) != 1:
            raise ValueError(f"config.json must name exactly one architecture, got {archs!r}; "
                             f"supported: {', '.join(ARCHITECTURES)}")
        arch = archs[0]
        if arch not in ARCHITECTURES:
            raise ValueError(f"architecture {arch!r} is not supported; "
                             f"supported: {', '.join(ARCHITECTURES)}")
        family, default_bias, qk_norm = ARCHITECTURES[arch]
        _reject_unsupported(hf, family)
        num_heads = _get(hf, "num_attention_heads")
        hidden = _get(hf, "hidden_size")
        num_kv_heads = hf.get("num_key_value_heads") or num_heads
        head_dim = hf.get("head_dim")
        if head_dim is None and isinstance(hidden, int) and isinstance(num_heads, int) \
                and num_heads > 0:
            if hidden % num_heads:
                raise ValueError(f"hidden_size {hidden} is not a multiple of num_attention_heads "
                                 f"{num_heads}; set head_dim in config.json")
            head_dim = hidden // num_heads
        rope_theta, rope_scaling = _parse_rope(hf)
        dtype = hf.get("dtype") or hf.get("torch_dtype")
        if dtype is not None:
            if str(dtype) not in CONFIG_DTYPES:
                raise ValueError(f"config.json dtype {dtype!r} is not supported; "
                                 f"use one of {sorted(DTYPE_SIZES)}")
            dtype = CONFIG_DTYPES[str(dtype)]
        max_pos = _get(hf, "max_position_embeddings")
        window = hf.get("sliding_window")
        if family in ("qwen2", "qwen3") or not isinstance(window, int) \
                or not isinstance(max_pos, int) or window >= max_pos:
            window = None  # qwen: only with use_sliding_window, rejected above
        return cls(
            architecture=arch,
            vocab_size=_get(hf, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_get(hf, "intermediate_size"),
            num_layers=_get(hf, "num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=_number(hf, "rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            attention_bias=bool(hf.get("attention_bias", default_bias)),
            qk_norm=qk_norm,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=max_pos,
            dtype=dtype,
            sliding_window=window,
            eos_token_ids=_eos_ids(hf, generation or {}),
            bos_token_id=_bos_id(hf, generation or {}),
        )

    def kv_spec(self, block_size: int, dtype: str) -> KVSpec:
        """The KV cache layout of this model (all kv heads; TP shards it by head)."""
        return KVSpec(num_layers=self.num_layers, num_kv_heads=self.num_kv_heads,
                      head_dim=self.head_dim, block_size=block_size, dtype=str(dtype))


def model_fingerprint(model_dir: str | Path) -> str:
    """A short stable hash of ``config.json`` and every safetensors header (names, shapes,
    dtypes), or of a converted GGUF's tensor table: equal for identical checkpoints wherever
    they live. Raises ``ValueError`` on a missing config, no weights or an unreadable header."""
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    config = _read_json(model_dir / "config.json", required=True)
    digest.update(json.dumps(config, sort_keys=True).encode())
    files = sorted(model_dir.glob("*.safetensors"))
    if not files and (model_dir / GGUF_INDEX).is_file():
        index = GGUFIndex.load(model_dir)
        digest.update(json.dumps(fingerprint_fields(index)).encode())
        return digest.hexdigest()[:16]
    if not files:
        raise ValueError(f"no *.safetensors weights in {model_dir}")
    tensors = {}
    for path in files:
        for name, info in read_safetensors_header(path).items():
            if name != "__metadata__":
                tensors[name] = (info.get("dtype"), info.get("shape"))
    digest.update(json.dumps(sorted(tensors.items())).encode())
    return digest.hexdigest()[:16]


def read_safetensors_header(path: str | Path) -> dict:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, data_offsets)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ValueError("file shorter than its 8-byte header length")
            (length,) = struct.unpack("<Q", prefix)
            if length > SAFETENSORS_MAX_HEADER:
                raise ValueError(f"header length {length} is implausible")
            raw = f.read(length)
            if len(raw) < length:
                raise ValueError("file ends inside its header")
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        return header
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read safetensors header of {path}: {e}; the file is truncated "
                         "or corrupt, download or save the checkpoint again") from None


# -- parsing helpers ---------------------------------------------------------------------
def _read_json(path: Path, required: bool) -> dict | None:
    if not path.is_file():
        if required:
            raise ValueError(f"{path} not found: point --model at a Hugging Face checkpoint "
                             "directory that holds config.json and *.safetensors")
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); fix or re-download it") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _number(d: dict, key: str, default: float) -> float:
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"config.json {key} must be a number, got {value!r}")
    return float(value)


def _get(hf: dict, key: str):
    if key not in hf:
        raise ValueError(f"config.json has no {key!r}; it is required for this architecture")
    return hf[key]


def _reject_unsupported(hf: dict, family: str) -> None:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act {act!r} is not supported; only silu (SwiGLU MLP)")
    if hf.get("mlp_bias"):
        raise ValueError("mlp_bias=true is not supported")
    if (hf.get("pretraining_tp") or 1) != 1:
        raise ValueError(f"pretraining_tp={hf['pretraining_tp']} is not supported; use 1")
    if family in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
        raise ValueError(f"use_sliding_window=true is not supported for {family}; "
                         "set it to false in config.json")
    layer_types = hf.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise ValueError(f"layer_types {sorted(set(layer_types))} are not supported; "
                         "only full_attention layers")
    if hf.get("quantization_config"):
        raise ValueError("quantized checkpoints (quantization_config) are not supported; "
                         "use a float32/bfloat16/float16 checkpoint")


def _parse_rope(hf: dict) -> tuple[float, RopeScaling | None]:
    params = hf.get("rope_parameters")
    if params is None:
        theta = _number(hf, "rope_theta", 10000.0)
        params = hf.get("rope_scaling") or {}
        if not isinstance(params, dict):
            raise ValueError(f"rope_scaling {params!r} must be a mapping")
    else:
        if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
            raise ValueError(f"rope_parameters {params!r} are not supported; "
                             "expected one flat mapping with rope_type and rope_theta")
        theta = _number(params, "rope_theta", _number(hf, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope type {rope_type!r} is not supported; supported: "
                         f"{', '.join(ROPE_TYPES)}")
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ValueError(f"partial_rotary_factor={partial} is not supported; only 1.0")
    if rope_type == "default":
        return theta, None
    scaling = RopeScaling(
        rope_type=rope_type,
        factor=_number(params, "factor", 1.0),
        low_freq_factor=_number(params, "low_freq_factor", 1.0),
        high_freq_factor=_number(params, "high_freq_factor", 4.0),
        original_max_position_embeddings=int(
            _number(params, "original_max_position_embeddings", 8192)),
    )
    return theta, scaling


def _bos_id(hf: dict, generation: dict) -> int | None:
    bos = generation.get("bos_token_id")
    if bos is None:
        bos = hf.get("bos_token_id")
    return bos if isinstance(bos, int) and not isinstance(bos, bool) and bos >= 0 else None


def _eos_ids(hf: dict, generation: dict) -> tuple[int, ...]:
    eos = generation.get("eos_token_id")
    if eos is None:
        eos = hf.get("eos_token_id")
    if eos is None:
        return ()
    ids = eos if isinstance(eos, list) else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"eos_token_id {eos!r} must be a token id or a list of token ids")
    return tuple(ids)
