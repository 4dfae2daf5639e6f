"""Server-sent events as OpenAI streams them: ``data: <json>\\n\\n`` per chunk, then
``data: [DONE]\\n\\n``; an error after the stream started is one ``data: {"error": ...}`` event
(vLLM's shape) before ``[DONE]``."""
from __future__ import annotations

import json

DONE = b"data: [DONE]\n\n"


def event(payload: dict) -> bytes:
    """One ``data:`` event holding ``payload`` as JSON."""
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def raw_event(json_text: str) -> bytes:
    """One ``data:`` event around JSON text built elsewhere (the hot path)."""
    return b"data: " + json_text.encode() + b"\n\n"
