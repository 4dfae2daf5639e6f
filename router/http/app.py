"""The routes, shaped as vLLM's OpenAI-compatible server so its clients work unchanged.

Starlette (FastAPI's core, without its request-model layer: bodies are validated by
openai_schema.py, which gives vLLM's error shape and messages) on uvicorn with httptools.
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from importlib.metadata import PackageNotFoundError, version

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from router.admission import INLINE_PROMPT_CHARS
from router.chat_template import ChatTemplateError
from router.http import sse
from router.http.auth import ApiKeyCheck
from router.http.errors import APIError, invalid
from router.http.openai_schema import (CompletionRequest, Prompt, check_model, parse_completion,
                                       parse_json, sampling_params)
from router.http.responses import ResponseWriter
from router.validation import MAX_CHARS_PER_TOKEN, messages_chars

log = logging.getLogger("pdserve.http")
MODEL_UNKNOWN = "no worker has registered yet, so the model is unknown; retry shortly"
try:
    VERSION = version("pdserve")
except PackageNotFoundError:
    VERSION = "0.0.0"


# -- helpers ------------------------------------------------------------------------------------
async def read_json(request: Request) -> dict:
    """The body as a JSON object, refusing bodies over the limit with 413 (never reading them)
    and bodies not sent within the body timeout with 408."""
    config = request.app.state.gateway.config
    limit = config.max_body_bytes
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise APIError(413, f"the request body is larger than the {limit}-byte limit")
    body = bytearray()
    try:
        async with asyncio.timeout(config.read_timeout_s):
            async for part in request.stream():
                body += part
                if len(body) > limit:
                    raise APIError(413, f"the request body is larger than the {limit}-byte limit")
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {config.read_timeout_s:g} s; "
                            "send it whole") from None
    except ClientDisconnect:
        raise APIError(400, "the client disconnected before sending the whole body") from None
    return parse_json(bytes(body))


def served_model(gateway) -> str:
    name = gateway.model_name()
    if name is None:
        raise APIError(503, MODEL_UNKNOWN)
    return name


def loaded_model(gateway):
    """The served model (``router.model_info.ModelInfo``): 503 until a worker has registered
    (the name alone may be known sooner, from --served-model-name)."""
    if gateway.model is None:
        raise APIError(503, MODEL_UNKNOWN)
    return gateway.model


def token_text_fn(gateway):
    tokenizer = gateway.model.tokenizer if gateway.model is not None else None
    if tokenizer is None:
        return lambda token_id: f"token_id:{token_id}"
    return lambda token_id: tokenizer.decode([token_id], skip_special_tokens=False)


async def chat_prompt_ids(gateway, messages: list, add_generation_prompt: bool, kwargs: dict) -> list[int]:
    """Render ``messages`` with the model's chat template and tokenize (the template writes
    the special tokens itself); a large chat off the event loop. Raises APIError(400)."""
    tokenizer = loaded_model(gateway).tokenizer
    try:
        template = gateway.chat_template()
    except ChatTemplateError as exc:
        raise APIError(500, f"the server's chat template cannot be used: {exc}") from None
    if template is None:
        raise invalid("this model has no chat template; use /v1/completions, or start the server "
                      "with --chat-template FILE", "messages")
    if tokenizer is None:
        raise invalid("this model has no tokenizer, so chat messages cannot be encoded; use "
                      "/v1/completions with token ids", "messages")

    max_len = gateway.max_model_len() or 1

    def encode() -> list[int]:
        try:
            text = template.render(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        except ChatTemplateError as exc:
            raise invalid(str(exc), "messages") from None
        if len(text) > MAX_CHARS_PER_TOKEN * max_len:  # never worth tokenizing
            raise invalid(f"the chat has {len(text)} characters, far more than the max model length "
                          f"of {max_len} tokens; shorten the chat", "messages")
        return tokenizer.encode(text, add_special_tokens=False)

    if messages_chars(messages) > INLINE_PROMPT_CHARS:
        return await gateway.off_loop(encode)
    return encode()


async def encode_text(gateway, text: str, add_special_tokens: bool = True) -> list[int]:
    """``text``'s token ids; a long text off the event loop."""
    encode = functools.partial(gateway.model.tokenizer.encode, text, add_special_tokens=add_special_tokens)
    return await gateway.off_loop(encode) if len(text) > INLINE_PROMPT_CHARS else encode()


async def encode_long_prompts(gateway, req: CompletionRequest) -> CompletionRequest:
    """``req`` with its long text prompts as token ids, tokenized off the event loop (short
    ones the router tokenizes inline, at admission, as for any client)."""
    if gateway.model is None or gateway.model.tokenizer is None or not any(
            p.text is not None and len(p.text) > INLINE_PROMPT_CHARS for p in req.prompts):
        return req
    max_chars = MAX_CHARS_PER_TOKEN * (gateway.max_model_len() or 1)
    prompts = []
    for prompt in req.prompts:
        if prompt.text is not None and len(prompt.text) > max_chars:  # never worth tokenizing
            raise invalid(f"the prompt has {len(prompt.text)} characters, far more than the max model "
                          f"length of {gateway.max_model_len()} tokens; shorten the prompt", "prompt")
        if prompt.text is not None and len(prompt.text) > INLINE_PROMPT_CHARS:
            prompt = Prompt(token_ids=await encode_text(gateway, prompt.text))
        prompts.append(prompt)
    return dataclasses.replace(req, prompts=tuple(prompts))


# -- completions --------------------------------------------------------------------------------
async def completions(request: Request) -> Response:
    return await _complete(request, chat=False)


async def chat_completions(request: Request) -> Response:
    return await _complete(request, chat=True)


async def _complete(request: Request, chat: bool) -> Response:
    gateway = request.app.state.gateway
    req = parse_completion(await read_json(request), chat)
    name = served_model(gateway)
    check_model(req.model, name)
    if chat:
        ids = await chat_prompt_ids(gateway, req.messages, req.add_generation_prompt, req.chat_template_kwargs)
        max_tokens = gateway.max_new_tokens(len(ids)) if req.max_tokens is None else req.max_tokens
        req = dataclasses.replace(req, prompts=(Prompt(token_ids=ids),), max_tokens=max_tokens)
    else:
        req = await encode_long_prompts(gateway, req)
    max_len = gateway.max_model_len() or 1
    client = gateway.open(req.num_choices)
    try:
        for lead, prompt in zip(range(0, req.num_choices, req.n), req.prompts):
            # The prompt's other samples follow its first token: they then find its KV blocks
            # in the prefill worker's prefix cache instead of computing them again. The lead
            # streams internally so that its first token is seen.
            gateway.submit(client, lead, prompt, sampling_params(req, 0, max_len),
                           want_logprobs=req.logprobs, stream=req.stream or req.n > 1)
            if client.failure is not None:
                raise client.failure
            for sample in range(1, req.n):
                client.after_first_token(lead, functools.partial(
                    gateway.submit, client, lead + sample, prompt, sampling_params(req, sample, max_len),
                    want_logprobs=req.logprobs, stream=req.stream))
    except BaseException:
        gateway.release(client)
        raise
    writer = ResponseWriter(req, name, token_text_fn(gateway))
    if req.stream:
        return sse.SSEResponse(_stream(client, writer, req), client.disconnected,
                               lambda: gateway.release(client))
    try:
        await _wait_whole(client, request)
    except ClientGone:
        return Response(status_code=499)  # nobody reads it; the requests were aborted
    finally:
        gateway.release(client)
    return JSONResponse(writer.response(client.choices))


async def _wait_whole(client, request: Request) -> None:
    """Collect every choice's result; a client that disconnects meanwhile cancels them."""
    watcher = asyncio.get_running_loop().create_task(
        sse.watch_disconnect(request.receive, client.disconnected))
    try:
        while True:
            await client.wait()
            while client.pending:
                choice, token_ids, text, _, logprobs = client.pending.popleft()
                choice.token_ids.extend(token_ids)
                choice.text.append(text)
                if logprobs:
                    choice.logprobs.extend(logprobs)
            if client.gone:
                raise ClientGone()
            if client.failure is not None:
                raise client.failure
            if client.num_open == 0:
                return
    finally:
        watcher.cancel()


class ClientGone(Exception):
    """The HTTP client disconnected before its response was ready."""


async def _stream(client, writer: ResponseWriter, req: CompletionRequest):
    """The SSE body: chunks as tokens arrive, then usage (if asked) and [DONE]. Ends early when
    the client disconnects (``client.gone``)."""
    if req.chat:
        yield b"".join(sse.raw_event(writer.role_chunk(i)) for i in range(req.num_choices))
    pending = client.pending
    while True:
        await client.wait()
        if client.gone:
            return
        parts = []
        while pending:
            choice, token_ids, text, reason, logprobs = pending.popleft()
            choice.token_ids.extend(token_ids)
            if text or reason is not None or logprobs:
                parts.append(sse.raw_event(writer.chunk(choice, token_ids, text, reason, logprobs)))
        if client.failure is not None:
            parts.append(sse.event(client.failure.body()))
            break
        if client.num_open == 0:
            if req.include_usage:
                parts.append(sse.event(writer.usage_chunk(client.choices)))
            break
        if parts:
            yield b"".join(parts)
    yield b"".join(parts) + sse.DONE


# -- models, health, version, tokenizer ---------------------------------------------------------
async def models(request: Request) -> Response:
    gateway = request.app.state.gateway
    name = served_model(gateway)
    root = gateway.model_dir() or name
    return JSONResponse({"object": "list", "data": [{
        "id": name, "object": "model", "created": gateway.created, "owned_by": "pdserve",
        "root": root, "parent": None, "max_model_len": gateway.max_model_len(), "permission": []}]})


async def health(request: Request) -> Response:
    missing = request.app.state.gateway.missing_roles()
    if missing:
        return _error_response(APIError(503, f"no {' or '.join(missing)} worker is registered"))
    return Response(status_code=200)


async def version_route(request: Request) -> Response:
    return JSONResponse({"version": VERSION})


async def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(request.app.state.gateway.metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def tokenize(request: Request) -> Response:
    gateway = request.app.state.gateway
    data = await read_json(request)
    check_model(data.get("model"), served_model(gateway))
    if loaded_model(gateway).tokenizer is None:
        raise invalid("this model has no tokenizer")
    if "messages" in data:
        req = parse_completion({**data, "stream": False}, chat=True)
        tokens = await chat_prompt_ids(gateway, req.messages, req.add_generation_prompt, req.chat_template_kwargs)
    else:
        prompt, add_special = data.get("prompt"), data.get("add_special_tokens", True)
        if not isinstance(prompt, str):
            raise invalid("prompt must be a string (or send messages)", "prompt")
        if not isinstance(add_special, bool):
            raise invalid("add_special_tokens must be true or false", "add_special_tokens")
        tokens = await encode_text(gateway, prompt, add_special)
    return JSONResponse({"count": len(tokens), "max_model_len": gateway.max_model_len(), "tokens": tokens})


async def detokenize(request: Request) -> Response:
    gateway = request.app.state.gateway
    data = await read_json(request)
    check_model(data.get("model"), served_model(gateway))
    model = loaded_model(gateway)
    tokens = data.get("tokens")
    vocab = model.vocab_size
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                               and 0 <= t < vocab for t in tokens):
        raise invalid(f"tokens must be a list of token ids in [0, {vocab})", "tokens")
    if model.tokenizer is None:
        raise invalid("this model has no tokenizer")
    return JSONResponse({"prompt": model.tokenizer.decode(tokens)})


# -- errors and the app -------------------------------------------------------------------------
def _error_response(exc: APIError) -> Response:
    return Response(exc.json_bytes(), status_code=exc.status, media_type="application/json")


async def _api_error(request: Request, exc: APIError) -> Response:
    return _error_response(exc)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    return _error_response(APIError(exc.status_code, str(exc.detail)))


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s", request.url.path)
    return _error_response(APIError(500, f"internal error: {type(exc).__name__}"))


def _answering(endpoint):
    """``endpoint`` with an unexpected error answered as APIError(500). Left to Starlette, the
    error would be answered and then re-raised to uvicorn, which closes the connection after the
    500 without saying so, under a client that may already be sending its next request on it."""
    @functools.wraps(endpoint)
    async def route(request: Request) -> Response:
        try:
            return await endpoint(request)
        except (APIError, HTTPException):
            raise
        except Exception as exc:
            log.exception("unhandled error on %s", request.url.path)
            raise APIError(500, f"internal error: {type(exc).__name__}") from None

    return route


class _Front:
    """The outermost ASGI layer: checks the API key before any route runs, and keeps the
    server's own ``send`` in the scope (``sse.RAW_SEND``) so streams skip the per-message send
    wrappers of Starlette's middleware (SSEResponse never lets an error escape once started,
    which is all those wrappers watch for)."""

    def __init__(self, app, check: ApiKeyCheck):
        self.app = app
        self.check = check

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            scope[sse.RAW_SEND] = send
            if self.check.enabled:
                header = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
                try:
                    self.check.check(scope["path"], header)
                except APIError as exc:
                    await _error_response(exc)(scope, receive, send)
                    return
        await self.app(scope, receive, send)


def build_app(gateway) -> Starlette:
    """The ASGI app for ``gateway`` (router/http/gateway.py)."""
    routes = [Route(path, _answering(endpoint), methods=[method]) for path, endpoint, method in (
        ("/v1/completions", completions, "POST"),
        ("/v1/chat/completions", chat_completions, "POST"),
        ("/v1/models", models, "GET"),
        ("/health", health, "GET"),
        ("/version", version_route, "GET"),
        ("/metrics", metrics, "GET"),
        ("/tokenize", tokenize, "POST"),
        ("/detokenize", detokenize, "POST"))]
    app = Starlette(routes=routes, exception_handlers={
        APIError: _api_error, HTTPException: _http_error, Exception: _internal_error})
    app.state.gateway = gateway
    return _Front(app, ApiKeyCheck(gateway.config.api_key))
