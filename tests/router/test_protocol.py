import random

import msgpack
import pytest

from router import protocol as P
from router.server import _chunk_packer, _rid_of


def test_round_trip_of_every_message_type():
    msgs = [P.Generate("r", "hi", None, {"max_tokens": 2}, False, 1.5), P.Cancel("r"),
            P.Chunk("r", [1, 2], "ab", P.FINISH_STOP, 3), P.Error("r", P.ERR_INVALID, "bad"),
            P.Allocate("r", "t", [1], {"seed": 1}, 2, "shm", "p0"), P.HeartbeatAck("w", False), P.PeerDead("p0"),
            P.FirstToken("r", "t", 5, -0.5, None), P.Tokens("w", 3, [["r", 1, -0.1, None]])]
    for msg in msgs:
        assert P.decode(P.encode(msg)) == msg


def test_fast_chunk_encoding_equals_protocol_encoding():
    fast = _chunk_packer.pack([P.Chunk.TAG, "r", [7], "x", None, 4])
    assert fast == P.encode(P.Chunk("r", [7], "x", None, 4))


@pytest.mark.parametrize("data, match", [
    (b"", "not a valid msgpack"),
    (b"\xc1", "not a valid msgpack"),
    (msgpack.packb([1, "r", "hi"])[:-1], "not a valid msgpack"),
    (msgpack.packb({"a": 1}), "must be a msgpack array"),
    (msgpack.packb([]), "must be a msgpack array"),
    (msgpack.packb([True, "r"]), "must be a msgpack array"),
    (msgpack.packb([99, "r"]), "type 99 is not accepted"),
    (msgpack.packb([4, "r", [], "", None, 0]), "type 4 is not accepted"),   # a Chunk sent to the router
    (msgpack.packb([1, "r", 5, None, {}]), "Generate.prompt must be str or null, got int"),
    (msgpack.packb([1, "r", "x", None, {}, "yes"]), "Generate.stream must be bool, got str"),
    (msgpack.packb([1, "r"]), "Generate takes 4 to 7 fields, got 1"),
    (msgpack.packb([1, "r", "x", None, {}, True, None, None, 7]), "takes 4 to 7 fields, got 8"),
    (msgpack.packb([1, b"r", "x", None, {}]), "Generate.rid must be str"),
    (msgpack.packb([2, "r"]) + b"\x00", "not a valid msgpack"),  # trailing bytes
])
def test_hostile_client_messages_raise_protocol_errors(data, match):
    with pytest.raises(P.ProtocolError, match=match):
        P.decode(data, P.CLIENT_TO_ROUTER)


def test_oversized_and_bomb_messages_are_refused_before_unpacking_everything():
    with pytest.raises(P.ProtocolError, match="exceeds"):
        P.decode(b"\x90" * (P.MAX_MESSAGE_BYTES + 1))
    # An array header claiming 2**32-1 elements with no data: refused by the unpack limits.
    with pytest.raises(P.ProtocolError, match="not a valid msgpack"):
        P.decode(b"\xdd\xff\xff\xff\xff")
    with pytest.raises(P.ProtocolError):
        P.decode(msgpack.packb([1, "r", None, None, {i: i for i in range(10)}]))  # int map keys in params


def test_random_bytes_never_escape_as_other_exceptions():
    rng = random.Random(0)
    for _ in range(3000):
        data = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 40)))
        try:
            P.decode(data, P.CLIENT_TO_ROUTER)
        except P.ProtocolError:
            pass
    valid = P.encode(P.Generate("r", "hello", None, {"max_tokens": 3}))
    for cut in range(len(valid)):
        with pytest.raises(P.ProtocolError):
            P.decode(valid[:cut], P.CLIENT_TO_ROUTER)


def test_rid_of_a_malformed_message_is_recovered_when_readable():
    assert _rid_of(msgpack.packb([1, "abc", 5])) == "abc"
    assert _rid_of(b"\xc1") is None and _rid_of(msgpack.packb([1, 5])) is None
