"""Admission: a client's Generate becomes a queued Request, or a refusal with an error code.

Checks, in order: the request id, the model being known, the queue bound (``overloaded``),
every field (``validation.validate_generate``), and that the prompt plus ``max_tokens`` fits
the largest decode worker's KV pool (a request that can never be placed is invalid, not queued).
"""
from __future__ import annotations

import secrets
import time

from kvtransfer.spec import reservation_blocks
from router import protocol as P
from router.config import RouterConfig
from router.model_info import ModelInfo
from router.output import OutputProcessor
from router.request import Request
from router.validation import InvalidRequest, RequestSpec, validate_generate, validate_rid
from router.workers import WorkerRegistry


class Rejected(Exception):
    """A refused Generate: the Error to send back."""

    def __init__(self, client_rid: str, code: str, message: str):
        super().__init__(message)
        self.client_rid, self.code, self.message = client_rid, code, message


class Admission:
    """Builds Requests with router-unique ids (``<boot>-<n>``: never reused, even across restarts)."""

    def __init__(self, config: RouterConfig, registry: WorkerRegistry):
        self.config = config
        self.registry = registry
        self._rid_prefix = secrets.token_hex(3)
        self._next_id = 0

    def admit(self, client: bytes, msg: P.Generate, model: ModelInfo | None, num_waiting: int,
              client_rids: dict) -> Request:
        """A new QUEUED request for ``msg``. Raises Rejected."""
        try:
            validate_rid(msg.rid)
        except InvalidRequest as exc:
            raise Rejected(msg.rid if isinstance(msg.rid, str) else "", P.ERR_INVALID, str(exc)) from None
        if msg.rid in client_rids:
            raise Rejected(msg.rid, P.ERR_INVALID, f"request id {msg.rid!r} is already in use on this connection")
        if model is None:
            raise Rejected(msg.rid, P.ERR_UNAVAILABLE,
                           "no worker has registered yet, so the model is unknown; retry shortly")
        if num_waiting >= self.config.max_queue:
            raise Rejected(msg.rid, P.ERR_OVERLOADED,
                           f"{num_waiting} requests are already waiting (the limit); retry later")
        max_len = min(model.max_model_len, self.registry.max_model_len() or model.max_model_len)
        try:
            spec = validate_generate(msg, model, max_len)
            self._check_fits(spec, max_len)
        except InvalidRequest as exc:
            raise Rejected(msg.rid, P.ERR_INVALID, str(exc)) from None
        stop_ids = set(spec.options.stop_token_ids)
        if not spec.options.ignore_eos:
            stop_ids.update(model.eos_token_ids)
        self._next_id += 1
        now = time.monotonic()
        return Request(rid=f"{self._rid_prefix}-{self._next_id}", client=client, client_rid=msg.rid,
                       spec=spec, output=OutputProcessor(model.tokenizer, spec.prompt_ids, spec.stop),
                       stop_ids=frozenset(stop_ids), arrival=now, queued_at=now)

    def _check_fits(self, spec: RequestSpec, max_len: int) -> None:
        largest = self.registry.max_decode_blocks()
        if largest and self.registry.kv_spec is not None:
            need = reservation_blocks(len(spec.prompt_ids), spec.max_tokens, 0, max_len,
                                 self.registry.kv_spec.block_size)
            if need > largest:
                raise InvalidRequest(f"the prompt and max_tokens need {need} KV blocks but the largest "
                                     f"decode worker holds {largest}; lower max_tokens or shorten the prompt")
