"""Is anything listening at a router endpoint? Asked once, before a client connects.

A zmq socket connects lazily and retries forever, so a client of an endpoint nobody serves
would wait for its own timeout. One plain connect (unix or TCP) tells at once: a missing ipc
path or a refused connection means no router is there. Connecting and closing without a zmq
handshake is harmless to a router that is there. torch-free.
"""
from __future__ import annotations

import errno
import os
import socket

PROBE_TIMEOUT_S = 2.0


def why_no_listener(endpoint: str, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """None if something accepts connections at ``endpoint`` (or it cannot be probed: inproc),
    else a sentence saying what was found instead."""
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://"):]
        if path.startswith("@"):
            return None  # an abstract socket: no file to check; zmq will find out
        if not os.path.exists(path):
            return f"{path} does not exist"
        return _try(socket.AF_UNIX, path, timeout_s)
    if endpoint.startswith("tcp://"):
        host, _, port = endpoint[len("tcp://"):].rpartition(":")
        host = host.strip("[]")
        try:
            infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except (OSError, ValueError) as exc:
            return f"cannot resolve {host}:{port}: {exc}"
        why = "no address to connect to"
        for family, _, _, _, address in infos:
            why = _try(family, address, timeout_s)
            if why is None:
                return None
        return why
    return None


def _try(family: int, address, timeout_s: float) -> str | None:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        sock.connect(address)
        return None
    except socket.timeout:
        return f"no answer from {address} within {timeout_s:g}s"
    except OSError as exc:
        if exc.errno == errno.ECONNREFUSED:
            return f"the connection to {address} was refused (nothing is listening there)"
        return f"cannot connect to {address}: {exc.strerror or exc}"
    finally:
        sock.close()
