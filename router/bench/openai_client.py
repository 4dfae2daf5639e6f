"""The load generator's client for any OpenAI-compatible server (pdserve's HTTP gateway, vLLM,
SGLang, ...): ``--backend openai`` (/v1/completions) or ``openai-chat`` (/v1/chat/completions).

It offers what the runner uses of ``router.client.AsyncClient`` (``status()`` and a streaming
``generate()``), so both backends run the same workload and are measured the same way. Each
request streams with ``stream_options.include_usage``; token ids are not on the wire, so every
chunk that carries text counts as one token when it arrives, and the final usage chunk settles
the exact count (``StreamChunk.token_ids`` holds one ``None`` per token).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, AsyncIterator
from urllib.parse import urlsplit

import httpx2

from router.client_types import ServerError, StreamChunk

BACKENDS = ("zmq", "openai", "openai-chat")
API_KEY_ENV = "OPENAI_API_KEY"
logging.getLogger("httpx2").setLevel(logging.WARNING)  # one INFO line per request otherwise


class OpenAIClient:
    """Streams completions from ``base_url`` (e.g. http://127.0.0.1:8000) over HTTP/1.1,
    one connection per concurrent request."""

    def __init__(self, base_url: str, *, chat: bool = False, model: str | None = None,
                 api_key: str | None = None, timeout: float = 300.0):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"--base-url must start with http:// or https://, got {base_url!r}")
        try:
            url = urlsplit(base_url)
            url.port  # noqa: B018 (raises ValueError for a port that is not one)
            if not url.hostname:
                raise ValueError("no host")
            self.base_url = base_url.rstrip("/").removesuffix("/v1")
            httpx2.URL(self.base_url)
        except (ValueError, httpx2.InvalidURL) as exc:
            raise ValueError(f"--base-url {base_url!r} is not a usable URL ({exc}); write it as "
                             f"http://HOST:PORT, e.g. http://127.0.0.1:8000") from None
        self.chat = chat
        self.model = model
        key = api_key or os.environ.get(API_KEY_ENV) or os.environ.get("PDSERVE_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx2.AsyncClient(
            base_url=self.base_url, headers=headers, timeout=httpx2.Timeout(timeout, connect=30.0),
            limits=httpx2.Limits(max_connections=None, max_keepalive_connections=None))

    async def __aenter__(self) -> "OpenAIClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self._http.aclose()

    async def status(self) -> dict:
        """The served model from /v1/models, shaped like a pdserve status reply."""
        try:
            response = await self._http.get("/v1/models")
        except httpx2.HTTPError as exc:
            raise ConnectionError(f"cannot reach {self.base_url}: {exc}") from None
        if response.status_code != 200:
            raise ServerError(str(response.status_code), _error_message(response.text))
        models = response.json().get("data") or [{}]
        served = [entry.get("id") for entry in models if entry.get("id")]
        if self.model is None:
            self.model = models[0].get("id")
        elif served and self.model not in served:  # else every request would fail with a 404
            raise ValueError(f"--model {self.model} is not served at {self.base_url}; it serves "
                             f"{', '.join(served)} (leave --model out to take the first)")
        return {"router": {"model": self.model}}

    def _body(self, prompt: str | None, prompt_token_ids: list[int] | None, max_tokens: int,
              sampling: dict[str, Any]) -> tuple[str, dict]:
        body = {"model": self.model, "max_tokens": max_tokens, "stream": True,
                "stream_options": {"include_usage": True}, **sampling}
        if not self.chat:
            return "/v1/completions", {**body, "prompt": prompt if prompt is not None else prompt_token_ids}
        # Chat takes text: a token-id prompt is sent as the text of its numbers.
        text = prompt if prompt is not None else " ".join(map(str, prompt_token_ids))
        return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": text}]}

    async def generate(self, prompt: str | None = None, *, prompt_token_ids: list[int] | None = None,
                       max_tokens: int = 16, **sampling) -> AsyncIterator[StreamChunk]:
        """Stream one request. Raises ServerError on an HTTP or in-stream error."""
        path, body = self._body(prompt, prompt_token_ids, max_tokens, sampling)
        try:
            async for chunk in self._stream(path, body):
                yield chunk
        except (httpx2.NetworkError, httpx2.RemoteProtocolError) as exc:
            # the runner takes a ConnectionError as a sign the server may be gone
            raise ConnectionError(f"lost the connection to {self.base_url}: {exc}") from None

    async def _stream(self, path: str, body: dict) -> AsyncIterator[StreamChunk]:
        num_seen, reason = 0, None
        async with self._http.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                raise ServerError(str(response.status_code), _error_message((await response.aread()).decode()))
            async for event in httpx2.EventSource(response):
                if event.data == "[DONE]":
                    break
                data = json.loads(event.data)
                if "error" in data:
                    raise ServerError(str(data["error"].get("code")), data["error"].get("message", ""))
                usage = data.get("usage")
                for choice in data.get("choices") or ():
                    text = choice.get("text") if not self.chat else (choice.get("delta") or {}).get("content")
                    reason = choice.get("finish_reason") or reason
                    if text:
                        num_seen += 1
                        yield StreamChunk([None], text, None, 0)
                if usage:
                    extra = max(0, usage.get("completion_tokens", num_seen) - num_seen)
                    yield StreamChunk([None] * extra, "", reason, usage.get("prompt_tokens", 0))
                    return
        if reason is not None:  # a server that sends no usage chunk
            yield StreamChunk([], "", reason, 0)


def _error_message(text: str) -> str:
    try:
        return json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return text[:200]
