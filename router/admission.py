"""Admission: a client's Generate becomes a queued Request, or a refusal with an error code.

Checks, in order: the request id, the model being known, the queue bound (``overloaded``),
every field (``validation.validate_generate``), and that the prompt plus ``max_tokens`` fits
the largest decode worker's KV pool (a request that can never be placed is invalid, not queued).

A text prompt or chat longer than ``INLINE_PROMPT_CHARS`` is rendered and tokenized off the
event loop (router/tokenizing.py) between ``precheck`` and ``admit``, so a 4 MiB prompt never
stalls the streams of everyone else.
"""
from __future__ import annotations

import functools
import secrets
import time
from typing import Callable

from kvtransfer.spec import reservation_blocks
from router import protocol as P
from router.config import RouterConfig
from router.model_info import ModelInfo
from router.output import OutputProcessor
from router.request import Request
from router.validation import (InvalidRequest, RequestSpec, check_text_prompt, encode_prompt,
                               prompt_chars, validate_generate, validate_rid)
from router.workers import WorkerRegistry

# Prompts (or chats) up to this many characters are tokenized inline (a few milliseconds at most).
INLINE_PROMPT_CHARS = 4096


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

    @staticmethod
    def is_heavy(msg: P.Generate) -> bool:
        """Whether tokenizing ``msg`` belongs off the event loop."""
        return prompt_chars(msg) > INLINE_PROMPT_CHARS

    def encoder(self, msg: P.Generate, model: ModelInfo) -> Callable[[], list[int]]:
        """What tokenizes ``msg`` off the loop (after ``precheck``); it raises InvalidRequest."""
        return functools.partial(encode_prompt, msg, model, self._max_len(model))

    def precheck(self, msg: P.Generate, model: ModelInfo | None, num_waiting: int,
                 client_rids) -> None:
        """The cheap checks of ``admit``, done before a heavy prompt is tokenized. Raises Rejected."""
        self._check_head(msg, model, num_waiting, client_rids)
        try:
            check_text_prompt(msg, model, self._max_len(model))
        except InvalidRequest as exc:
            raise Rejected(msg.rid, P.ERR_INVALID, str(exc)) from None

    def admit(self, client: bytes, msg: P.Generate, model: ModelInfo | None, num_waiting: int,
              client_rids, encoded: list[int] | None = None) -> Request:
        """A new QUEUED request for ``msg`` (``encoded``: its text prompt's token ids, if
        tokenized already). Raises Rejected."""
        self._check_head(msg, model, num_waiting, client_rids)
        max_len = self._max_len(model)
        try:
            spec = validate_generate(msg, model, max_len, encoded)
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

    def _max_len(self, model: ModelInfo) -> int:
        return min(model.max_model_len, self.registry.max_model_len() or model.max_model_len)

    def _check_head(self, msg: P.Generate, model: ModelInfo | None, num_waiting: int, client_rids) -> None:
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

    def _check_fits(self, spec: RequestSpec, max_len: int) -> None:
        largest = self.registry.max_decode_blocks()
        if largest and self.registry.kv_spec is not None:
            need = reservation_blocks(len(spec.prompt_ids), spec.max_tokens, 0, max_len,
                                 self.registry.kv_spec.block_size)
            if need > largest:
                raise InvalidRequest(f"the prompt and max_tokens need {need} KV blocks but the largest "
                                     f"decode worker holds {largest}; lower max_tokens or shorten the prompt")
