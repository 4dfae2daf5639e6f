"""Server-sent events as OpenAI streams them: ``data: <json>\\n\\n`` per chunk, then
``data: [DONE]\\n\\n``; an error after the stream started is one ``data: {"error": ...}`` event
(vLLM's shape) before ``[DONE]``."""
from __future__ import annotations

import asyncio
import json
import logging

DONE = b"data: [DONE]\n\n"


def event(payload: dict) -> bytes:
    """One ``data:`` event holding ``payload`` as JSON."""
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def raw_event(json_text: str) -> bytes:
    """One ``data:`` event around JSON text built elsewhere (the hot path)."""
    return b"data: " + json_text.encode() + b"\n\n"


async def watch_disconnect(receive, on_disconnect) -> None:
    """Call ``on_disconnect()`` once the ASGI client disconnects (the request body must have
    been read: the next message is then the disconnect)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    on_disconnect()


class SSEResponse:
    """An ASGI response streaming ``body`` (an async iterator of bytes) as ``text/event-stream``.

    Lighter than Starlette's StreamingResponse (no task group per request, no thread pool):
    a watcher task reads ``receive`` and calls ``on_disconnect`` when the client goes away,
    which must make ``body`` end; ``on_close`` runs however the response ends. It sends with
    the server's own ``send`` when the scope carries it (``RAW_SEND``); an error inside
    ``body`` ends the stream with an error event, never a second response.
    """

    def __init__(self, body, on_disconnect, on_close):
        self.body = body
        self.on_disconnect = on_disconnect
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        send = scope.get(RAW_SEND, send)
        watcher = asyncio.get_running_loop().create_task(watch_disconnect(receive, self.on_disconnect))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
            try:
                async for data in self.body:
                    await send({"type": "http.response.body", "body": data, "more_body": True})
            except Exception as exc:  # the stream has started: report in it, then end it
                log.exception("error while streaming")
                error = {"message": f"internal error: {type(exc).__name__}", "type": "InternalServerError",
                         "param": None, "code": 500}
                await send({"type": "http.response.body", "body": event({"error": error}) + DONE,
                            "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.cancel()
            self.on_close()


HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
RAW_SEND = "pdserve.raw_send"  # scope key: the server's own send (router/http/app.py)
log = logging.getLogger("pdserve.http")
