"""Build a model on the meta device and fill it from safetensors or GGUF, each rank reading
only its own slice of each tensor (memory-mapped ``get_slice`` or ``GGUFSlice``, never the full
tensor): the loop hands every checkpoint tensor to its parameter's ``weight_loader``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from models.config import ModelConfig
from models.gguf_file import INDEX_FILE as GGUF_INDEX
from models.llama import LlamaForCausalLM
from models.parallel import SINGLE, ParallelContext

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Buffers some checkpoints carry that the model recomputes.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


def cpu_has_native_bf16() -> bool:
    """The CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16) and oneDNN can use it.
    Without it every bf16 matmul widens to float32 in software, slower than float32 itself."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return torch.backends.mkldnn.is_available() and ("avx512_bf16" in flags
                                                      or "amx_bf16" in flags)


def resolve_dtype(dtype: str | torch.dtype, config: ModelConfig,
                  device: torch.device | str = "cpu") -> torch.dtype:
    """``"auto"`` -> the checkpoint's dtype (float32 when it names none), except that a
    half-precision checkpoint runs in float32 on a CPU that lacks native bf16 (there the
    half-precision kernels are several times slower; see ``cpu_has_native_bf16``)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; use one of {sorted(DTYPES)}")
        return dtype
    if dtype == "auto":
        wanted = DTYPES[config.dtype or "float32"]
        if torch.device(device).type == "cpu" and wanted != torch.float32 \
                and not (wanted == torch.bfloat16 and cpu_has_native_bf16()):
            return torch.float32
        return wanted
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use auto or one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def weight_files(model_dir: Path) -> list[Path]:
    """The checkpoint's safetensors files: those of the sharded index, or model.safetensors."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index} is not a valid safetensors index ({e!r}); "
                             "re-download or re-save the checkpoint") from None
        files = [model_dir / name for name in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"{index} lists shard(s) that do not exist: {missing}; "
                             "the checkpoint download is incomplete")
        return files
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise ValueError(f"no model.safetensors, model.safetensors.index.json or {GGUF_INDEX} in "
                     f"{model_dir}; point --model at a safetensors checkpoint or a .gguf file")


def is_gguf_model(model_dir: Path) -> bool:
    """A converted GGUF model (models/gguf_convert.py) with no safetensors beside it."""
    return (model_dir / GGUF_INDEX).is_file() and not (
        (model_dir / "model.safetensors").is_file()
        or (model_dir / "model.safetensors.index.json").is_file())


def checkpoint_tensors(model_dir: Path,
                       config: ModelConfig) -> Iterator[tuple[str | Path, str, str | None, object]]:
    """(file, checkpoint name, Hugging Face name or None if unknown, lazy slice) of every
    tensor in the checkpoint, safetensors or GGUF."""
    if is_gguf_model(model_dir):
        from models.gguf_weights import gguf_tensors

        for name, hf_name, loaded in gguf_tensors(model_dir, config.num_heads, config.num_kv_heads):
            yield "the GGUF file", name, hf_name, loaded
        return
    for path in weight_files(model_dir):
        try:
            opened = safe_open(str(path), framework="pt", device="cpu")
        except SafetensorError as e:
            raise _corrupt(path, e) from None
        with opened as f:
            for name in f.keys():
                yield path, name, name, f.get_slice(name)


def _corrupt(path: str | Path, error: Exception) -> ValueError:
    return ValueError(f"cannot read {path}: {error}; the file is truncated or corrupt, "
                      "download or save the checkpoint again")


def materialize(model: nn.Module, device: torch.device | str, dtype: torch.dtype) -> None:
    """Replace meta parameters with uninitialized ones on ``device``, keeping ties (one
    parameter shared by two modules stays shared) and attributes such as weight_loader."""
    replaced: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in replaced:
                new = nn.Parameter(torch.empty(param.shape, dtype=dtype, device=device),
                                   requires_grad=False)
                new.__dict__.update(param.__dict__)
                replaced[id(param)] = new
            module._parameters[name] = replaced[id(param)]


def load_model(model_dir: str | Path, config: ModelConfig, *, dtype: torch.dtype,
               device: torch.device | str = "cpu", ctx: ParallelContext = SINGLE,
               max_positions: int | None = None) -> LlamaForCausalLM:
    """Build ``LlamaForCausalLM`` for this rank and load its weights from ``model_dir``.

    Raises ``ValueError`` naming any missing, unexpected or mis-shaped tensor, and the file
    of a truncated or corrupt checkpoint.
    """
    model_dir = Path(model_dir)
    with torch.device("meta"):
        model = LlamaForCausalLM(config, ctx)
    materialize(model, device, dtype)
    params = dict(model.named_parameters())  # tied weights appear once
    expected = _expected_shards(model, params)
    loaded: set[tuple[str, object]] = set()
    unexpected: list[str] = []
    where = str(model_dir)
    try:
        for where, name, hf_name, tensor in checkpoint_tensors(model_dir, config):
            target = None if hf_name is None else _target(model, hf_name)
            if hf_name is None or (target is not None and target[0] not in params):
                unexpected.append(name)
                continue
            if target is None:
                continue
            param = params[target[0]]
            try:
                param.weight_loader(param, tensor, target[1])
            except ValueError as e:
                raise ValueError(f"tensor {name} in {Path(where).name}: {e}") from None
            loaded.add(target)
    except SafetensorError as e:
        raise _corrupt(where, e) from None
    if unexpected:
        raise ValueError(f"checkpoint {model_dir} has tensor(s) this {config.architecture} "
                         f"does not use: {sorted(unexpected)}; the config and weights disagree")
    missing = sorted(_checkpoint_name(model, key) for key in expected - loaded)
    if missing:
        raise ValueError(f"checkpoint {model_dir} lacks tensor(s): {missing}; "
                         "the download is incomplete or the config and weights disagree")
    model.init_rotary(max_positions or config.max_position_embeddings, dtype, device)
    return model.eval()


def _target(model: LlamaForCausalLM, name: str) -> tuple[str, object] | None:
    """(parameter name, shard id) a checkpoint tensor loads into; None to skip it."""
    if name.endswith(IGNORED_SUFFIXES):
        return None
    if name == "lm_head.weight" and model.config.tie_word_embeddings:
        return None  # some tied checkpoints store the shared tensor twice
    for ckpt, (fused, shard_id) in model.packed_modules_mapping.items():
        part = f".{ckpt}."
        if part in name:
            return name.replace(part, f".{fused}."), shard_id
    return name, None


def _expected_shards(model: LlamaForCausalLM, params: dict) -> set[tuple[str, object]]:
    shards_of: dict[str, list] = {}
    for fused, shard_id in model.packed_modules_mapping.values():
        shards_of.setdefault(fused, []).append(shard_id)
    expected = set()
    for name in params:
        module = name.rsplit(".", 2)[-2] if name.count(".") >= 2 else ""
        for shard_id in shards_of.get(module, [None]):
            expected.add((name, shard_id))
    return expected


def _checkpoint_name(model: LlamaForCausalLM, key: tuple[str, object]) -> str:
    name, shard_id = key
    for ckpt, (fused, sid) in model.packed_modules_mapping.items():
        if sid == shard_id and f".{fused}." in name:
            return name.replace(f".{fused}.", f".{ckpt}.")
    return name
