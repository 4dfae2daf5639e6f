"""Validation of client requests: every field of a Generate, before any state changes.

Anything wrong raises ``InvalidRequest`` with a sentence saying what to change; the router
answers it as an ``invalid_request`` error. The sampling and token-level stop options are
``models.request_options.RequestOptions`` (their one definition); this module adds what depends on
the model (vocabulary, tokenizer, max length) and what only the router handles (stop strings).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from models.request_options import RequestOptions, is_int, is_number
from router import protocol as P
from router.model_info import ModelInfo

PARAM_NAMES = (*RequestOptions.__dataclass_fields__, "stop")
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
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
    options: RequestOptions          # max_tokens clipped to the max model length
    stop: tuple[str, ...]
    stream: bool
    timeout_s: float | None

    @property
    def max_tokens(self) -> int:
        return self.options.max_tokens

    @property
    def sampling(self) -> dict:
        """The options as sent to workers (``Allocate.sampling``, ``Prefill.sampling``)."""
        return self.options.to_wire()


def validate_rid(rid) -> None:
    if not isinstance(rid, str) or not rid or len(rid) > MAX_RID_CHARS:
        raise InvalidRequest(f"rid must be a non-empty string of at most {MAX_RID_CHARS} characters")


def validate_generate(msg: P.Generate, model: ModelInfo, max_model_len: int,
                      encoded: list[int] | None = None) -> RequestSpec:
    """Check a Generate against the model; tokenize a text prompt (unless ``encoded`` holds its
    token ids already, tokenized off the loop by router/tokenizing.py). Raises InvalidRequest."""
    validate_rid(msg.rid)
    prompt_ids = _prompt_ids(msg, model, max_model_len, encoded)
    options, stop = _params(msg.params, model)
    stream = msg.stream
    if not isinstance(stream, bool):
        raise InvalidRequest(f"stream must be true or false, got {stream!r}")
    timeout = msg.timeout_s
    if timeout is not None and (not is_number(timeout) or not math.isfinite(timeout)
                                or not 0 < timeout <= MAX_TIMEOUT_S):
        raise InvalidRequest(f"timeout_s must be a number of seconds in (0, {MAX_TIMEOUT_S:g}] "
                             f"or null, got {timeout!r}")
    options = dataclasses.replace(options, max_tokens=min(options.max_tokens, max_model_len - len(prompt_ids)))
    return RequestSpec(prompt_ids=prompt_ids, options=options, stop=stop, stream=stream,
                       timeout_s=None if timeout is None else float(timeout))


def _too_long(num_tokens: int, max_model_len: int) -> InvalidRequest:
    return InvalidRequest(f"the prompt has {num_tokens} tokens but the max model length is "
                          f"{max_model_len} (prompt and output together); shorten the prompt")


def check_text_prompt(msg: P.Generate, model: ModelInfo, max_model_len: int) -> None:
    """The checks on a text prompt that come before tokenizing it. Raises InvalidRequest."""
    if sum(x is not None for x in (msg.prompt, msg.prompt_token_ids, msg.messages)) != 1:
        raise InvalidRequest("give exactly one of prompt (text), prompt_token_ids and "
                             "messages (chat)")
    if msg.prompt is None:
        return
    if not msg.prompt:
        raise InvalidRequest("the prompt is empty; send at least one character")
    _check_text(msg.prompt, "the prompt", model, max_model_len)


def _check_text(text: str, what: str, model: ModelInfo, max_model_len: int) -> None:
    # Bound the tokenizer's work: no tokenizer packs this many characters into one token.
    max_chars = min(MAX_PROMPT_CHARS, MAX_CHARS_PER_TOKEN * max_model_len)
    if len(text) > max_chars:
        raise InvalidRequest(f"{what} has {len(text)} characters, far more than the "
                             f"max model length of {max_model_len} tokens; shorten {what}")
    if model.tokenizer is None:
        raise InvalidRequest(f"model {model.name} has no tokenizer; send prompt_token_ids "
                             "instead of text")


def encode_prompt(msg: P.Generate, model: ModelInfo, max_model_len: int) -> list[int]:
    """The token ids of a text prompt or a chat (``check_text_prompt`` passed), checked against
    the max model length: the slow part of ``validate_generate``, which router/tokenizing.py
    runs off the event loop for long prompts. Raises InvalidRequest."""
    if msg.messages is not None:
        text = render_chat(msg.messages, model)
        _check_text(text, "the chat", model, max_model_len)
        # A rendered chat holds its own special tokens (as in transformers' apply_chat_template).
        return _encoded(model.tokenizer.encode(text, add_special_tokens=False), "the chat",
                        max_model_len)
    return _encoded(model.tokenizer.encode(msg.prompt), "the prompt", max_model_len)


def prompt_chars(msg: P.Generate) -> int:
    """About how many characters tokenizing ``msg`` reads (0 for token ids): what decides
    whether it is done off the event loop."""
    if isinstance(msg.prompt, str):
        return len(msg.prompt)
    return messages_chars(msg.messages) if isinstance(msg.messages, list) else 0


def messages_chars(messages: list) -> int:
    """About how many characters a chat's messages hold (their string fields and text parts)."""
    total = 0
    for message in messages:
        for value in message.values() if isinstance(message, dict) else ():
            if isinstance(value, str):
                total += len(value)
            elif isinstance(value, list):  # content parts: [{"type": "text", "text": ...}, ...]
                total += sum(len(v) for part in value if isinstance(part, dict)
                             for v in part.values() if isinstance(v, str))
    return total


def _prompt_ids(msg: P.Generate, model: ModelInfo, max_model_len: int,
                encoded: list[int] | None) -> list[int]:
    check_text_prompt(msg, model, max_model_len)
    if encoded is not None:
        return encoded  # encode_prompt ran off the loop
    if msg.messages is not None or msg.prompt is not None:
        return encode_prompt(msg, model, max_model_len)
    ids = msg.prompt_token_ids
    if not ids:
        raise InvalidRequest("prompt_token_ids is empty; send at least one token id")
    if len(ids) >= max_model_len:
        raise _too_long(len(ids), max_model_len)
    vocab = model.vocab_size
    for i, tok in enumerate(ids):
        if not is_int(tok) or not 0 <= tok < vocab:
            raise InvalidRequest(f"prompt_token_ids[{i}] = {tok!r} is not a token id of this model "
                                 f"(integers in [0, {vocab}))")
    return list(ids)


def render_chat(messages: list, model: ModelInfo) -> str:
    """The prompt text of a chat, rendered with the model's chat template."""
    from router.chat_template import ChatTemplateError  # jinja2 only once a chat arrives

    try:
        template = model.chat_template()
    except ChatTemplateError as exc:
        raise InvalidRequest(f"model {model.name} has an unusable chat template ({exc}); send a "
                             "prompt (text) or prompt_token_ids instead of messages") from None
    if template is None:
        raise InvalidRequest(f"model {model.name} has no chat template; send a prompt (text) or "
                             "prompt_token_ids instead of messages")
    if len(messages) > MAX_MESSAGES:
        raise InvalidRequest(f"a chat may hold at most {MAX_MESSAGES} messages, "
                             f"got {len(messages)}")
    try:
        return template.render(messages, add_generation_prompt=True)
    except ChatTemplateError as exc:
        raise InvalidRequest(f"cannot render the chat: {exc}") from None


def _encoded(ids: list[int], what: str, max_model_len: int) -> list[int]:
    if not ids:
        raise InvalidRequest(f"{what} encodes to no tokens; send some text")
    if len(ids) >= max_model_len:
        raise _too_long(len(ids), max_model_len)
    return ids


def _params(raw, model: ModelInfo) -> tuple[RequestOptions, tuple[str, ...]]:
    if not isinstance(raw, dict):
        raise InvalidRequest(f"params must be a mapping, got {type(raw).__name__}")
    unknown = sorted(str(key) for key in raw if key not in PARAM_NAMES)
    if unknown:
        raise InvalidRequest(f"unknown parameter(s) {', '.join(unknown)}; known: {', '.join(PARAM_NAMES)}")
    try:
        options = RequestOptions.from_wire({k: v for k, v in raw.items() if k != "stop"})
        options.check_vocab(model.vocab_size)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    if options.top_k >= model.vocab_size:
        # Keeping at least every token is no filter: top_k off, as the sampler reads it. Any
        # integer is accepted, and a JSON one past 64 bits could not be sent to a worker.
        options = dataclasses.replace(options, top_k=0)
    return options, _stop_strings(raw.get("stop"), model)


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
