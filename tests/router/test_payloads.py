import msgpack
import pytest

from router.payloads import HeartbeatStats, TokenItem
from router.protocol import ProtocolError


def wire_trip(obj):
    return msgpack.unpackb(msgpack.packb(obj, use_bin_type=True), raw=False)


def test_token_item_round_trip_is_exact():
    for item in (TokenItem("r1", 5, -0.25, None), TokenItem("r2", 0, 0.0, "length"),
                 TokenItem("r3", 4, -0.5, None, [[4, -0.5], [9, -1.25]])):
        assert TokenItem.from_wire(wire_trip(item.to_wire())) == item
    assert len(TokenItem("r", 1, 0.0, None).to_wire()) == 4  # no top logprobs: not on the wire
    assert TokenItem.from_wire(["r", 1, -1, "stop"]) == TokenItem("r", 1, -1.0, "stop")


@pytest.mark.parametrize("wire, match", [
    ({"rid": "r"}, r"\[rid, token_id, logprob, finish_reason\]"),
    (["r", 1, 0.0], r"\[rid, token_id"),
    (["", 1, 0.0, None], "rid must be a non-empty string"),
    ([3, 1, 0.0, None], "rid must be a non-empty string"),
    (["r", -1, 0.0, None], "token_id must be an integer >= 0"),
    (["r", 1.0, 0.0, None], "token_id must be an integer >= 0"),
    (["r", True, 0.0, None], "token_id must be an integer >= 0"),
    (["r", 1, "x", None], "logprob must be a number"),
    (["r", 1, None, None], "logprob must be a number"),
    (["r", 1, 0.0, "eos"], "finish_reason must be null or one of"),
    (["r", 1, 0.0, None, [[1]]], "top_logprobs must be a list"),
    (["r", 1, 0.0, None, [[1, -0.5]] * 21], "top_logprobs must be a list"),
    (["r", 1, 0.0, None, [[-1, -0.5]]], "top_logprobs must be a list"),
])
def test_token_item_rejects_each_malformed_field(wire, match):
    with pytest.raises(ProtocolError, match=match):
        TokenItem.from_wire(wire)


def test_heartbeat_stats_round_trip_is_exact_and_flat():
    stats = HeartbeatStats(num_blocks=64, free_blocks=60, running=2, waiting=1, reserved=3,
                           waiting_tokens=40, num_steps=17, has_work=True, health="TP rank(s) [1] exited",
                           kv={"kv_by_transport": {"shm": 2}, "bytes_sent": 10})
    wire = stats.to_wire()
    assert wire["kv_by_transport"] == {"shm": 2} and wire["num_steps"] == 17 and "kv" not in wire
    assert HeartbeatStats.from_wire(wire_trip(wire)) == stats
    assert HeartbeatStats.from_wire({}) == HeartbeatStats()
    assert HeartbeatStats.from_wire(HeartbeatStats().to_wire()) == HeartbeatStats()


@pytest.mark.parametrize("field, value", [
    ("num_blocks", -1), ("num_blocks", 1.5), ("free_blocks", "3"), ("running", None), ("waiting", -2),
    ("reserved", True), ("waiting_tokens", 0.5), ("num_steps", -1),
    ("has_work", 1), ("health", 3),
])
def test_heartbeat_stats_rejects_each_malformed_field(field, value):
    with pytest.raises(ProtocolError, match=f"Heartbeat stats {field} must be"):
        HeartbeatStats.from_wire({field: value})


def test_heartbeat_stats_rejects_a_non_mapping_and_non_string_keys():
    with pytest.raises(ProtocolError, match="must be a mapping"):
        HeartbeatStats.from_wire([1, 2])
    with pytest.raises(ProtocolError, match="keys must be strings"):
        HeartbeatStats.from_wire({1: 2})
