"""A GGUF file's tokenizer, converted by transformers and saved as tokenizer.json and
tokenizer_config.json (with the chat template). Run as a subprocess by models/gguf_convert.py:

    python -m models.gguf_tokenizer FILE.gguf OUT_DIR

transformers imports torch; running it apart keeps the processes that call the conversion
torch-free. Exits 1 with one line on stderr when it fails.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

MISSING = ("converting a GGUF tokenizer needs transformers, gguf and accelerate: "
           "pip install 'pdserve[gguf]'")


def convert_tokenizer(gguf_path: Path, out_dir: Path) -> None:
    """Save the tokenizer that ``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` builds.

    transformers 5 saves the chat template as chat_template.jinja; it goes into
    tokenizer_config.json instead, where every reader of a model directory finds it.
    """
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ValueError(MISSING) from None
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer.save_pretrained(str(out_dir))
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    template = tokenizer.chat_template
    if isinstance(template, str) and template:
        config["chat_template"] = template
    for name in ("chat_template.jinja", "special_tokens_map.json"):
        (out_dir / name).unlink(missing_ok=True)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m models.gguf_tokenizer FILE.gguf OUT_DIR", file=sys.stderr)
        return 2
    try:
        convert_tokenizer(Path(argv[0]).resolve(), Path(argv[1]))
    except Exception as exc:  # one line for the parent to show, whatever transformers raised
        print(f"{type(exc).__name__}: {exc}".replace("\n", " "), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
