"""The KV transfer protocol's messages: msgpack maps with a type tag ``t``, checked on receipt.

Three links carry them (see ``kvtransfer/transport.py`` for the protocol):

- prefill rank -> decode rank (ZMQ, or NIXL notifications for ``nixl``): ``start`` (before
  the first write: names the writer, even when the data itself bypasses the rank), ``kv`` (header of a zmq data message; the K and V bytes of each segment of block runs
  follow as raw frames),
  ``nx`` (one NIXL write landed), ``done``, ``abort``, ``md_req`` (and the reply ``md``);
- decode coordinator -> decode rank: ``open``, ``close``, ``dead``;
- decode rank -> decode coordinator: ``hello``, ``rank_done``, ``rank_failed``, ``released``,
  ``rank_stopped`` (the rank's receiver thread ended unasked, with why).

Nothing here imports torch. Tensors never travel inside msgpack.
"""
from __future__ import annotations

import msgpack

# kind -> (required fields, optional fields), each name -> accepted Python types.
_STR, _INT, _NUM, _LIST, _BYTES, _BOOL, _DICT = (str,), (int,), (int, float), (list,), (bytes,), (bool,), (dict,)
_SOURCE = {"x": _STR, "s": _STR, "p": _INT, "pt": _INT}
SCHEMAS: dict[str, tuple[dict, dict]] = {
    "start": (_SOURCE, {}),
    "kv": ({**_SOURCE, "l": _INT, "h": _LIST, "segs": _LIST}, {}),
    "nx": ({"x": _STR, "p": _INT}, {}),
    "done": ({**_SOURCE, "n": _INT}, {"tok": _INT, "lp": _NUM}),
    "abort": ({**_SOURCE, "reason": _STR}, {"every": _BOOL}),
    "md_req": ({}, {}),
    "md": ({"agent": _STR, "md": _BYTES, "base": _INT, "dev": _INT, "tags": _INT}, {}),
    "open": ({"x": _STR, "blocks": _LIST, "transport": _STR}, {"writer": _STR}),
    "close": ({"x": _STR, "writer_dead": _BOOL}, {}),
    "dead": ({"s": _STR}, {}),
    "hello": ({"rank": _INT, "entry": _DICT}, {}),
    "rank_started": ({"x": _STR, "rank": _INT}, {}),
    "rank_done": ({"x": _STR, "rank": _INT}, {"tok": _INT, "lp": _NUM}),
    "rank_failed": ({"x": _STR, "rank": _INT, "reason": _STR}, {"writer_dead": _BOOL}),
    "released": ({"x": _STR, "rank": _INT}, {}),
    "rank_stopped": ({"rank": _INT, "reason": _STR}, {}),
}


class WireError(ValueError):
    """A message that is not valid msgpack or does not match its kind's schema."""


def pack(kind: str, **fields) -> bytes:
    """Encode one message; fields whose value is None are left out."""
    if kind not in SCHEMAS:
        raise ValueError(f"unknown message kind {kind!r}")
    return msgpack.packb({"t": kind, **{k: v for k, v in fields.items() if v is not None}},
                         use_bin_type=True)


def unpack(data: bytes, kinds: frozenset[str] | None = None) -> dict:
    """Decode and check one message. Raises WireError naming what is wrong.

    ``kinds`` limits which kinds this link accepts.
    """
    try:
        msg = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise WireError(f"not a msgpack message: {exc}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("t"), str):
        raise WireError("a message must be a map with a string type tag 't'")
    kind = msg["t"]
    if kind not in SCHEMAS or (kinds is not None and kind not in kinds):
        raise WireError(f"unexpected message kind {kind!r}")
    required, optional = SCHEMAS[kind]
    for name, types in required.items():
        if name not in msg:
            raise WireError(f"{kind} message lacks field {name!r}")
    for name, value in msg.items():
        if name == "t":
            continue
        types = required.get(name) or optional.get(name)
        if types is None:
            raise WireError(f"{kind} message has unknown field {name!r}")
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise WireError(f"{kind} message field {name!r} has type {type(value).__name__}")
    return msg


def int_list(value: list, name: str) -> list[int]:
    """Check that a decoded list holds only ints (block ids, ranges)."""
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise WireError(f"field {name!r} must be a list of integers")
    return value
