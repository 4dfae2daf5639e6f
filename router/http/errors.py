"""Errors as vLLM's API server shapes them: ``{"error": {"message", "type", "param", "code"}}``.

The router's error codes map to HTTP statuses: invalid_request 400, overloaded 429,
unavailable 503, timeout 504, anything else 500. ``code`` in the body is the HTTP status, as
vLLM sends it.
"""
from __future__ import annotations

import json
from http import HTTPStatus

from router import protocol as P

STATUS_BY_CODE = {P.ERR_INVALID: 400, P.ERR_OVERLOADED: 429, P.ERR_UNAVAILABLE: 503,
                  P.ERR_TIMEOUT: 504, P.ERR_INTERNAL: 500}
TYPE_BY_STATUS = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
                  405: "MethodNotAllowed", 413: "RequestEntityTooLarge", 429: "RateLimitError",
                  500: "InternalServerError", 503: "ServiceUnavailableError", 504: "TimeoutError"}


class APIError(Exception):
    """A request the gateway answers with an error (before or while streaming)."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    @classmethod
    def from_router(cls, code: str, message: str) -> "APIError":
        """The APIError for a router Error (``protocol.ERR_*`` code)."""
        return cls(STATUS_BY_CODE.get(code, 500), message)

    def body(self) -> dict:
        kind = TYPE_BY_STATUS.get(self.status) or HTTPStatus(self.status).phrase.replace(" ", "")
        return {"error": {"message": self.message, "type": kind, "param": self.param,
                          "code": self.status}}

    def json_bytes(self) -> bytes:
        return json.dumps(self.body(), ensure_ascii=False).encode()


def invalid(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)
