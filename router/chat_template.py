"""Chat templates: a model's Jinja template that turns chat messages into one prompt string.

A template comes from the model directory and is therefore untrusted code: it is rendered in
jinja2's ``ImmutableSandboxedEnvironment`` with the same options, globals and filters that
transformers' ``apply_chat_template`` provides (``raise_exception``, ``strftime_now``, a
``tojson`` that does not HTML-escape, ``namespace``, ``dict``, the ``generation`` block tag,
loop controls, and the special tokens named in tokenizer_config.json), so a template renders
here exactly as ``tokenizer.apply_chat_template(messages, tokenize=False)`` renders it.

Where the template comes from, first found wins: the ``--chat-template FILE`` override, then
``chat_template.jinja`` in the model directory, then ``"chat_template"`` in
tokenizer_config.json (a string, or a list of ``{"name", "template"}`` of which "default" is
used). torch-free.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

# The named special tokens transformers passes to every template (special_tokens_map).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                       "cls_token", "mask_token")
# Names a message's reasoning is passed under; templates read the first (transformers aliases).
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
MAX_TEMPLATE_BYTES = 1 << 20
MAX_NESTING = 32  # lists and objects in a message or a template argument


class ChatTemplateError(ValueError):
    """A chat template that cannot be loaded, or messages it cannot render."""


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson HTML-escapes; transformers' does not, and templates rely on that.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """``dict(...)`` for templates, without exposing the dict type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """``namespace(...)`` that refuses underscore names (no reach into CPython internals)."""

    def __init__(*args, **kwargs):  # same signature trick as jinja2's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes, got {name!r}")


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: marks assistant text; renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


def _plain(value: Any, where: str, depth: int = 0) -> Any:
    """``value`` rebuilt from plain JSON types (nothing with methods reaches the sandbox),
    nested at most MAX_NESTING deep (deeper would exhaust the stack here or in the template)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if depth >= MAX_NESTING:
        raise ChatTemplateError(f"{where} nests lists and objects more than {MAX_NESTING} deep")
    if isinstance(value, dict):
        return {_plain(k, where, depth + 1): _plain(v, where, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, where, depth + 1) for v in value]
    raise ChatTemplateError(f"{where} holds a {type(value).__name__}; only JSON values are allowed")


def _is_text_content(content: Any) -> bool:
    """A message's content the model can read: text, none (a message of tool calls only), or
    a list of text parts (strings or ``{"type": "text", "text": ...}``)."""
    if content is None or isinstance(content, str):
        return True
    return isinstance(content, list) and all(
        isinstance(part, str) or (isinstance(part, dict) and part.get("type") == "text"
                                  and isinstance(part.get("text"), str)) for part in content)


def _normalize_messages(messages: Any) -> list[dict]:
    """Messages as transformers hands them to a template: None-valued keys dropped, reasoning
    aliased. Raises ChatTemplateError on anything that is not a list of messages with a role."""
    if not isinstance(messages, list) or not messages:
        raise ChatTemplateError("messages must be a non-empty list of {role, content} objects")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ChatTemplateError(f"messages[{i}] must be an object with a role and content, "
                                    f"got {type(message).__name__}")
        if not isinstance(message.get("role"), str):
            raise ChatTemplateError(f"messages[{i}].role must be a string")
        if not _is_text_content(message.get("content")):
            raise ChatTemplateError(f"messages[{i}].content must be a string or a list of text "
                                    'parts ({"type": "text", "text": "..."}), got '
                                    f"{json.dumps(message['content'], default=repr)[:80]}")
        message = {k: v for k, v in _plain(message, f"messages[{i}]").items() if v is not None}
        reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def _read_config(path: Path) -> dict:
    # Kept here rather than shared with models/tokenizer.py so this module stands alone.
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ChatTemplateError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ChatTemplateError(f"{path} must hold a JSON object")
    return data


def _read_text(path: Path) -> str:
    try:
        if path.stat().st_size > MAX_TEMPLATE_BYTES:
            raise ChatTemplateError(f"{path} is larger than {MAX_TEMPLATE_BYTES} bytes")
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ChatTemplateError(f"cannot read chat template {path}: {e}") from e


def _special_tokens(tok_config: dict) -> dict[str, str]:
    tokens = {}
    for name in SPECIAL_TOKEN_NAMES:
        token = tok_config.get(name)
        if isinstance(token, dict):  # an AddedToken as tokenizer_config.json saves it
            token = token.get("content")
        if isinstance(token, str):
            tokens[name] = token
    return tokens


def _template_from_config(value: Any, path: Path) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # named templates: [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise ChatTemplateError(f"{path} has named chat templates {sorted(map(str, named))} but "
                                "none called 'default'; pass --chat-template FILE")
    raise ChatTemplateError(f"{path}: chat_template must be a string or a list of named templates")


class ChatTemplate:
    """One compiled chat template and the special tokens it may refer to."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None):
        if not isinstance(source, str) or not source.strip():
            raise ChatTemplateError("a chat template must be a non-empty string")
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"chat template does not compile: {e.message} "
                                    f"(line {e.lineno})") from e

    @classmethod
    def from_string(cls, source: str, bos_token: str = "", eos_token: str = "") -> "ChatTemplate":
        """A template from its Jinja source. Raises ChatTemplateError if it does not compile."""
        return cls(source, {"bos_token": bos_token, "eos_token": eos_token})

    @classmethod
    def from_model_dir(cls, model_dir: str | Path,
                       override_file: str | Path | None = None) -> "ChatTemplate | None":
        """The model's template (see the module docstring for the search order), or None if
        the model has none. Raises ChatTemplateError on an unreadable or invalid template."""
        model_dir = Path(model_dir)
        config_path = model_dir / "tokenizer_config.json"
        tok_config = _read_config(config_path)
        if override_file is not None:
            source = _read_text(Path(override_file))
        elif (model_dir / "chat_template.jinja").is_file():
            source = _read_text(model_dir / "chat_template.jinja")
        else:
            source = _template_from_config(tok_config.get("chat_template"), config_path)
            if source is None:
                return None
        return cls(source, _special_tokens(tok_config))

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The prompt text for ``messages``; ``kwargs`` reach the template as variables
        (e.g. ``tools``, ``documents``, ``enable_thinking``).

        Raises ChatTemplateError on malformed messages or when the template fails (its own
        ``raise_exception`` included), with the template's message.
        """
        messages = _normalize_messages(messages)
        variables = {"tools": None, "documents": None, **self.special_tokens,
                     **_plain(kwargs, "template arguments")}
        try:
            return self._template.render(messages=messages,
                                         add_generation_prompt=bool(add_generation_prompt),
                                         **variables)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template error: {e}") from e
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            # A template indexing or calling what these messages lack (e.g. content=[...]).
            raise ChatTemplateError(f"chat template failed on these messages: "
                                    f"{type(e).__name__}: {e}") from e
