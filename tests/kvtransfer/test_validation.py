"""Bad input to the public API fails at once with an error that says what to change."""
from __future__ import annotations

import shutil
import tempfile

import pytest

from kvtransfer.allocator import BlockAllocator
from kvtransfer.coordinator import KVCoordinator
from kvtransfer.pool import KVPool
from kvtransfer.receiver import KVReceiver, ReceiverConfig
from kvtransfer.sender import KVSender, SenderConfig
from kvtransfer.shm_transport import shm_pool_files
from kvtransfer.spec import KVSpec
from kvtransfer.transport import Destination

SPEC = KVSpec(num_layers=2, num_kv_heads=2, head_dim=4, block_size=4, dtype="float32")


def dest(**overrides):
    base = {"transport": "zmq", "transfer_id": "t", "ttl_s": 5.0,
            "ranks": [{"endpoint": "ipc:///nowhere", "block_ids": [1, 2], "num_blocks": 8}]}
    return {**base, **overrides}


@pytest.mark.parametrize("bad, message", [
    ([], "must be a dict"),
    (dest(transport="rdma"), "transport 'rdma'"),
    (dest(transfer_id=""), "non-empty string transfer_id"),
    (dest(ttl_s=0), "ttl_s must be a positive number"),
    (dest(ranks=[]), "non-empty list of ranks"),
    (dest(ranks=[{"endpoint": "x", "block_ids": [9], "num_blocks": 8}]), "block ids below 8"),
    (dest(ranks=[{"endpoint": "x", "block_ids": [1], "num_blocks": 0}]), "positive num_blocks"),
    (dest(transport="shm"), "needs 'shm_path'"),
    (dest(ranks=[{"endpoint": "x", "block_ids": [1], "num_blocks": 8},
                 {"endpoint": "y", "block_ids": [2], "num_blocks": 8}]), "share one block table"),
])
def test_bad_destinations(bad, message):
    with pytest.raises(ValueError, match=message):
        Destination.parse(bad)


@pytest.fixture
def run_dir():
    path = tempfile.mkdtemp(prefix="kvv-")  # short: ipc paths are limited to ~100 characters
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sender():
    s = KVSender(KVPool(SPEC, 8), sender_id="P")
    yield s
    s.close()


def test_sender_refuses_what_does_not_fit(sender):
    with pytest.raises(ValueError, match="3 source blocks for a destination of 2"):
        sender.start(dest(), [0, 1, 2])
    with pytest.raises(ValueError, match="0 source blocks"):
        sender.start(dest(), [])
    with pytest.raises(ValueError, match="must be below 8"):
        sender.start(dest(), [0, 8])
    with pytest.raises(ValueError, match="do not fill exactly 2 blocks"):
        sender.start(dest(), [0, 1], num_tokens=3)
    with pytest.raises(ValueError, match="TP=3 is not a multiple of the 2 kv heads"):
        sender.start(dest(ranks=[{"endpoint": "x", "block_ids": [1], "num_blocks": 8}] * 3), [0])
    transfer = sender.start(dest(), [0, 1], num_tokens=6)
    with pytest.raises(ValueError, match="already being sent"):
        sender.start(dest(), [0, 1])
    with pytest.raises(ValueError, match="outside the model's 2 layers"):
        transfer.send_layer(2)
    with pytest.raises(ValueError, match="past the transfer's 6 tokens"):
        transfer.send_layer(0, 0, 7)
    transfer.abort()
    transfer.send_layer(0)  # ignored after abort
    with pytest.raises(Exception, match="aborted"):
        transfer.wait(10)


def test_bad_configs_and_ranks():
    with pytest.raises(ValueError, match="SenderConfig.sndhwm"):
        SenderConfig(sndhwm=0)
    with pytest.raises(ValueError, match="ReceiverConfig timeouts"):
        ReceiverConfig(park_timeout_s=0)
    with pytest.raises(ValueError, match="rank 2 is outside a TP group of 2"):
        KVSender(KVPool(SPEC, 8), sender_id="P", rank=2, tp_size=2)
    with pytest.raises(ValueError, match="sender_id must name"):
        KVSender(KVPool(SPEC, 8), sender_id="")


def test_coordinator_and_receiver_setup_errors(run_dir):
    with pytest.raises(ValueError, match="cannot bind"):
        KVCoordinator(BlockAllocator(8, 4), endpoint="tcp://256.0.0.1:1")
    coord = KVCoordinator(BlockAllocator(8, 4), endpoint=f"ipc://{run_dir}/c", tp_size=2)
    try:
        with pytest.raises(RuntimeError, match="wait_ready"):
            coord.reserve("t", 4)
        receiver = KVReceiver(KVPool(SPEC, 8), endpoint="tcp://127.0.0.1:*", coordinator=coord.endpoint,
                              rank=0, tp_size=2)
        try:
            assert receiver.describe()["endpoint"].startswith("tcp://127.0.0.1:")
            with pytest.raises(TimeoutError, match=r"decode ranks \[1\] did not register"):
                coord.wait_ready(0.5)
            with pytest.raises(ValueError, match="cannot bind"):  # the port is taken
                KVReceiver(KVPool(SPEC, 8), endpoint=receiver.describe()["endpoint"], coordinator=coord.endpoint)
            with pytest.raises(ValueError, match="backend='shm'"):
                shm_pool_files(KVPool(SPEC, 8))
        finally:
            receiver.close()
    finally:
        coord.close()


def test_a_rank_with_a_differently_sized_pool_is_refused(run_dir):
    coord = KVCoordinator(BlockAllocator(8, 4), endpoint=f"ipc://{run_dir}/c")
    receiver = KVReceiver(KVPool(SPEC, 6), endpoint=f"ipc://{run_dir}/r", coordinator=coord.endpoint)
    try:
        with pytest.raises(ValueError, match="pool has 6 blocks but the allocator hands out 8"):
            coord.wait_ready(10)
    finally:
        receiver.close()
        coord.close()


def test_unsupported_transport_is_refused_at_reserve(run_dir):
    coord = KVCoordinator(BlockAllocator(8, 4), endpoint=f"ipc://{run_dir}/c")
    receiver = KVReceiver(KVPool(SPEC, 8), endpoint=f"ipc://{run_dir}/r", coordinator=coord.endpoint)
    try:
        coord.wait_ready(10)
        with pytest.raises(ValueError, match=r"not accepted by every decode rank \(they accept \['zmq'\]\)"):
            coord.reserve("t", 4, transport="shm")
        assert coord.stats()["num_free_blocks"] == 8
    finally:
        receiver.close()
        coord.close()
