"""Where a decode worker's ranks receive KV: one ``KVReceiver`` per rank, and on rank 0 the
``KVCoordinator`` that reserves blocks, builds destinations and reports completions.

Endpoints are ipc:// paths derived from the worker id, so every rank of the group finds
rank 0's coordinator without another round of messages. With ``--kv-host`` the ranks receive KV
on ``tcp://KV_HOST:*`` (the bound port travels in each rank's destination entry), so prefill
workers on other hosts can reach them; the coordinator stays on ipc (one host per TP group).
"""
from __future__ import annotations

import hashlib
import os
import tempfile

from kvtransfer.nixl_transport import nixl_available
from kvtransfer.receiver import KVReceiver


def _endpoint(opts, name: str) -> str:
    directory = opts.kv_dir or tempfile.gettempdir()
    tag = hashlib.sha1(opts.worker_id.encode()).hexdigest()[:12]
    return f"ipc://{os.path.join(directory, f'pdkv-{tag}-{name}')}"


def coordinator_endpoint(opts) -> str:
    return _endpoint(opts, "coord")


def wants_nixl(opts) -> bool:
    return opts.kv_transport in ("auto", "nixl") and nixl_available()


def make_receiver(opts, runner, ctx) -> KVReceiver:
    """This rank's receiver, landing KV in ``runner.pool``."""
    if opts.kv_transport == "nixl" and not nixl_available():
        raise ValueError("--kv-transport nixl needs the nixl package: pip install 'pdserve[nixl]'")
    endpoint = f"tcp://{opts.kv_host}:*" if opts.kv_host else _endpoint(opts, f"kv{ctx.rank}")
    return KVReceiver(runner.pool, endpoint=endpoint,
                      coordinator=coordinator_endpoint(opts), rank=ctx.rank,
                      tp_size=ctx.world_size, nixl=wants_nixl(opts))
