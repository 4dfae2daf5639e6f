"""Turn a GGUF file into a model directory that every pdserve process reads like a Hugging Face
checkpoint, once, cached:

    config.json               from the GGUF metadata (``models.gguf_file.hf_config``)
    generation_config.json    bos and eos ids from the metadata (eos, eot, eom)
    tokenizer.json            converted by transformers' GGUF tokenizer conversion
    tokenizer_config.json     its special tokens, and the chat template
    gguf_index.json           the tensor table, written last: its presence marks a finished conversion

(A GGUF without a vocabulary gets no tokenizer files and serves token-id prompts only.)

The weights stay in the GGUF file (the index names it); workers dequantize their own slices
when they load. The tokenizer conversion needs transformers, which imports torch, so it runs in
a subprocess (``python -m models.gguf_tokenizer``): the CLI and the router stay torch-free.
Several processes converting the same file at once write the same bytes, each file replaced
atomically, so a reader never sees a half-written one. torch-free.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from models.config import ModelConfig
from models.gguf_file import INDEX_FILE, GGUFIndex, hf_config, read_gguf

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
TOKENIZER_TIMEOUT_S = 900.0


def is_converted(model_dir: str | Path) -> bool:
    """Whether ``model_dir`` holds a finished conversion of a GGUF file that has not changed."""
    model_dir = Path(model_dir)
    if not (model_dir / INDEX_FILE).is_file():
        return False
    try:
        return GGUFIndex.load(model_dir).is_current(model_dir)
    except ValueError:
        return False


def convert_gguf(gguf_path: str | Path, model_dir: str | Path,
                 recorded_file: str | None = None) -> Path:
    """Make ``model_dir`` the converted model of ``gguf_path`` (nothing to do if it already is).

    ``recorded_file``: how the index names the GGUF (a name relative to ``model_dir`` when the
    file lives inside it; default: its absolute path). Raises ValueError on an unreadable or
    unsupported GGUF, or when the tokenizer conversion fails.
    """
    gguf_path, model_dir = Path(gguf_path), Path(model_dir)
    if is_converted(model_dir):
        return model_dir
    metadata, index = read_gguf(gguf_path, recorded_file)
    index.check_types()
    config, generation = hf_config(metadata, index)
    ModelConfig.from_hf_dict(config, generation)  # refuse what the engine cannot serve, now
    model_dir.mkdir(parents=True, exist_ok=True)
    _write_json(model_dir / "config.json", config)
    _write_json(model_dir / "generation_config.json", generation)
    if metadata.get("tokenizer.ggml.model"):
        _convert_tokenizer(gguf_path, model_dir)
    else:  # no vocabulary in the file: the model serves token-id prompts only
        for name in TOKENIZER_FILES:
            (model_dir / name).unlink(missing_ok=True)
    index.save(model_dir)  # last: it marks the conversion finished
    return model_dir


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _convert_tokenizer(gguf_path: Path, model_dir: Path) -> None:
    print(f"pdserve: converting the tokenizer of {gguf_path.name} (once; cached in {model_dir})",
          file=sys.stderr, flush=True)
    out = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=model_dir))
    try:
        try:
            done = subprocess.run([sys.executable, "-m", "models.gguf_tokenizer", str(gguf_path),
                                   str(out)], stdin=subprocess.DEVNULL, capture_output=True,
                                  text=True, timeout=TOKENIZER_TIMEOUT_S,
                                  env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
        except subprocess.TimeoutExpired:
            raise ValueError(f"converting the tokenizer of {gguf_path} took more than "
                             f"{TOKENIZER_TIMEOUT_S:g}s; giving up") from None
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            raise ValueError(f"cannot convert the tokenizer of {gguf_path}: "
                             f"{lines[-1] if lines else f'exit code {done.returncode}'}")
        for name in TOKENIZER_FILES:
            os.replace(out / name, model_dir / name)
    finally:
        shutil.rmtree(out, ignore_errors=True)
