"""What the router knows about the served model: limits for validation, the tokenizer and
the chat template.

It comes from the router's ``--model`` directory, or else from the first worker that registers
(its Register info, and its model directory if this host can read it). torch-free.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from models.tokenizer import NoTokenizer, Tokenizer

if TYPE_CHECKING:
    from router.chat_template import ChatTemplate

log = logging.getLogger("pdserve.router")
_NOT_LOADED = object()


def load_tokenizer(model_dir: str | None) -> Tokenizer | None:
    """The model's tokenizer, or None if it has none (token-id prompts only)."""
    if not model_dir or not os.path.isdir(model_dir):
        return None
    try:
        return Tokenizer.from_dir(model_dir)
    except NoTokenizer:
        return None


@dataclass
class ModelInfo:
    """Limits the router validates requests against."""

    name: str
    fingerprint: str | None
    vocab_size: int
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    tokenizer: Tokenizer | None
    model_dir: str | None = None  # where the chat template is read from (None: no chats)
    _chat_template: Any = field(default=_NOT_LOADED, repr=False, compare=False)

    def chat_template(self) -> "ChatTemplate | None":
        """The model's chat template, read on the first chat (so a router that never sees one
        never loads jinja2); None if the model has none. Raises ChatTemplateError."""
        if self._chat_template is _NOT_LOADED:
            from router.chat_template import ChatTemplate

            model_dir = self.model_dir
            self._chat_template = (ChatTemplate.from_model_dir(model_dir)
                                   if model_dir and os.path.isdir(model_dir) else None)
        return self._chat_template

    @classmethod
    def from_dir(cls, model_dir: str) -> "ModelInfo":
        """Read config.json, the fingerprint and the tokenizer. Raises ValueError."""
        from models.config import ModelConfig, model_fingerprint

        config = ModelConfig.from_pretrained(model_dir)
        tokenizer = load_tokenizer(model_dir)
        eos = tuple(config.eos_token_ids) or (tokenizer.eos_token_ids if tokenizer else ())
        return cls(name=os.path.basename(os.path.normpath(model_dir)),
                   fingerprint=model_fingerprint(model_dir), vocab_size=config.vocab_size,
                   max_model_len=config.max_position_embeddings, eos_token_ids=tuple(eos),
                   tokenizer=tokenizer, model_dir=model_dir)

    @classmethod
    def from_worker(cls, info: dict) -> "ModelInfo":
        """From a (validated) Register info dict."""
        tokenizer = load_tokenizer(info.get("model_dir"))
        if tokenizer is None and info.get("model_dir"):
            log.info("no tokenizer readable at %s: the router accepts token-id prompts only",
                     info["model_dir"])
        return cls(name=str(info.get("model") or "model"), fingerprint=info["fingerprint"],
                   vocab_size=info["vocab_size"], max_model_len=info["max_model_len"],
                   eos_token_ids=tuple(info.get("eos_token_ids") or ()), tokenizer=tokenizer,
                   model_dir=info.get("model_dir") if tokenizer else None)
