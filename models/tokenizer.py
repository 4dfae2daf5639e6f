"""Tokenizer wrapper over the ``tokenizers`` library, and incremental detokenization.

Torch-free: the router imports this to tokenize prompts and stream text.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from tokenizers import Tokenizer as HFTokenizer

REPLACEMENT_CHAR = "\ufffd"
# How many prompt tokens before the first output token the detokenizer re-decodes, so that
# the first output token's text is rendered in context (leading spaces, merged bytes).
PROMPT_CONTEXT_TOKENS = 5


class NoTokenizer(ValueError):
    """Raised when a model directory has no ``tokenizer.json``."""


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}; fix or remove the file") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def _token_content(token) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


def _ids(value) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


class Tokenizer:
    """Text <-> token ids for one model, with its special-token conventions.

    ``bos_token_id`` and ``eos_token_ids`` come from generation_config.json, config.json and
    tokenizer_config.json (every eos id any of them names ends a sequence). If
    tokenizer_config.json sets ``add_bos_token``, that decides whether ``encode`` prepends
    bos; otherwise the post-processor in tokenizer.json does.
    """

    def __init__(self, tokenizer: HFTokenizer, *, bos_token_id: int | None = None,
                 eos_token_ids: Sequence[int] = (), add_bos_token: bool | None = None):
        self._tokenizer = tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(dict.fromkeys(eos_token_ids))
        self.add_bos_token = add_bos_token

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "Tokenizer":
        """Load ``model_dir/tokenizer.json`` and the special-token settings next to it.

        Raises NoTokenizer if there is no tokenizer.json, ValueError if a file is unreadable.
        """
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise NoTokenizer(f"{model_dir} has no tokenizer.json; pass token ids instead of text, "
                              "or point to a model directory saved with its fast tokenizer")
        try:
            tokenizer = HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust library raises a bare Exception
            raise ValueError(f"cannot load {path}: {e}") from e
        tok_config = _read_json(model_dir / "tokenizer_config.json")
        gen_config = _read_json(model_dir / "generation_config.json")
        config = _read_json(model_dir / "config.json")

        def special_id(key: str) -> int | None:
            content = _token_content(tok_config.get(key))
            return None if content is None else tokenizer.token_to_id(content)

        bos_ids = _ids(gen_config.get("bos_token_id")) or _ids(config.get("bos_token_id"))
        bos = bos_ids[0] if bos_ids else special_id("bos_token")
        eos = _ids(gen_config.get("eos_token_id")) + _ids(config.get("eos_token_id"))
        tok_eos = special_id("eos_token")
        if tok_eos is not None:
            eos.append(tok_eos)
        add_bos = tok_config.get("add_bos_token")
        return cls(tokenizer, bos_token_id=bos, eos_token_ids=eos,
                   add_bos_token=add_bos if isinstance(add_bos, bool) else None)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``, with bos prepended if the model expects it and
        ``add_special_tokens`` (False for text a chat template rendered: it has its own)."""
        if not isinstance(text, str):
            raise ValueError(f"text to encode must be a string, got {type(text).__name__}")
        if not add_special_tokens:
            return self._tokenizer.encode(text, add_special_tokens=False).ids
        if self.add_bos_token is None:
            return self._tokenizer.encode(text).ids
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        if self.add_bos_token and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)


class IncrementalDetokenizer:
    """Turns a stream of output token ids into a stream of text, one complete character at a time.

    Keeps two offsets into the token list: text up to ``read_offset`` has been emitted, and
    decoding restarts at ``prefix_offset`` (the token before it), so each push decodes only a
    few tokens whatever the sequence length, yet renders spaces and merged bytes in context.
    Text ending in U+FFFD (a multi-byte character cut between tokens) is held back until the
    next token completes it.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] | None = None,
                 skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = list(prompt_ids or ())
        self._read_offset = len(self._ids)
        self._prefix_offset = max(self._read_offset - PROMPT_CONTEXT_TOKENS, 0)

    def push(self, new_ids: Sequence[int]) -> str:
        """Append output tokens; return the text they complete (possibly empty)."""
        pieces = []
        for token_id in new_ids:
            self._ids.append(token_id)
            pieces.append(self._emit(final=False))
        return "".join(pieces)

    def flush(self) -> str:
        """Return whatever is still held back (an unfinished character decodes as U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        decode = self._tokenizer.decode
        prefix_text = decode(self._ids[self._prefix_offset:self._read_offset], self._skip_special)
        text = decode(self._ids[self._prefix_offset:], self._skip_special)
        if text.endswith(REPLACEMENT_CHAR) and not final:
            return ""
        new_text = text[len(prefix_text):]
        read_offset, self._read_offset = self._read_offset, len(self._ids)
        if new_text:
            self._prefix_offset = read_offset
        else:
            # Tokens that render as nothing (skipped specials) must not grow the window forever.
            self._prefix_offset = max(self._prefix_offset,
                                      self._read_offset - PROMPT_CONTEXT_TOKENS)
        return new_text
