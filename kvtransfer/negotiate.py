"""Which KV transport a (prefill, decode) pair uses, from what each side advertises.

Each side advertises a small dict (``capabilities``)::

    {"transports": ["zmq", "shm", "nixl"], "host": str, "boot_id": str, "shm_id": str, "node_id": str}

``shm_id`` identifies the /dev/shm mount (device and inode), so two processes agree on it only
when they see the same shared-memory files. ``node_id`` is the cluster manager's name for the
node (``$PDSERVE_NODE_ID``, set by the Ray launcher to the Ray node id; empty otherwise): two
workers that a cluster manager placed on different nodes never count as one host, even when
those nodes share a kernel (several raylets on one machine, containers on one VM). Torch-free: the router negotiates at registration.
"""
from __future__ import annotations

import logging
import os
import socket
from typing import Sequence

from kvtransfer.transport import TRANSPORTS

logger = logging.getLogger(__name__)

# Fastest first. A decode pool in CPU memory on the same host is fastest written in place
# through /dev/shm (measured: bench/kv_transfer_bw.py, shm about 2x NIXL over UCX on one host);
# a GPU pool never advertises shm, so GPU pairs and pairs across hosts get NIXL.
PREFERENCE = ("shm", "nixl", "zmq")
SHM_DIR = "/dev/shm"
NODE_ID_ENV = "PDSERVE_NODE_ID"


def host_identity() -> dict:
    """Hostname, kernel boot id, /dev/shm mount id and cluster node id of this process."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot_id = f.read().strip()
    except OSError:
        boot_id = ""
    try:
        st = os.stat(SHM_DIR)
        shm_id = f"{st.st_dev}:{st.st_ino}"
    except OSError:
        shm_id = ""
    return {"host": socket.gethostname(), "boot_id": boot_id, "shm_id": shm_id,
            "node_id": os.environ.get(NODE_ID_ENV, "")}


def capabilities(transports: Sequence[str]) -> dict:
    """This process's advertisement: the transports it can run, and where it runs."""
    unknown = set(transports) - set(TRANSPORTS)
    if unknown or "zmq" not in transports:
        raise ValueError(f"transports must include zmq and only name {TRANSPORTS}, got {list(transports)}")
    return {"transports": [t for t in PREFERENCE if t in transports], **host_identity()}


def same_host(a: dict, b: dict) -> bool:
    """Both sides run on one booted host, see one /dev/shm, and are on one cluster node."""
    keys = ("host", "boot_id", "shm_id")
    return all(a.get(k) and a.get(k) == b.get(k) for k in keys) and \
        a.get("node_id", "") == b.get("node_id", "")


def choose_transport(prefill: dict, decode: dict, requested: str = "auto") -> tuple[str, str]:
    """Pick the transport for one pair: ``(name, reason)``.

    ``auto`` takes the fastest both support (shm > nixl > zmq), shm only on one host. A named
    transport must be supported by both. Raises ValueError saying what to change.
    """
    for side, caps in (("prefill", prefill), ("decode", decode)):
        if not isinstance(caps, dict) or not isinstance(caps.get("transports"), list):
            raise ValueError(f"the {side} worker's KV capabilities are missing or malformed")
    if requested != "auto" and requested not in TRANSPORTS:
        raise ValueError(f"unknown KV transport {requested!r}; use auto, {', '.join(TRANSPORTS)}")
    local = same_host(prefill, decode)
    usable = [t for t in PREFERENCE
              if t in prefill["transports"] and t in decode["transports"] and (t != "shm" or local)]
    if requested != "auto":
        if requested not in usable:
            if requested in prefill["transports"] and requested in decode["transports"]:
                why = "the workers are not on one host sharing /dev/shm"
            else:
                why = f"prefill supports {prefill['transports']}, decode supports {decode['transports']}"
            raise ValueError(f"KV transport {requested} cannot be used: {why}; use --kv-transport auto")
        return requested, "requested"
    choice = usable[0] if usable else "zmq"
    reason = f"fastest supported by both ({'same host' if local else 'different hosts'})"
    logger.info("KV transport %s chosen: %s", choice, reason)
    return choice, reason
