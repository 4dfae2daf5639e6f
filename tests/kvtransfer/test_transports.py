"""Every KV transport between real processes: bit-exact landing, abort, expiry, stale ids,
a SIGKILLed sender, negotiation, and bounded receiver memory under a stalled consumer.

One decode process (shared-memory pool, nixl enabled: it accepts all three transports) and one
prefill process serve the whole module; each test returns every block to the free list.
"""
from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time

import numpy as np
import pytest
import zmq

from kvtransfer.negotiate import choose_transport
from kvtransfer.nixl_transport import nixl_available
from kvtransfer.spec import KVSpec
from kvtransfer.wire import pack
from tests.kvtransfer.nodes import SHM_PREFIX, DecodeNode, Node, PrefillNode, bits, global_kv, remove_shm_files

pytestmark = pytest.mark.slow

SPEC = dict(num_layers=3, num_kv_heads=2, head_dim=8, block_size=4, dtype="bfloat16")
NUM_BLOCKS = 48
PREFILL_SEED = 2
TRANSPORTS = ["zmq", "shm", pytest.param("nixl", marks=pytest.mark.skipif(
    not nixl_available(), reason="nixl is not installed"))]
PREFILL_KV = global_kv(KVSpec(**SPEC), NUM_BLOCKS, PREFILL_SEED)


@pytest.fixture(scope="module")
def run_dir():
    path = tempfile.mkdtemp(prefix="kvt-")
    yield path
    shutil.rmtree(path, ignore_errors=True)
    remove_shm_files(os.path.basename(path))


@pytest.fixture(scope="module")
def decode(run_dir):
    node = Node(DecodeNode, spec=SPEC, num_blocks=NUM_BLOCKS, endpoint=f"ipc://{run_dir}/d0",
                ctrl=f"ipc://{run_dir}/ctrl", backend="shm", nixl=nixl_available(),
                shm_path=f"{SHM_PREFIX}{os.path.basename(run_dir)}-d0",
                receiver_config={"park_timeout_s": 0.5})
    try:
        node.call("wait_ready")
        yield node
    finally:
        node.close()


@pytest.fixture(scope="module")
def prefill():
    node = Node(PrefillNode, spec=SPEC, num_blocks=NUM_BLOCKS, sender_id="P-main", seed=PREFILL_SEED,
                sender_config={"open_wait_s": 0.5})
    try:
        yield node
    finally:
        node.close()


@pytest.fixture(autouse=True)
def all_blocks_free_after(request):
    yield
    if "decode" in request.fixturenames:
        decode = request.getfixturevalue("decode")
        stats = decode.call("settle")["coord"]
        assert stats["num_free_blocks"] == NUM_BLOCKS and stats["num_live"] == 0, stats


def expected_after(before: np.ndarray, src: list[int], dst: list[int]) -> np.ndarray:
    expected = before.copy()
    expected[:, :, dst] = bits(PREFILL_KV[:, :, src])
    return expected


def wait_sent(prefill, beyond: int = 0) -> None:
    """Until the prefill node's sender has moved more than ``beyond`` bytes in total."""
    for _ in range(1000):
        if prefill.call("stats")["bytes_sent"] > beyond:
            return
        time.sleep(0.01)
    raise AssertionError("the sender never sent its queued layers")


def send_whole(prefill, dest, src, token=7, logprob=-0.25):
    tid = dest["transfer_id"]
    prefill.call("start", dest, src)
    prefill.call("send", tid)
    prefill.call("finish", tid, token, logprob)
    return prefill.call("wait", tid)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_lands_bit_exact_in_scattered_blocks(transport, decode, prefill):
    tid = f"exact-{transport}"
    decode.call("order_free_list", [30, 31, 32, 5, 17, 18, 2, 40, 41, 42, 7, 8])
    before = decode.call("pool_bits")
    # Decode reserves for the whole sequence (12 blocks); the 38-token prompt fills the first 10.
    dest = decode.call("reserve", tid, 48, transport=transport, writer="P-main")
    reserved = dest["ranks"][0]["block_ids"]
    assert reserved == [30, 31, 32, 5, 17, 18, 2, 40, 41, 42, 7, 8]
    dst = reserved[:10]
    src = [10, 11, 12, 3, 20, 21, 8, 0, 1, 2]
    prefill.call("start", dest, src, 38)
    for start, stop in ((0, 14), (14, 38)):  # a chunked prefill, layer by layer per chunk
        for layer in range(3):
            prefill.call("send", tid, [layer], start, stop)
    prefill.call("finish", tid, 11, -0.5)
    assert prefill.call("wait", tid) is None
    assert decode.call("events", use_async=transport == "zmq") == [("done", tid, reserved, 11, -0.5)]
    np.testing.assert_array_equal(decode.call("pool_bits"), expected_after(before, src, dst))
    decode.call("free", reserved)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_abort_quarantines_until_no_writer_is_left(transport, decode, prefill):
    tid = f"abort-{transport}"
    dest = decode.call("reserve", tid, 20, transport=transport, writer="P-main")
    dst = dest["ranks"][0]["block_ids"]
    prefill.call("start", dest, [0, 1, 2, 3, 4])
    sent_before = prefill.call("stats")["bytes_sent"]
    prefill.call("send", tid, [0])
    wait_sent(prefill, sent_before)  # layer 0 is written
    assert decode.call("abort", tid)
    if transport == "zmq":
        # The rank's own thread is the only writer: closing the transfer there releases it.
        assert decode.call("settle")["coord"]["num_free_blocks"] == NUM_BLOCKS
        decode.call("order_free_list", dst)  # the next reservation reuses the aborted blocks
        before = decode.call("pool_bits")
        reuse = decode.call("reserve", "reuse-" + tid, 20, transport=transport)
        assert reuse["ranks"][0]["block_ids"] == dst
        stale_before = decode.call("stats")["recv"]["stale_dropped"]
        prefill.call("send", tid, [1, 2])  # late frames of the aborted transfer
        prefill.call("finish", tid)
        assert prefill.call("wait", tid) is None  # the sender cannot tell; the receiver drops them
        decode.call("events", 0.3)
        assert decode.call("stats")["recv"]["stale_dropped"] >= stale_before + 3
        np.testing.assert_array_equal(decode.call("pool_bits"), before)
        assert decode.call("abort", "reuse-" + tid)
        return
    stats = decode.call("settle", 0.5)["coord"]  # the writer has not answered: nothing moves
    assert (stats["num_quarantined"], stats["num_quarantined_blocks"]) == (1, 5)
    assert set(dst).isdisjoint(decode.call("free_block_ids"))
    prefill.call("abort", tid)
    assert "abort" in prefill.call("wait", tid)
    stats = decode.call("settle")["coord"]
    assert stats["num_quarantined"] == 0 and stats["num_free_blocks"] == NUM_BLOCKS
    assert decode.call("events", 0.1) == []  # the worker asked for this abort: no event


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_abort_of_an_unpublished_destination_frees_at_once(transport, decode):
    tid = f"unpublished-{transport}"
    decode.call("reserve", tid, 20, transport=transport)
    assert decode.call("abort", tid, published=False)  # no prefill worker ever saw it
    stats = decode.call("settle", 5.0)["coord"]
    assert stats["num_quarantined"] == 0 and stats["num_free_blocks"] == NUM_BLOCKS


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_stale_transfer_id_is_dropped(transport, decode, prefill):
    done_id, live_id = f"stale-done-{transport}", f"stale-live-{transport}"
    dest = decode.call("reserve", done_id, 16, transport=transport, writer="P-main")
    done_dst = dest["ranks"][0]["block_ids"]
    assert send_whole(prefill, dest, [0, 1, 2, 3]) is None
    assert decode.call("events")[0][:2] == ("done", done_id)
    live = decode.call("reserve", live_id, 16, transport=transport, writer="P-main")
    before = decode.call("pool_bits")
    stale_before = decode.call("stats")["recv"]["stale_dropped"]
    # 1. the finished transfer's id again, from other source blocks: its blocks belong to a
    #    running sequence now. 2. an id that was never reserved, aimed at the live blocks.
    ghost = {**live, "transfer_id": f"ghost-{transport}"}
    for target in (dest, ghost):
        error = send_whole(prefill, target, [20, 21, 22, 23])
        if transport == "zmq":
            assert error is None  # the frames went out; the decode rank throws them away
        else:
            assert "no longer reserved" in error
    decode.call("events", 0.8)  # past the park timeout of the ghost's frames
    np.testing.assert_array_equal(decode.call("pool_bits"), before)
    if transport == "zmq":
        assert decode.call("stats")["recv"]["stale_dropped"] >= stale_before + 6
    # The live reservation is unharmed and completes normally.
    assert send_whole(prefill, live, [4, 5, 6, 7]) is None
    assert decode.call("events")[0][:2] == ("done", live_id)
    decode.call("free", done_dst + live["ranks"][0]["block_ids"])


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_reservation_expires_and_its_late_writer_cannot_land(transport, decode, prefill):
    tid = f"expire-{transport}"
    before = decode.call("pool_bits")
    dest = decode.call("reserve", tid, 12, transport=transport, writer="P-main", timeout_s=0.3)
    events = decode.call("events", 10.0)
    assert events == [("failed", tid, "expired: the KV did not arrive in time")]
    if transport != "zmq":  # the writer is alive and silent: its blocks wait in quarantine
        assert decode.call("settle", 0.3)["coord"]["num_quarantined_blocks"] == 3
    error = send_whole(prefill, dest, [9, 10, 11])  # the writer shows up late
    assert (error is None) if transport == "zmq" else ("no longer reserved" in error)
    decode.call("settle")
    np.testing.assert_array_equal(decode.call("pool_bits"), before)


def test_the_reservation_timeout_runs_from_the_writer_start(decode, prefill):
    """Time queued for prefill does not count: a reservation older than its timeout lands
    once its writer starts (the receiver reports the start to the coordinator)."""
    tid = "late-start"
    decode.call("set_start_timeout", 60.0)
    try:
        dest = decode.call("reserve", tid, 12, transport="zmq", writer="P-main", timeout_s=2.0)
        assert decode.call("events", 3.0) == []      # 3 s queued for prefill: not expired
        assert send_whole(prefill, dest, [9, 10, 11]) is None
        (event,) = decode.call("events", 10.0)
        assert event[:2] == ("done", tid)
        decode.call("free", event[2])
    finally:
        decode.call("set_start_timeout", None)


@pytest.mark.parametrize("writer_named", [True, False], ids=["writer-named", "writer-learned"])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_killed_sender_leaks_and_corrupts_nothing(transport, writer_named, decode, prefill):
    """SIGKILL a sender mid-transfer, then report it dead. Whether the reservation named its
    writer or the ranks learned it from the data, everything is released and nothing else moves."""
    victim = Node(PrefillNode, spec=SPEC, num_blocks=NUM_BLOCKS, sender_id="victim", seed=9)
    try:
        a = decode.call("reserve", f"kill-a-{transport}-{writer_named}", 24, transport=transport,
                        writer="victim" if writer_named else None)
        b = decode.call("reserve", f"kill-b-{transport}-{writer_named}", 16, transport=transport, writer="P-main")
        a_dst, b_dst = a["ranks"][0]["block_ids"], b["ranks"][0]["block_ids"]
        victim.call("start", a, [0, 1, 2, 3, 4, 5])
        victim.call("send", a["transfer_id"], [0, 1])
        wait_sent(victim)
        assert send_whole(prefill, b, [12, 13, 14, 15]) is None
        assert decode.call("events")[0][:2] == ("done", b["transfer_id"])
        before = decode.call("pool_bits")
        victim.signal(signal.SIGKILL)
        victim.proc.join(10)
        decode.call("peer_dead", "victim")
        assert decode.call("events") == [("failed", a["transfer_id"], "prefill worker victim died")]
        stats = decode.call("settle")["coord"]
        assert stats["num_quarantined"] == 0
        assert stats["num_free_blocks"] == NUM_BLOCKS - len(b_dst)
        after = decode.call("pool_bits")
        others = [i for i in range(NUM_BLOCKS) if i not in a_dst]
        np.testing.assert_array_equal(after[:, :, others], before[:, :, others])
        np.testing.assert_array_equal(after[:, :, b_dst], bits(PREFILL_KV[:, :, [12, 13, 14, 15]]))
        decode.call("free", b_dst)
    finally:
        victim.kill()


def test_malformed_messages_change_nothing(decode):
    dest = decode.call("reserve", "hostile", 8, transport="zmq")
    blocks = dest["ranks"][0]["block_ids"]
    outside = next(b for b in range(NUM_BLOCKS) if b not in blocks)
    before = decode.call("pool_bits")
    dropped = decode.call("stats")["recv"]["malformed_dropped"]
    frame = bytes(4 * 2 * 8 * 2)  # one block of one layer's K (or V) on this rank
    header = dict(x="hostile", s="rogue", p=0, pt=1, l=0, h=[0, 2])
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(dest["ranks"][0]["endpoint"])
    try:
        for parts in ([b"\xc1 not msgpack"],
                      [pack("kv", **header, segs=[[[outside, 1]]]), frame, frame],  # not its block
                      [pack("kv", **header, segs=[[[blocks[0], 1]]]), frame[:10], frame],  # short frame
                      [pack("kv", **{**header, "l": 3}, segs=[[[blocks[0], 1]]]), frame, frame],  # no layer 3
                      [pack("kv", **{**header, "pt": 3}, segs=[[[blocks[0], 1]]]), frame, frame]):  # bad TP
            sock.send_multipart(parts)
        for _ in range(1000):
            if decode.call("stats")["recv"]["malformed_dropped"] == dropped + 5:
                break
            time.sleep(0.01)
        assert decode.call("stats")["recv"]["malformed_dropped"] == dropped + 5
    finally:
        sock.close(linger=0)
    np.testing.assert_array_equal(decode.call("pool_bits"), before)
    assert decode.call("abort", "hostile")


def test_auto_negotiation_picks_the_fastest_common_transport(decode, prefill, run_dir):
    prefill_caps = prefill.call("capabilities")
    full = decode.call("wait_ready")["capabilities"]
    nowhere = f"ipc://{run_dir}/nobody-listens"
    shm_only = decode.call("describe_variant", "shm", False, f"ipc://{run_dir}/v1", nowhere)
    heap = decode.call("describe_variant", "heap", False, f"ipc://{run_dir}/v2", nowhere)
    # On one host with CPU pools, writing in place through /dev/shm beats NIXL over UCX.
    assert choose_transport(prefill_caps, full)[0] == "shm"
    if nixl_available():
        assert "nixl" in full["transports"]
        assert choose_transport(prefill_caps, full, "nixl")[0] == "nixl"
    assert choose_transport(prefill_caps, shm_only)[0] == "shm"
    assert choose_transport(prefill_caps, heap)[0] == "zmq"
    with pytest.raises(ValueError, match="cannot be used"):
        choose_transport(prefill_caps, heap, "shm")


def test_stalled_receiver_keeps_memory_bounded(run_dir):
    """A stopped decode process makes the sender wait; nothing buffers the whole transfer."""
    spec = dict(num_layers=4, num_kv_heads=2, head_dim=64, block_size=16, dtype="float32")
    num_blocks, message, hwm, sockbuf = 1024, 256 << 10, 2, 1 << 20  # 64 MiB of KV
    total = num_blocks * KVSpec(**spec).block_bytes()
    in_flight = 2 * hwm * message + 2 * sockbuf  # both queues full, both kernel buffers full
    decode = Node(DecodeNode, spec=spec, num_blocks=num_blocks, endpoint=f"ipc://{run_dir}/slow",
                  ctrl=f"ipc://{run_dir}/slow-ctrl",
                  receiver_config={"rcvhwm": hwm, "socket_buffer_bytes": sockbuf})
    prefill = Node(PrefillNode, spec=spec, num_blocks=num_blocks, sender_id="P-slow",
                   sender_config={"max_message_bytes": message, "sndhwm": hwm, "socket_buffer_bytes": sockbuf})
    try:
        decode.call("wait_ready")
        decode.call("reset_peak_rss")
        base_rss_kb = decode.call("peak_rss_kb")
        dest = decode.call("reserve", "slow", num_blocks * 16)
        decode.signal(signal.SIGSTOP)
        prefill.call("start", dest, list(range(num_blocks)))
        prefill.call("send", "slow")
        prefill.call("finish", "slow")
        sent = -1
        for _ in range(100):  # until the sender stalls
            time.sleep(0.2)
            sent, previous = prefill.call("stats")["bytes_sent"], sent
            if sent == previous:
                break
        assert 0 < sent <= in_flight, f"{sent} bytes left the sender while the receiver was stopped"
        decode.signal(signal.SIGCONT)
        assert prefill.call("wait", "slow") is None
        assert decode.call("events")[0][:2] == ("done", "slow")
        growth = (decode.call("peak_rss_kb") - base_rss_kb) * 1024
        assert growth < in_flight + (8 << 20), f"the receiver grew by {growth} bytes for a {total}-byte transfer"
        dst = dest["ranks"][0]["block_ids"]
        assert decode.call("blocks_digest", dst) == prefill.call("blocks_digest", list(range(num_blocks)))
    finally:
        prefill.close()
        decode.kill()
