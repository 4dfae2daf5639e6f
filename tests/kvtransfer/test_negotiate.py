"""Transport choice from both sides' advertisements (torch-free, exact)."""
from __future__ import annotations

import pytest

from kvtransfer.negotiate import capabilities, choose_transport

HOST = {"host": "h", "boot_id": "b", "shm_id": "1:2"}


def caps(*transports, **where):
    return {"transports": list(transports), **HOST, **where}


def test_auto_prefers_shm_then_nixl_then_zmq():
    assert choose_transport(caps("zmq", "shm", "nixl"), caps("zmq", "shm", "nixl"))[0] == "shm"
    assert choose_transport(caps("zmq", "shm", "nixl"), caps("zmq", "nixl"))[0] == "nixl"
    assert choose_transport(caps("zmq", "shm", "nixl"), caps("zmq", "shm"))[0] == "shm"
    assert choose_transport(caps("zmq", "shm"), caps("zmq", "nixl"))[0] == "zmq"


def test_shm_needs_one_host_and_one_dev_shm():
    for other in ({"host": "other"}, {"boot_id": "rebooted"}, {"shm_id": "9:9"}, {"shm_id": ""}):
        assert choose_transport(caps("zmq", "shm"), caps("zmq", "shm", **other))[0] == "zmq"
        with pytest.raises(ValueError, match="not on one host sharing /dev/shm"):
            choose_transport(caps("zmq", "shm"), caps("zmq", "shm", **other), "shm")
    # nixl works across hosts
    assert choose_transport(caps("zmq", "nixl"), caps("zmq", "nixl", host="other"))[0] == "nixl"


def test_shm_needs_one_cluster_node():
    """Two Ray nodes on one machine share host, boot id and /dev/shm, but not the node id."""
    assert choose_transport(caps("zmq", "shm", node_id="n1"), caps("zmq", "shm", node_id="n1"))[0] == "shm"
    assert choose_transport(caps("zmq", "shm", node_id="n1"), caps("zmq", "shm", node_id="n2"))[0] == "zmq"
    assert choose_transport(caps("zmq", "shm", node_id="n1"), caps("zmq", "shm"))[0] == "zmq"
    with pytest.raises(ValueError, match="not on one host"):
        choose_transport(caps("zmq", "shm", node_id="n1"), caps("zmq", "shm", node_id="n2"), "shm")


def test_requested_transport_must_be_supported_by_both():
    assert choose_transport(caps("zmq", "shm", "nixl"), caps("zmq", "shm", "nixl"), "zmq") == ("zmq", "requested")
    with pytest.raises(ValueError, match="decode supports"):
        choose_transport(caps("zmq", "nixl"), caps("zmq"), "nixl")
    with pytest.raises(ValueError, match="unknown KV transport"):
        choose_transport(caps("zmq"), caps("zmq"), "rdma")
    with pytest.raises(ValueError, match="capabilities are missing"):
        choose_transport({}, caps("zmq"))


def test_capabilities_of_this_process():
    mine = capabilities(["shm", "zmq"])
    assert mine["transports"] == ["shm", "zmq"] and mine["host"] and mine["shm_id"]
    with pytest.raises(ValueError, match="must include zmq"):
        capabilities(["shm"])
