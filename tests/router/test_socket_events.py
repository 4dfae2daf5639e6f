"""A client or worker socket's connection events, in any order: what it reports as a refusal,
a lost connection or nothing (router/sockets.py's docstring). The events come from libzmq's
monitor; here they are fed in random orders to a real socket's handler."""
import asyncio

import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from router.sockets import AUTH_FAILED, HANDSHAKE_FAILED, SILENT_REFUSALS, LoopSocket

MISMATCH = zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH
EVENTS = {
    "handshake": (zmq.EVENT_HANDSHAKE_SUCCEEDED, 0),
    "drop": (zmq.EVENT_DISCONNECTED, 9),
    "denied": (zmq.EVENT_HANDSHAKE_FAILED_AUTH, 400),
    "mismatch": (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, MISMATCH),
    "bad box": (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC),
    "silent": (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, 32),
    "garbage": (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.PROTOCOL_ERROR_ZMTP_UNEXPECTED_COMMAND),
}


def expected_reports(names: list[str]) -> list[bytes]:
    """What the socket must report, from the rules alone."""
    reports, up, refused, streak = [], False, False, 0
    for name in names:
        if name == "handshake":
            up, refused, streak = True, False, 0
        elif name == "drop":
            if up:
                reports.append(b"")
            up = False
        elif name in ("denied", "mismatch", "bad box"):
            if not refused:
                reports.append(AUTH_FAILED)
            refused = True
        else:
            streak += 1
            if streak >= SILENT_REFUSALS and not refused:
                reports.append(HANDSHAKE_FAILED)
                refused = True
    return reports


def feed(names: list[str]) -> tuple[list[bytes], bytes | None]:
    """Feed the events to a real DEALER socket's handler: its reports and its final ``refused``."""
    async def run():
        reports = []
        ctx = zmq.Context()
        sock = LoopSocket(ctx.socket(zmq.DEALER), lambda frames: None, on_disconnect=reports.append)
        try:
            for name in names:
                sock._peer_event(*EVENTS[name])
            return reports, sock.refused
        finally:
            sock.close()
            ctx.term()
    return asyncio.run(run())


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(sorted(EVENTS)), max_size=30))
def test_refusals_and_drops_are_reported_once_each(names):
    reports, refused = feed(names)
    assert reports == expected_reports(names)
    last_handshake = max((i for i, n in enumerate(names) if n == "handshake"), default=-1)
    told_since = [r for r in expected_reports(names[last_handshake + 1:]) if r != b""]
    assert refused == (told_since[0] if told_since else None)


def test_a_streak_needs_silent_failures_in_a_row():
    short = ["silent"] * (SILENT_REFUSALS - 1)
    assert feed(short + ["handshake"] + short + ["drop"]) == ([b""], None)
    assert feed(short + ["garbage"]) == ([HANDSHAKE_FAILED], HANDSHAKE_FAILED)
    assert feed(["mismatch"] + short + ["garbage", "denied"]) == ([AUTH_FAILED], AUTH_FAILED)
    assert feed(["denied", "handshake", "drop", "bad box"]) == ([AUTH_FAILED, b"", AUTH_FAILED], AUTH_FAILED)


def test_a_late_message_from_a_closed_connection_never_marks_the_descriptors_new_peer_gone():
    """zmq can deliver a closed connection's last messages after the first ones of the
    connection that reused its descriptor: they are dropped, and only the old peer is gone."""
    async def run():
        gone = []
        ctx = zmq.Context()
        sock = LoopSocket(ctx.socket(zmq.ROUTER), lambda frames: None, on_disconnect=gone.append)
        first, second = b"\0\0\0\0\x01", b"\0\0\0\0\x02"
        try:
            assert sock._note_peer(first, 12) and gone == []
            assert sock._note_peer(second, 12) and gone == [first]  # the descriptor was reused
            assert not sock._note_peer(first, 12)  # a message still queued from the first
            assert sock._note_peer(second, 12) and gone == [first]
            # Names a peer chose itself carry no order: the peer last seen gone stays gone.
            assert sock._note_peer(b"worker-a", 13) and sock._note_peer(b"worker-b", 13)
            assert not sock._note_peer(b"worker-a", 13) and gone == [first, b"worker-a"]
        finally:
            sock.close()
            ctx.term()
    asyncio.run(run())

