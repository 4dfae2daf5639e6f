"""OpenAI request bodies -> validated ``CompletionRequest`` records, as vLLM reads them.

Checked here: the request's shape (prompt, messages, n, logprobs, stream options, the model
name) and the OpenAI-only spellings (``max_completion_tokens``, ``top_k = -1``). The sampling
values themselves are validated once, by the router (``router.validation``), when the request
is submitted: ``sampling_params`` is the one place that maps OpenAI fields to the router's.
Unknown fields are ignored, as vLLM does; known features pdserve does not implement (echo,
penalties, logit_bias, ...) are refused with a 400 rather than silently ignored.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from router.http.errors import APIError, invalid
from router.validation import MAX_MESSAGES

MAX_TOP_LOGPROBS = 20
MAX_CHOICES = 128           # prompts x n in one request
SEED_LIMIT = 2**63
# Template variables the gateway sets itself: top-level fields of the request.
RESERVED_TEMPLATE_KWARGS = ("messages", "add_generation_prompt")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# Fields whose non-default value pdserve cannot honour: refused, never silently ignored.
UNSUPPORTED = {"echo": (None, False), "suffix": (None,), "logit_bias": (None, {}),
               "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
               "repetition_penalty": (None, 1, 1.0), "min_tokens": (None, 0), "min_p": (None, 0, 0.0),
               "continue_final_message": (None, False), "tools": (None, []),
               "response_format": (None, {"type": "text"}), "guided_json": (None,),
               "guided_regex": (None,), "guided_choice": (None,), "prompt_logprobs": (None,)}


@dataclass(frozen=True)
class Prompt:
    """One prompt: text (tokenized by the router) or token ids."""

    text: str | None = None
    token_ids: list[int] | None = None


@dataclass(frozen=True)
class CompletionRequest:
    """A validated /v1/completions or /v1/chat/completions body."""

    chat: bool
    model: str | None
    prompts: tuple[Prompt, ...]          # completions; for chat, filled in after rendering
    messages: list | None                # chat
    n: int
    max_tokens: int | None               # None: as many as fit
    temperature: float | int | None
    top_p: float | int | None
    top_k: int | None
    seed: int | None
    stop: list | str | None
    stop_token_ids: list | None
    ignore_eos: bool
    logprobs: bool                       # return the sampled tokens' logprobs
    top_logprobs: int                    # alternatives per token, 0..20
    stream: bool
    include_usage: bool
    add_generation_prompt: bool = True
    chat_template_kwargs: dict = field(default_factory=dict)

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.n


def parse_json(body: bytes) -> dict:
    """The request body as a JSON object. Raises APIError(400)."""
    if not body.strip():
        raise invalid("the request body is empty; send a JSON object")
    try:
        data = json.loads(body)
    except ValueError as e:  # a JSONDecodeError, bad UTF-8, or an integer past 4300 digits
        raise invalid(f"the body is not valid JSON ({e}); send a JSON object") from None
    except RecursionError:
        raise invalid("the body nests JSON too deeply") from None
    if not isinstance(data, dict):
        raise invalid(f"the body must be a JSON object, got {type(data).__name__}")
    if _SURROGATE_ESCAPE.search(body):
        try:  # JSON allows an escaped surrogate on its own: no text, and it cannot be encoded
            json.dumps(data, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise invalid("the body holds an unpaired UTF-16 surrogate escape (\\ud800 to \\udfff), "
                          "which is not text; send valid Unicode") from None
    return data


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _get(data: dict, name: str, types: tuple, what: str, default=None):
    """``data[name]`` if present and not null, checked against ``types``."""
    value = data.get(name)
    if value is None:
        return default
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise invalid(f"{name} must be {what}, got {json.dumps(value)[:80]}", name)
    return value


def _int_in(data: dict, name: str, low: int, high: int, default):
    value = _get(data, name, (int,), "an integer", default)
    if value is not None and not low <= value <= high:
        raise invalid(f"{name} must be in [{low}, {high}], got {value}", name)
    return value


def _check_unsupported(data: dict) -> None:
    for name, defaults in UNSUPPORTED.items():
        if data.get(name) not in defaults:
            raise invalid(f"{name} is not supported by pdserve; remove it", name)
    best_of = data.get("best_of")
    if best_of is not None and best_of != data.get("n", 1):
        raise invalid("best_of is not supported by pdserve; use n", "best_of")


def _prompts(value) -> tuple[Prompt, ...]:
    """A completions ``prompt``: text, token ids, or a non-empty list of either."""
    what = "a string, a list of token ids, or a list of strings or of token-id lists"
    if isinstance(value, str):
        return (Prompt(text=value),)
    if not isinstance(value, list) or not value:
        raise invalid(f"prompt must be {what}", "prompt")
    if all(_is_int(t) for t in value):
        return (Prompt(token_ids=list(value)),)
    prompts = []
    for item in value:
        if isinstance(item, str):
            prompts.append(Prompt(text=item))
        elif isinstance(item, list) and item and all(_is_int(t) for t in item):
            prompts.append(Prompt(token_ids=list(item)))
        else:
            raise invalid(f"prompt must be {what}; found an element {json.dumps(item)[:60]}", "prompt")
    return tuple(prompts)


def _message_content(content, i: int):
    """String content as is; a list of parts becomes their text joined by newlines (vLLM)."""
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(f"messages[{i}].content must be a string or a list of text parts", "messages")
    texts = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            raise invalid(f"messages[{i}].content has a part pdserve cannot read (only text parts "
                          "are supported)", "messages")
    return "\n".join(texts)


def _messages(value) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise invalid("messages must be a non-empty list of {role, content} objects", "messages")
    if len(value) > MAX_MESSAGES:
        raise invalid(f"a chat may hold at most {MAX_MESSAGES} messages, got {len(value)}", "messages")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise invalid(f"messages[{i}] must be an object with a string role", "messages")
        out.append({**message, "content": _message_content(message.get("content"), i)})
    return out


def parse_completion(data: dict, chat: bool) -> CompletionRequest:
    """Validate a /v1/completions (``chat`` False) or /v1/chat/completions body.
    Raises APIError(400) naming the field."""
    _check_unsupported(data)
    if chat:
        messages, prompts = _messages(data.get("messages")), ()
        top_logprobs = _int_in(data, "top_logprobs", 0, MAX_TOP_LOGPROBS, 0)
        logprobs = _get(data, "logprobs", (bool,), "true or false", False)
        if top_logprobs and not logprobs:
            raise invalid("top_logprobs needs logprobs: true", "top_logprobs")
    else:
        if "prompt" not in data:
            raise invalid("prompt is required", "prompt")
        messages, prompts = None, _prompts(data["prompt"])
        num = _int_in(data, "logprobs", 0, MAX_TOP_LOGPROBS, None)
        logprobs, top_logprobs = num is not None, num or 0
    n = _int_in(data, "n", 1, MAX_CHOICES, 1)
    if n * max(1, len(prompts)) > MAX_CHOICES:
        raise invalid(f"{len(prompts)} prompts x n={n} is more than {MAX_CHOICES} choices in one "
                      "request; split it", "n")
    max_tokens = _get(data, "max_completion_tokens", (int,), "an integer")
    if max_tokens is None:
        max_tokens = _get(data, "max_tokens", (int,), "an integer")
    if max_tokens is None and not chat:
        max_tokens = DEFAULT_COMPLETION_MAX_TOKENS
    top_k = data.get("top_k")
    stream = _get(data, "stream", (bool,), "true or false", False)
    options = _get(data, "stream_options", (dict,), "an object", {})
    include_usage = _get(options, "include_usage", (bool,), "true or false", False)
    if options and not stream:
        raise invalid("stream_options is only allowed with stream: true", "stream_options")
    model = _get(data, "model", (str,), "a string")
    template_kwargs = _get(data, "chat_template_kwargs", (dict,), "an object", {})
    reserved = [name for name in RESERVED_TEMPLATE_KWARGS if name in template_kwargs]
    if reserved:
        raise invalid(f"chat_template_kwargs cannot set {', '.join(reserved)}; send it as a "
                      "field of the request itself", "chat_template_kwargs")
    return CompletionRequest(
        chat=chat, model=model, prompts=prompts, messages=messages, n=n, max_tokens=max_tokens,
        temperature=data.get("temperature"), top_p=data.get("top_p"),
        top_k=0 if top_k == -1 else top_k, seed=data.get("seed"), stop=data.get("stop"),
        stop_token_ids=data.get("stop_token_ids"),
        ignore_eos=_get(data, "ignore_eos", (bool,), "true or false", False),
        logprobs=logprobs, top_logprobs=top_logprobs, stream=stream, include_usage=include_usage,
        add_generation_prompt=_get(data, "add_generation_prompt", (bool,), "true or false", True),
        chat_template_kwargs=template_kwargs)


def sampling_params(req: CompletionRequest, sample_index: int, max_model_len: int) -> dict:
    """The router's ``Generate.params`` for sample ``sample_index`` of ``req``.

    With a seed, sample i uses seed + i (mod 2**63), so every sample of a seeded request is
    reproducible and samples differ from each other. Values are passed through unchecked:
    the router validates them (one definition of every range) and its message names the field.
    """
    params = {"max_tokens": max_model_len if req.max_tokens is None else req.max_tokens,
              "ignore_eos": req.ignore_eos}
    for name in ("temperature", "top_p", "top_k", "stop", "stop_token_ids"):
        value = getattr(req, name)
        if value is not None:
            params[name] = value
    if req.seed is not None:
        valid = _is_int(req.seed) and 0 <= req.seed < SEED_LIMIT  # else the router says why not
        params["seed"] = (req.seed + sample_index) % SEED_LIMIT if valid else req.seed
    if req.top_logprobs:
        params["num_top_logprobs"] = req.top_logprobs
    return params


def check_model(requested: str | None, served: str) -> None:
    """Raise APIError(404) if the client names another model than the served one (400 if
    ``model`` is not a string)."""
    if requested is not None and not isinstance(requested, str):
        raise invalid(f"model must be a string, got {json.dumps(requested)[:80]}", "model")
    if requested is not None and requested != served:
        raise APIError(404, f"The model `{requested}` does not exist; this server serves `{served}`",
                       "model")
