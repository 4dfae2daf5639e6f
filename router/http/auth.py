"""The API-key check: ``Authorization: Bearer KEY`` on every route but /health and /metrics
(the same rule as CurveZMQ for ZMQ: anything reachable from other hosts needs a key)."""
from __future__ import annotations

import hmac

from router.http.errors import APIError

OPEN_PATHS = frozenset({"/health", "/metrics"})


class ApiKeyCheck:
    """Compares the Bearer token with the configured key in constant time."""

    def __init__(self, api_key: str | None):
        self._key = api_key.encode() if api_key else None

    @property
    def enabled(self) -> bool:
        return self._key is not None

    def check(self, path: str, authorization: str | None) -> None:
        """Raise APIError(401) unless the path is open or the header carries the key."""
        if self._key is None or path in OPEN_PATHS:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._key):
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'")
