"""The transfer protocol's message checks: malformed input is rejected with a reason."""
from __future__ import annotations

import msgpack
import pytest

from kvtransfer.wire import WireError, int_list, pack, unpack


def test_round_trip_drops_none_fields():
    msg = unpack(pack("done", x="t", s="P", p=0, pt=1, n=0, tok=None))
    assert msg == {"t": "done", "x": "t", "s": "P", "p": 0, "pt": 1, "n": 0}


@pytest.mark.parametrize("data, reason", [
    (b"\xc1", "not a msgpack"),
    (msgpack.packb([1, 2]), "map with a string type tag"),
    (msgpack.packb({"t": "evil"}), "unexpected message kind"),
    (msgpack.packb({"t": "close", "x": "a"}), "lacks field 'writer_dead'"),
    (msgpack.packb({"t": "close", "x": "a", "writer_dead": 1}), "has type int"),
    (msgpack.packb({"t": "dead", "s": "a", "extra": 1}), "unknown field 'extra'"),
    (msgpack.packb({"t": "nx", "x": "a", "p": True}), "has type bool"),
])
def test_malformed_messages_are_rejected(data, reason):
    with pytest.raises(WireError, match=reason):
        unpack(data)


def test_a_link_accepts_only_its_kinds():
    with pytest.raises(WireError, match="unexpected message kind 'open'"):
        unpack(pack("open", x="a", blocks=[1], transport="zmq"), frozenset({"kv", "done"}))


def test_int_list():
    assert int_list([1, 2], "blocks") == [1, 2]
    with pytest.raises(WireError, match="list of integers"):
        int_list([1, "2"], "blocks")
    with pytest.raises(ValueError, match="unknown message kind"):
        pack("nope")
