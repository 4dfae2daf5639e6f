"""Validation of client requests: every field of a Generate, before any state changes.

Anything wrong raises ``InvalidRequest`` with a sentence saying what to change; the router
answers it as an ``invalid_request`` error. Ranges match ``models.sampler.SamplingParams``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from router import protocol as P
from router.chat_template import ChatTemplateError
from router.model_info import ModelInfo

DEFAULTS = {"max_tokens": 16, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "seed": None,
            "stop": None, "stop_token_ids": None, "ignore_eos": False}
SEED_LIMIT = 2**63
MAX_TEMPERATURE = 1000.0
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 256
MAX_RID_CHARS = 256
MAX_PROMPT_CHARS = 4 * 1024 * 1024
MAX_CHARS_PER_TOKEN = 64
MAX_TIMEOUT_S = 24 * 3600.0
MAX_MESSAGES = 4096


class InvalidRequest(ValueError):
    """A request the router refuses; the text says what is wrong and what to do."""


@dataclass(frozen=True)
class RequestSpec:
    """A validated Generate: what the router schedules."""

    prompt_ids: list[int]
    sampling: dict                   # the wire dict sent to workers (protocol.Allocate)
    stop: tuple[str, ...]
    max_tokens: int                  # after clipping to the max model length
    stream: bool
    timeout_s: float | None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_rid(rid) -> None:
    if not isinstance(rid, str) or not rid or len(rid) > MAX_RID_CHARS:
        raise InvalidRequest(f"rid must be a non-empty string of at most {MAX_RID_CHARS} characters")


def validate_generate(msg: P.Generate, model: ModelInfo, max_model_len: int) -> RequestSpec:
    """Check a Generate against the model; tokenize a text prompt. Raises InvalidRequest."""
    validate_rid(msg.rid)
    prompt_ids = _prompt_ids(msg, model, max_model_len)
    params = _params(msg.params, model)
    stream = msg.stream
    if not isinstance(stream, bool):
        raise InvalidRequest(f"stream must be true or false, got {stream!r}")
    timeout = msg.timeout_s
    if timeout is not None and (not _is_number(timeout) or not math.isfinite(timeout)
                                or not 0 < timeout <= MAX_TIMEOUT_S):
        raise InvalidRequest(f"timeout_s must be a number of seconds in (0, {MAX_TIMEOUT_S:g}] "
                             f"or null, got {timeout!r}")
    stop = params.pop("stop")
    max_tokens = min(params["max_tokens"], max_model_len - len(prompt_ids))
    params["max_tokens"] = max_tokens
    return RequestSpec(prompt_ids=prompt_ids, sampling=params, stop=stop, max_tokens=max_tokens,
                       stream=stream, timeout_s=None if timeout is None else float(timeout))


def _too_long(num_tokens: int, max_model_len: int) -> InvalidRequest:
    return InvalidRequest(f"the prompt has {num_tokens} tokens but the max model length is "
                          f"{max_model_len} (prompt and output together); shorten the prompt")


def _prompt_ids(msg: P.Generate, model: ModelInfo, max_model_len: int) -> list[int]:
    given = sum(x is not None for x in (msg.prompt, msg.prompt_token_ids, msg.messages))
    if given != 1:
        raise InvalidRequest("give exactly one of prompt (text), prompt_token_ids and messages (chat)")
    if msg.messages is not None:
        return _text_ids(render_chat(msg.messages, model), model, max_model_len, chat=True)
    if msg.prompt is not None:
        if not msg.prompt:
            raise InvalidRequest("the prompt is empty; send at least one character")
        return _text_ids(msg.prompt, model, max_model_len, chat=False)
    ids = msg.prompt_token_ids
    if not ids:
        raise InvalidRequest("prompt_token_ids is empty; send at least one token id")
    if len(ids) >= max_model_len:
        raise _too_long(len(ids), max_model_len)
    vocab = model.vocab_size
    for i, tok in enumerate(ids):
        if not _is_int(tok) or not 0 <= tok < vocab:
            raise InvalidRequest(f"prompt_token_ids[{i}] = {tok!r} is not a token id of this model "
                                 f"(integers in [0, {vocab}))")
    return list(ids)


def render_chat(messages: list, model: ModelInfo) -> str:
    """The prompt text of a chat, rendered with the model's chat template."""
    if model.chat_template is None:
        raise InvalidRequest(f"model {model.name} has no chat template; send a prompt (text) or "
                             "prompt_token_ids instead of messages")
    if len(messages) > MAX_MESSAGES:
        raise InvalidRequest(f"a chat may hold at most {MAX_MESSAGES} messages, got {len(messages)}")
    try:
        return model.chat_template.render(messages, add_generation_prompt=True)
    except ChatTemplateError as exc:
        raise InvalidRequest(f"cannot render the chat: {exc}") from None


def _text_ids(text: str, model: ModelInfo, max_model_len: int, chat: bool) -> list[int]:
    # Bound the tokenizer's work: no tokenizer packs this many characters into one token.
    max_chars = min(MAX_PROMPT_CHARS, MAX_CHARS_PER_TOKEN * max_model_len)
    what = "the chat" if chat else "the prompt"
    if len(text) > max_chars:
        raise InvalidRequest(f"{what} has {len(text)} characters, far more than the max model "
                             f"length of {max_model_len} tokens; shorten {what}")
    if model.tokenizer is None:
        raise InvalidRequest(f"model {model.name} has no tokenizer; send prompt_token_ids "
                             "instead of text")
    # A rendered chat already holds its special tokens (as in apply_chat_template).
    ids = model.tokenizer.encode(text, add_special_tokens=not chat)
    if not ids:
        raise InvalidRequest(f"{what} encodes to no tokens; send some text")
    if len(ids) >= max_model_len:
        raise _too_long(len(ids), max_model_len)
    return ids


def _params(raw, model: ModelInfo) -> dict:
    if not isinstance(raw, dict):
        raise InvalidRequest(f"params must be a mapping, got {type(raw).__name__}")
    unknown = sorted(str(key) for key in raw if key not in DEFAULTS)
    if unknown:
        raise InvalidRequest(f"unknown parameter(s) {', '.join(unknown)}; known: {', '.join(DEFAULTS)}")
    p = {**DEFAULTS, **raw}
    if not _is_int(p["max_tokens"]) or p["max_tokens"] < 1:
        raise InvalidRequest(f"max_tokens must be a positive integer, got {p['max_tokens']!r}")
    t = p["temperature"]
    if not _is_number(t) or not math.isfinite(t) or not 0 <= t <= MAX_TEMPERATURE:
        raise InvalidRequest(f"temperature must be a number in [0, {MAX_TEMPERATURE:g}] (0 = greedy), got {t!r}")
    if not _is_number(p["top_p"]) or not 0 < p["top_p"] <= 1:
        raise InvalidRequest(f"top_p must be a number in (0, 1] (1 = off), got {p['top_p']!r}")
    if not _is_int(p["top_k"]) or p["top_k"] < 0:
        raise InvalidRequest(f"top_k must be an integer >= 0 (0 = off), got {p['top_k']!r}")
    seed = p["seed"]
    if seed is not None and (not _is_int(seed) or not 0 <= seed < SEED_LIMIT):
        raise InvalidRequest(f"seed must be null or an integer in [0, 2**63), got {seed!r}")
    if not isinstance(p["ignore_eos"], bool):
        raise InvalidRequest(f"ignore_eos must be true or false, got {p['ignore_eos']!r}")
    stop_ids = p["stop_token_ids"] or []
    if not isinstance(stop_ids, list) or len(stop_ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidRequest(f"stop_token_ids must be a list of at most {MAX_STOP_TOKEN_IDS} token ids")
    for tok in stop_ids:
        if not _is_int(tok) or not 0 <= tok < model.vocab_size:
            raise InvalidRequest(f"stop_token_ids contains {tok!r}, not a token id of this model "
                                 f"(integers in [0, {model.vocab_size}))")
    return {"max_tokens": p["max_tokens"], "temperature": float(t), "top_p": float(p["top_p"]),
            "top_k": p["top_k"], "seed": seed, "stop_token_ids": list(dict.fromkeys(stop_ids)),
            "ignore_eos": p["ignore_eos"], "stop": _stop_strings(p["stop"], model)}


def _stop_strings(stop, model: ModelInfo) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS:
        raise InvalidRequest(f"stop must be a string or a list of at most {MAX_STOP_STRINGS} strings")
    for s in stop:
        if not isinstance(s, str) or not 0 < len(s) <= MAX_STOP_CHARS:
            raise InvalidRequest(f"each stop string must be a non-empty string of at most "
                                 f"{MAX_STOP_CHARS} characters, got {s!r:.80}")
    if stop and model.tokenizer is None:
        raise InvalidRequest(f"model {model.name} has no tokenizer, so stop strings cannot be "
                             "matched; use stop_token_ids")
    return tuple(dict.fromkeys(stop))
