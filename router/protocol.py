"""Wire protocol of the router: clients <-> router (frontend) and workers <-> router (backend).

Every message is a small dataclass with a fixed integer type tag, packed with msgpack as
``[tag, field1, field2, ...]`` (field order = declaration order). ``decode`` accepts only
the tags in ``_BY_TAG`` and checks each field's type, so malformed input raises
``ProtocolError`` and never builds an object from a name taken off the wire. No pickle.

torch-free: the router and the client library import this.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack

from models.request_options import FINISH_LENGTH, FINISH_STOP  # noqa: F401 (part of this protocol)

# Limits for anything that faces the outside. Sockets also set zmq.MAXMSGSIZE to MAX_MESSAGE_BYTES.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
_UNPACK_LIMITS = dict(max_str_len=MAX_MESSAGE_BYTES, max_bin_len=MAX_MESSAGE_BYTES,
                      max_array_len=4 * 1024 * 1024, max_map_len=65536, max_ext_len=0)
UNPACK_LIMITS = _UNPACK_LIMITS  # for other readers of untrusted msgpack (router.server)


class ProtocolError(ValueError):
    """A message that could not be decoded; the text says what was wrong."""


# Finish reasons carried in Chunk.finish_reason / TokenItem.finish_reason: FINISH_STOP (EOS
# token, a stop token id, or a stop string), FINISH_LENGTH (max_tokens or the max model length),
FINISH_ABORT = "abort"    # cancelled, deadline, or the server gave up on the request
FINISH_REASONS = (FINISH_STOP, FINISH_LENGTH, FINISH_ABORT)
# Worker roles (Register.info["role"]): prefill only, decode only, or colocated.
ROLES = ("prefill", "decode", "both")
FREE_UNWRITTEN = "unwritten"  # Free.reason: the reservation was never handed to a KV writer

# Error codes carried in Error.code.
ERR_INVALID = "invalid_request"
ERR_OVERLOADED = "overloaded"
ERR_UNAVAILABLE = "unavailable"   # no worker of a needed role, past the wait bound
ERR_TIMEOUT = "timeout"
ERR_INTERNAL = "internal"


@dataclass
class Message:
    TAG: ClassVar[int] = -1


# -- clients <-> router ----------------------------------------------------------------------
@dataclass
class Generate(Message):
    """Client -> router. Exactly one of ``prompt`` / ``prompt_token_ids`` / ``messages``.

    ``messages`` is a chat (``[{"role": ..., "content": ...}, ...]``) that the router renders
    with the model's chat template, then tokenizes. ``params`` holds the sampling and stopping
    options (see router.client for the names); the router validates every key and value and
    rejects unknown keys.
    """
    TAG: ClassVar[int] = 1
    rid: str
    prompt: str | None
    prompt_token_ids: list | None
    params: dict
    stream: bool = True
    timeout_s: float | None = None
    messages: list | None = None


@dataclass
class Cancel(Message):
    """Client -> router: stop the request; the router answers with a final abort Chunk."""
    TAG: ClassVar[int] = 2
    rid: str


@dataclass
class StatusRequest(Message):
    TAG: ClassVar[int] = 3
    rid: str


@dataclass
class Chunk(Message):
    """Router -> client: new tokens of a request (and the text they complete)."""
    TAG: ClassVar[int] = 4
    rid: str
    token_ids: list
    text: str
    finish_reason: str | None = None
    num_prompt_tokens: int = 0


@dataclass
class Error(Message):
    """Router -> client (or router <-> worker): a request failed; ``code`` is one of ERR_*."""
    TAG: ClassVar[int] = 5
    rid: str
    code: str
    message: str


@dataclass
class StatusReply(Message):
    TAG: ClassVar[int] = 6
    rid: str
    status: dict


@dataclass
class ScaleRequest(Message):
    """Client -> router: run ``num_prefill`` prefill and ``num_decode`` decode workers (None:
    keep that role's count). Removed workers drain first (router/scaling.py); only a router
    started by a launcher that can start workers (``pdserve serve --launcher ray``) accepts it."""
    TAG: ClassVar[int] = 7
    rid: str
    num_prefill: int | None = None
    num_decode: int | None = None


@dataclass
class ScaleReply(Message):
    """Router -> client: what the scale request changed (workers added, workers draining)."""
    TAG: ClassVar[int] = 8
    rid: str
    result: dict


# -- workers -> router -----------------------------------------------------------------------
@dataclass
class Register(Message):
    """Worker -> router, first message on its backend connection (sent by TP rank 0).

    ``info`` keys: role, tp_size, kv_spec (KVSpec.to_dict()), fingerprint, model, transports
    (what the worker can send or receive, in its order of preference; see kvtransfer),
    max_model_len, num_blocks, pid, host, vocab_size, eos_token_ids, registration (how many
    routers the worker lost: a new count on the same connection means it dropped every
    request). ``router.workers`` checks them (``REGISTER_INFO_TYPES``).
    """
    TAG: ClassVar[int] = 10
    worker_id: str
    info: dict


@dataclass
class Registered(Message):
    """Router -> worker: registration accepted (``error`` None) or refused (why)."""
    TAG: ClassVar[int] = 11
    worker_id: str
    error: str | None = None
    config: dict = field(default_factory=dict)


@dataclass
class Heartbeat(Message):
    """Worker -> router, every heartbeat interval: liveness and load.

    ``stats`` is ``router.payloads.HeartbeatStats.to_wire()``. The router answers each one
    with ``HeartbeatAck``.
    """
    TAG: ClassVar[int] = 12
    worker_id: str
    stats: dict


@dataclass
class Allocate(Message):
    """Router -> decode worker: reserve blocks for ``num_tokens`` (+ what decoding will need).

    ``token_ids`` is the full context the KV will cover (prompt, plus tokens generated before a
    failover); ``output_index`` is how many tokens the request has already produced.
    """
    TAG: ClassVar[int] = 13
    rid: str
    transfer_id: str
    token_ids: list
    sampling: dict
    output_index: int = 0
    transport: str = ""  # what the prefill side will push with: "local" (same worker) or a transport name
    writer: str = ""     # worker_id of the prefill worker that will push the KV ("" when local)


@dataclass
class Allocated(Message):
    """Decode -> router: ``dest`` (a kvtransfer destination dict) or ``error`` (cannot hold it)."""
    TAG: ClassVar[int] = 14
    rid: str
    transfer_id: str
    dest: dict | None
    error: str | None = None


@dataclass
class Prefill(Message):
    """Router -> prefill worker: compute the KV of ``token_ids``, push it into ``dest``."""
    TAG: ClassVar[int] = 15
    rid: str
    transfer_id: str
    token_ids: list
    sampling: dict
    dest: dict
    output_index: int = 0


@dataclass
class FirstToken(Message):
    """Prefill -> router: KV pushed and the first token sampled (TTFT ends here).

    ``finish_reason`` is set when this token already ends the request (EOS, a stop token id,
    max_tokens reached); the decode worker reaches the same verdict and frees the request.
    Tokens that a decode worker reports for a request are always later output tokens: the
    router emits the first token from this message alone (and holds any ``Tokens`` item that
    overtakes it on the other socket until it arrives).
    """
    TAG: ClassVar[int] = 16
    rid: str
    transfer_id: str
    token_id: int
    logprob: float
    finish_reason: str | None = None
    num_cached_tokens: int = 0      # prompt tokens found in the prefill worker's prefix cache
    top_logprobs: list | None = None  # [[token_id, logprob], ...] when the request asked for them


@dataclass
class Tokens(Message):
    """Decode -> router, one per engine step: ``items`` = [``router.payloads.TokenItem.to_wire()``, ...]
    (with a fifth element, the top logprobs, for requests that asked for them)."""
    TAG: ClassVar[int] = 17
    worker_id: str
    step: int
    items: list


@dataclass
class Free(Message):
    """Router -> worker: the request is over (finished, stopped or aborted); free everything.

    ``reason`` is a finish reason, or ``FREE_UNWRITTEN``: no prefill worker was ever sent this
    reservation, so nothing can write into its blocks and they can be reused at once.
    """
    TAG: ClassVar[int] = 18
    rid: str
    reason: str = FINISH_ABORT


@dataclass
class WorkerError(Message):
    """Worker -> router: a request failed on the worker (``transfer_id`` may be empty)."""
    TAG: ClassVar[int] = 19
    rid: str
    transfer_id: str
    message: str


@dataclass
class Shutdown(Message):
    """Router -> worker: stop now (the router is going away)."""
    TAG: ClassVar[int] = 20
    reason: str = ""


@dataclass
class Started(Message):
    """Decode -> router: the request's KV landed and it joined the running batch."""
    TAG: ClassVar[int] = 21
    rid: str
    transfer_id: str


@dataclass
class HeartbeatAck(Message):
    """Router -> worker, answering each Heartbeat. ``registered`` False: this router does not
    know the worker (it restarted, or declared the worker dead); the worker must drop every
    request and register again."""
    TAG: ClassVar[int] = 22
    worker_id: str
    registered: bool = True


@dataclass
class PeerDead(Message):
    """Router -> decode workers: the prefill worker ``worker_id`` is dead. Reservations it was
    writing (``Allocate.writer``) can be released at once: no late write can land in them."""
    TAG: ClassVar[int] = 23
    worker_id: str


_BY_TAG: dict[int, type[Message]] = {
    cls.TAG: cls for cls in (Generate, Cancel, StatusRequest, Chunk, Error, StatusReply,
                             ScaleRequest, ScaleReply,
                             Register, Registered, Heartbeat, Allocate, Allocated, Prefill,
                             FirstToken, Tokens, Free, WorkerError, Shutdown, Started, HeartbeatAck,
                             PeerDead)
}
_FIELDS: dict[type[Message], list[tuple[str, tuple[type, ...], bool]]] = {}


def _allowed_types(annotation: Any) -> tuple[tuple[type, ...], bool]:
    """(python types accepted, whether None is accepted) for a field annotation."""
    names = [part.strip() for part in str(annotation).split("|")]
    table = {"str": (str,), "int": (int,), "float": (float, int), "bool": (bool,),
             "list": (list,), "dict": (dict,)}
    types: tuple[type, ...] = ()
    for name in names:
        if name != "None":
            types += table[name]
    return types, "None" in names


for _cls in _BY_TAG.values():
    _FIELDS[_cls] = [(f.name, *_allowed_types(f.type)) for f in dataclasses.fields(_cls)]


def encode(msg: Message) -> bytes:
    """Pack a message as ``[tag, *fields]``."""
    return msgpack.packb([msg.TAG, *(getattr(msg, name) for name, _, _ in _FIELDS[type(msg)])],
                         use_bin_type=True)


def decode(data: bytes, allowed: typing.Collection[type[Message]] | None = None) -> Message:
    """Unpack and type-check one message. Raises ProtocolError saying what is wrong.

    ``allowed`` restricts which message types this endpoint accepts.
    """
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(data)} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, **_UNPACK_LIMITS)
    except Exception as exc:  # msgpack raises several types for malformed input
        raise ProtocolError(f"not a valid msgpack message: {exc}") from None
    if not isinstance(obj, list) or not obj or not isinstance(obj[0], int) or isinstance(obj[0], bool):
        raise ProtocolError("a message must be a msgpack array [type_tag, fields...]")
    cls = _BY_TAG.get(obj[0])
    if cls is None or (allowed is not None and cls not in allowed):
        raise ProtocolError(f"message type {obj[0]} is not accepted here")
    fields = _FIELDS[cls]
    values = obj[1:]
    num_required = sum(1 for f in dataclasses.fields(cls)
                       if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    if not num_required <= len(values) <= len(fields):
        raise ProtocolError(f"{cls.__name__} takes {num_required} to {len(fields)} fields, got {len(values)}")
    for (name, types, nullable), value in zip(fields, values):
        if value is None and nullable:
            continue
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ProtocolError(f"{cls.__name__}.{name} must be {' or '.join(t.__name__ for t in types)}"
                                f"{' or null' if nullable else ''}, got {type(value).__name__}")
    return cls(*values)


CLIENT_TO_ROUTER = (Generate, Cancel, StatusRequest, ScaleRequest)
WORKER_TO_ROUTER = (Register, Heartbeat, Allocated, FirstToken, Tokens, WorkerError, Started)
ROUTER_TO_WORKER = (Registered, Allocate, Prefill, Free, Shutdown, HeartbeatAck, PeerDead)
