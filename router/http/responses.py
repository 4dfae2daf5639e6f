"""OpenAI response bodies and stream chunks, as vLLM writes them.

``Choice`` accumulates one choice's output (text, token ids, logprobs, finish reason, usage);
``ResponseWriter`` renders whole responses and SSE chunks for one request. A streamed token
without logprobs is the hot path of the gateway: its chunk is one JSON-encoded string spliced
between a prefix and suffix rendered once per request.
"""
from __future__ import annotations

import json
import math
import secrets
import time
from dataclasses import dataclass, field

from router.http.openai_schema import CompletionRequest


@dataclass
class Choice:
    """One choice (a prompt's sample) of a request, as its output arrives."""

    index: int
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)   # (logprob, top) per token
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    text_offset: int = 0                           # completions logprobs: chars so far


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int

    def to_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


def usage_of(choices: list[Choice], n: int) -> Usage:
    """Prompt tokens count once per prompt (its first sample), completion tokens per choice."""
    firsts = choices[::n]
    return Usage(prompt_tokens=sum(c.num_prompt_tokens for c in firsts),
                 completion_tokens=sum(len(c.token_ids) for c in choices),
                 cached_tokens=sum(c.num_cached_tokens for c in firsts))


def _finite(value) -> float:
    """JSON has no -inf: report -9999.0 as vLLM does."""
    return value if isinstance(value, float) and math.isfinite(value) else -9999.0


class ResponseWriter:
    """Renders one request's responses. ``token_text(id)`` is a token's own text."""

    def __init__(self, req: CompletionRequest, model: str, token_text):
        self.req = req
        self.model = model
        self.token_text = token_text
        self.id = ("chatcmpl-" if req.chat else "cmpl-") + secrets.token_hex(16)
        self.created = int(time.time())
        self.object = "chat.completion" if req.chat else "text_completion"
        head = json.dumps({"id": self.id, "object": self.object + (".chunk" if req.chat else ""),
                           "created": self.created, "model": model}, ensure_ascii=False,
                          separators=(",", ":"))[:-1]
        self._chunk_head = head + ',"choices":[{"index":'

    # -- logprobs ----------------------------------------------------------------------------
    def _chat_logprobs(self, token_ids: list[int], logprobs: list) -> dict:
        content = []
        for token_id, (logprob, top) in zip(token_ids, logprobs):
            text = self.token_text(token_id)
            content.append({"token": text, "logprob": _finite(logprob), "bytes": list(text.encode()),
                            "top_logprobs": [{"token": (t := self.token_text(i)), "logprob": _finite(v),
                                              "bytes": list(t.encode())} for i, v in (top or ())]})
        return {"content": content}

    def _completion_logprobs(self, choice: Choice, token_ids: list[int], logprobs: list) -> dict:
        tokens, offsets, tops = [], [], []
        for token_id, (_, top) in zip(token_ids, logprobs):
            text = self.token_text(token_id)
            tokens.append(text)
            offsets.append(choice.text_offset)
            choice.text_offset += len(text)
            tops.append({self.token_text(i): _finite(v) for i, v in top} if top else None)
        return {"tokens": tokens, "token_logprobs": [_finite(lp) for lp, _ in logprobs],
                "top_logprobs": tops if self.req.top_logprobs else None, "text_offset": offsets}

    def logprobs(self, choice: Choice, token_ids: list[int], logprobs: list) -> dict | None:
        if not self.req.logprobs:
            return None
        if self.req.chat:
            return self._chat_logprobs(token_ids, logprobs)
        return self._completion_logprobs(choice, token_ids, logprobs)

    # -- whole responses -----------------------------------------------------------------------
    def response(self, choices: list[Choice]) -> dict:
        out = []
        for c in choices:
            text = "".join(c.text)
            entry = {"index": c.index, "logprobs": self.logprobs(c, c.token_ids, c.logprobs),
                     "finish_reason": c.finish_reason, "stop_reason": None}
            if self.req.chat:
                entry["message"] = {"role": "assistant", "content": text}
            else:
                entry["text"] = text
            out.append(entry)
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": out, "usage": usage_of(choices, self.req.n).to_dict()}

    # -- stream chunks ---------------------------------------------------------------------------
    def role_chunk(self, index: int) -> str:
        """Chat streams open each choice with the assistant role (as vLLM does)."""
        return (f'{self._chunk_head}{index},"delta":{{"role":"assistant","content":""}},'
                '"logprobs":null,"finish_reason":null}]}')

    def chunk(self, choice: Choice, token_ids: list[int], text: str, reason: str | None,
              logprobs: list | None) -> str:
        """The JSON of one stream chunk carrying ``text`` (and ``reason`` on the last one)."""
        lp = self.logprobs(choice, token_ids, logprobs or []) if self.req.logprobs else None
        lp_json = "null" if lp is None else json.dumps(lp, ensure_ascii=False)
        reason_json = "null" if reason is None else json.dumps(reason)
        text_json = json.dumps(text, ensure_ascii=False)
        if self.req.chat:
            delta = f'{{"content":{text_json}}}' if text or reason is None else "{}"
            return (f'{self._chunk_head}{choice.index},"delta":{delta},"logprobs":{lp_json},'
                    f'"finish_reason":{reason_json}}}]}}')
        return (f'{self._chunk_head}{choice.index},"text":{text_json},"logprobs":{lp_json},'
                f'"finish_reason":{reason_json},"stop_reason":null}}]}}')

    def usage_chunk(self, choices: list[Choice]) -> dict:
        return {"id": self.id, "object": self.object + (".chunk" if self.req.chat else ""),
                "created": self.created, "model": self.model, "choices": [],
                "usage": usage_of(choices, self.req.n).to_dict()}
