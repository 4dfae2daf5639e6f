"""What the router knows about the served model: limits for validation, the tokenizer and
the chat template.

It comes from the router's ``--model`` directory, or else from the first worker that registers
(its Register info, and its model directory if this host can read it). torch-free.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from models.tokenizer import NoTokenizer, Tokenizer
from router.chat_template import ChatTemplate, ChatTemplateError

log = logging.getLogger("pdserve.router")


def load_tokenizer(model_dir: str | None) -> Tokenizer | None:
    """The model's tokenizer, or None if it has none (token-id prompts only)."""
    if not model_dir or not os.path.isdir(model_dir):
        return None
    try:
        return Tokenizer.from_dir(model_dir)
    except NoTokenizer:
        return None


def load_chat_template(model_dir: str | None) -> ChatTemplate | None:
    """The model's chat template, or None if it has none. Raises ChatTemplateError."""
    if not model_dir or not os.path.isdir(model_dir):
        return None
    return ChatTemplate.from_model_dir(model_dir)


@dataclass
class ModelInfo:
    """Limits the router validates requests against."""

    name: str
    fingerprint: str | None
    vocab_size: int
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    tokenizer: Tokenizer | None
    chat_template: ChatTemplate | None = None

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
                   tokenizer=tokenizer, chat_template=load_chat_template(model_dir))

    @classmethod
    def from_worker(cls, info: dict) -> "ModelInfo":
        """From a (validated) Register info dict."""
        tokenizer = load_tokenizer(info.get("model_dir"))
        if tokenizer is None and info.get("model_dir"):
            log.info("no tokenizer readable at %s: the router accepts token-id prompts only",
                     info["model_dir"])
        try:
            template = load_chat_template(info.get("model_dir")) if tokenizer else None
        except ChatTemplateError as exc:
            log.warning("the chat template at %s is unusable, chat requests will be refused: %s",
                        info.get("model_dir"), exc)
            template = None
        return cls(name=str(info.get("model") or "model"), fingerprint=info["fingerprint"],
                   vocab_size=info["vocab_size"], max_model_len=info["max_model_len"],
                   eos_token_ids=tuple(info.get("eos_token_ids") or ()), tokenizer=tokenizer,
                   chat_template=template)
