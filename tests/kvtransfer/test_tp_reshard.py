"""TP re-sharding between real processes: every rank its own process and pool.

Prefill groups of TP=1 and TP=2 send into decode groups of TP=1 and TP=2 over each transport;
every decode rank must hold exactly its kv-head shard of the prefill KV in the reserved blocks,
and no other block may change. Decode rank 0's coordinator reports one completion per transfer,
only after every decode rank's part landed.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import pytest

from kvtransfer.nixl_transport import nixl_available
from kvtransfer.spec import KVSpec
from tests.kvtransfer.nodes import (SHM_PREFIX, DecodeNode, Node, PrefillNode, bits, global_kv,
                                    remove_shm_files, shard)

pytestmark = pytest.mark.slow

SPEC = dict(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype="bfloat16")
NUM_BLOCKS = 24
PREFILL_KV = global_kv(KVSpec(**SPEC), NUM_BLOCKS, seed=5)
TRANSPORTS = ["zmq", "shm", pytest.param("nixl", marks=pytest.mark.skipif(
    not nixl_available(), reason="nixl is not installed"))]


@pytest.fixture(scope="module")
def groups():
    """Prefill groups {tp: [rank nodes]} and decode groups {tp: [rank nodes]}."""
    run_dir = tempfile.mkdtemp(prefix="kvtp-")
    tag = os.path.basename(run_dir)
    nodes = []
    try:
        decode = {}
        for tp in (1, 2):
            decode[tp] = []
            for rank in range(tp):
                decode[tp].append(Node(
                    DecodeNode, spec=SPEC, num_blocks=NUM_BLOCKS, rank=rank, tp_size=tp, seed=10 + tp,
                    endpoint=f"ipc://{run_dir}/d{tp}-{rank}", ctrl=f"ipc://{run_dir}/ctrl{tp}",
                    backend="shm", nixl=nixl_available(), shm_path=f"{SHM_PREFIX}{tag}-d{tp}-{rank}"))
                nodes.append(decode[tp][-1])
            decode[tp][0].call("wait_ready")
        prefill = {}
        for tp in (1, 2):
            prefill[tp] = [Node(PrefillNode, spec=SPEC, num_blocks=NUM_BLOCKS, sender_id=f"P-tp{tp}",
                                rank=rank, tp_size=tp, seed=5) for rank in range(tp)]
            nodes += prefill[tp]
        yield prefill, decode
    finally:
        for node in nodes:
            node.close()
        shutil.rmtree(run_dir, ignore_errors=True)
        remove_shm_files(tag)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("p_tp,d_tp", [(2, 1), (1, 2), (2, 2)])
def test_kv_heads_reshard_bit_exact(transport, p_tp, d_tp, groups):
    prefill, decode = groups[0][p_tp], groups[1][d_tp]
    tid = f"tp{p_tp}to{d_tp}-{transport}"
    decode[0].call("order_free_list", [9, 3, 4, 5, 17, 0])
    before = [d.call("pool_bits") for d in decode]
    dest = decode[0].call("reserve", tid, 22, transport=transport, writer=f"P-tp{p_tp}")
    dst = dest["ranks"][0]["block_ids"]
    assert dst == [9, 3, 4, 5, 17, 0] and all(r["block_ids"] == dst for r in dest["ranks"])
    src = [1, 2, 14, 15, 16, 7]
    for rank, node in enumerate(prefill):  # every rank of a TP group runs the same steps
        node.call("start", dest, src, 22)
        node.call("send", tid)
        node.call("finish", tid, 21 + rank, -1.5)  # rank 0's token is the group's
    assert [node.call("wait", tid) for node in prefill] == [None] * p_tp
    assert decode[0].call("events") == [("done", tid, dst, 21, -1.5)]
    spec = KVSpec(**SPEC)
    for rank, node in enumerate(decode):
        expected = before[rank].copy()
        expected[:, :, dst] = bits(shard(PREFILL_KV, spec, d_tp, rank)[:, :, src])
        np.testing.assert_array_equal(node.call("pool_bits"), expected)
    decode[0].call("free", dst)
    stats = decode[0].call("settle")["coord"]
    assert stats["num_free_blocks"] == NUM_BLOCKS and stats["num_live"] == 0


def test_completion_waits_for_every_decode_rank(groups):
    """A prefill TP=2 group where only rank 0 finishes: the decode group must not complete."""
    prefill, decode = groups[0][2], groups[1][2]
    tid = "partial-tp2"
    dest = decode[0].call("reserve", tid, 8, transport="zmq", writer="P-tp2")
    prefill[0].call("start", dest, [0, 1])
    prefill[0].call("send", tid)
    prefill[0].call("finish", tid)
    assert prefill[0].call("wait", tid) is None
    assert decode[0].call("events", 0.5) == []  # decode rank 1 still misses prefill rank 1's heads
    prefill[1].call("start", dest, [0, 1])
    prefill[1].call("send", tid)
    prefill[1].call("finish", tid)
    assert prefill[1].call("wait", tid) is None
    events = decode[0].call("events")
    assert events[0][:2] == ("done", tid)
    decode[0].call("free", events[0][2])
