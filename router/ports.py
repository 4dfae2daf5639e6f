"""What the request scheduler (router/scheduler.py) talks to: its ``Outbox`` (the router's
sockets, router/server.py) and an optional ``Observer`` (router/metrics.py)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from router import protocol as P
    from router.request import Request
    from router.workers import WorkerRecord


class Outbox(Protocol):
    def to_worker(self, worker: WorkerRecord, msg: P.Message) -> None: ...

    def chunk(self, req: Request, token_ids: list[int], text: str, finish_reason: str | None) -> bool:
        """Send a Chunk. False: the request must end now without another answer (the client
        is gone, or too far behind and was sent an ``overloaded`` error instead)."""

    def error(self, client: bytes, client_rid: str, code: str, message: str) -> None: ...


class Observer(Protocol):
    """Told of each request's milestones (router/metrics.py)."""

    def on_scheduled(self, req: Request) -> None: ...

    def on_token(self, req: Request) -> None: ...

    def on_kv_landed(self, req: Request) -> None: ...

    def on_finished(self, req: Request, reason: str, error_code: str | None) -> None: ...

    def on_rejected(self, code: str) -> None: ...
