"""What the client library returns and raises (re-exported by router.client)."""
from __future__ import annotations

from dataclasses import dataclass, field

from router import protocol as P


@dataclass(frozen=True)
class StreamChunk:
    """New output of a streaming request: token ids, the text they complete, and the finish
    reason on the last chunk (``stop``, ``length`` or ``abort``)."""
    token_ids: list[int]
    text: str
    finish_reason: str | None
    num_prompt_tokens: int


@dataclass(frozen=True)
class RequestMetrics:
    """Client-side times in seconds: time to first token, time per output token after the
    first, the gaps between consecutive tokens, and the whole request."""
    ttft: float
    tpot: float
    itl: list[float] = field(default_factory=list)
    e2e: float = 0.0


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]
    text: str
    finish_reason: str
    num_prompt_tokens: int
    metrics: RequestMetrics


class ClientTimeout(TimeoutError):
    """Nothing arrived from the router within the client's timeout."""


class ServerError(Exception):
    """The router answered with an error; ``code`` is one of the protocol's ERR_* codes."""

    code = P.ERR_INTERNAL

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class InvalidRequest(ServerError, ValueError):
    """The request was refused as invalid; the message says what to change."""


class Overloaded(ServerError):
    """The router's queue is full; retry later."""


class Unavailable(ServerError):
    """No worker could serve the request in time, or the router went away."""


class RequestTimeout(ServerError, TimeoutError):
    """The request did not finish within its ``timeout_s``."""


class InternalError(ServerError):
    """The request failed inside the server (after retries)."""


_ERRORS = {P.ERR_INVALID: InvalidRequest, P.ERR_OVERLOADED: Overloaded,
           P.ERR_UNAVAILABLE: Unavailable, P.ERR_TIMEOUT: RequestTimeout,
           P.ERR_INTERNAL: InternalError}


def error_for(code: str, message: str) -> ServerError:
    """The exception for an Error message (ServerError itself for an unknown code)."""
    return _ERRORS.get(code, ServerError)(code, message)
