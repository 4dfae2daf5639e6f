"""Typed records carried inside router <-> worker messages: a ``Tokens`` item and a
``Heartbeat``'s stats. Each has ``to_wire`` / ``from_wire``; ``from_wire`` checks every field and
raises ``ProtocolError`` naming the bad one, like ``router.protocol.decode``. torch-free.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import NamedTuple

from models.request_options import MAX_TOP_LOGPROBS, is_int
from router.protocol import FINISH_REASONS, ProtocolError


class TokenItem(NamedTuple):
    """One sequence's output of one decode step (``Tokens.items``). ``top_logprobs``: the most
    likely tokens as ``[[token_id, logprob], ...]`` when the request asked for them (on the
    wire as a fifth element, absent otherwise)."""
    rid: str
    token_id: int
    logprob: float
    finish_reason: str | None
    top_logprobs: list | None = None

    def to_wire(self) -> list:
        return list(self) if self.top_logprobs is not None else list(self[:4])

    @classmethod
    def from_wire(cls, data) -> "TokenItem":
        if not isinstance(data, list) or len(data) not in (4, 5):
            raise ProtocolError("a Tokens item must be [rid, token_id, logprob, finish_reason] "
                                "or [..., top_logprobs]")
        rid, token_id, logprob, reason = data[:4]
        top = check_top_logprobs(data[4]) if len(data) == 5 else None
        if not isinstance(rid, str) or not rid:
            raise ProtocolError("Tokens item rid must be a non-empty string")
        if not is_int(token_id) or token_id < 0:
            raise ProtocolError(f"Tokens item token_id must be an integer >= 0, got {token_id!r}")
        if not isinstance(logprob, (int, float)) or isinstance(logprob, bool):
            raise ProtocolError(f"Tokens item logprob must be a number, got {logprob!r}")
        if reason is not None and reason not in FINISH_REASONS:
            raise ProtocolError(f"Tokens item finish_reason must be null or one of {FINISH_REASONS}, "
                                f"got {reason!r}")
        return cls(rid, token_id, float(logprob), reason, top)


def check_top_logprobs(top) -> list | None:
    """``[[token_id, logprob], ...]`` (at most MAX_TOP_LOGPROBS) or None; raises ProtocolError."""
    if top is None:
        return None
    if not isinstance(top, list) or len(top) > MAX_TOP_LOGPROBS or not all(
            isinstance(p, list) and len(p) == 2 and is_int(p[0]) and p[0] >= 0
            and isinstance(p[1], (int, float)) and not isinstance(p[1], bool) for p in top):
        raise ProtocolError(f"top_logprobs must be a list of at most {MAX_TOP_LOGPROBS} "
                            "[token_id, logprob] pairs")
    return top


_COUNTS = ("num_blocks", "free_blocks", "running", "waiting", "reserved", "waiting_tokens", "num_steps")


@dataclass(frozen=True)
class HeartbeatStats:
    """A worker's load and progress, sent with every heartbeat.

    num_blocks / free_blocks: its KV pool (None before the pool exists). running: sequences
    decoding. waiting: prompts queued for prefill. reserved: decode reservations whose KV has
    not landed. waiting_tokens: prompt tokens not yet computed. num_steps: model steps done
    (monotonic). has_work: a step is planned or running. health: None when every thread and TP
    rank is fine, else a one-line reason. kv: transport counters, shown in status replies
    (flat on the wire: every key that is not a field above).
    """
    num_blocks: int | None = None
    free_blocks: int | None = None
    running: int = 0
    waiting: int = 0
    reserved: int = 0
    waiting_tokens: int = 0
    num_steps: int = 0
    has_work: bool = False
    health: str | None = None
    kv: dict = field(default_factory=dict)

    def to_wire(self) -> dict:
        core = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "kv"}
        return {**self.kv, **core}

    @classmethod
    def from_wire(cls, data) -> "HeartbeatStats":
        if not isinstance(data, dict):
            raise ProtocolError(f"Heartbeat stats must be a mapping, got {type(data).__name__}")
        values, kv = {}, {}
        for key, value in data.items():
            if key in _CORE:
                values[key] = value
            elif isinstance(key, str):
                kv[key] = value
            else:
                raise ProtocolError(f"Heartbeat stats keys must be strings, got {key!r}")
        for name in _COUNTS:
            value = values.get(name, 0)
            if not (value is None and name in ("num_blocks", "free_blocks")) and (not is_int(value) or value < 0):
                raise ProtocolError(f"Heartbeat stats {name} must be an integer >= 0, got {value!r}")
        if not isinstance(values.get("has_work", False), bool):
            raise ProtocolError(f"Heartbeat stats has_work must be true or false, got {values['has_work']!r}")
        if values.get("health") is not None and not isinstance(values["health"], str):
            raise ProtocolError(f"Heartbeat stats health must be null or a string, got {values['health']!r}")
        return cls(**values, kv=kv)


_CORE = tuple(f.name for f in fields(HeartbeatStats) if f.name != "kv")
