"""Building one rank's model shard and KV pool, and the worker's registration info."""
from __future__ import annotations

import os
import socket

from kvtransfer.negotiate import NODE_ID_ENV
from models.parallel import ParallelContext
from worker.options import WorkerOptions

EAGER_ENV = "PDSERVE_ENFORCE_EAGER"


def build_runner(opts: WorkerOptions, ctx: ParallelContext):
    """This rank's model shard and KV pool. A CPU decode pool lives in shared memory so a
    prefill worker on this host can write straight into it."""
    import torch

    from models.compiled import buckets_up_to
    from models.runner import ModelRunner

    device = opts.device
    if device == "cuda" and ctx.world_size > 1:
        device = f"cuda:{torch.cuda.current_device()}"
    on_cuda = str(device).startswith("cuda")
    backend = "cuda" if on_cuda else ("shm" if opts.role == "decode" else "heap")
    torch.set_num_threads(num_threads(opts))
    # Compiled graphs serve decode-only steps, which a prefill worker never runs.
    eager = opts.enforce_eager or os.environ.get(EAGER_ENV) == "1" or opts.role == "prefill"
    return ModelRunner(opts.model, dtype=opts.dtype, device=device, tp=ctx,
                       block_size=opts.block_size, num_blocks=opts.num_kv_blocks,
                       kv_budget_bytes=opts.kv_memory, pool_backend=backend,
                       max_model_len=opts.max_model_len,
                       enforce_eager=eager, compile_buckets=buckets_up_to(opts.max_num_seqs))


def num_threads(opts: WorkerOptions) -> int:
    """Threads for this rank's matmuls. The launcher knows how many worker processes share
    the host and says so in PDSERVE_NUM_THREADS; oversubscribed cores make small ops crawl."""
    value = os.environ.get("PDSERVE_NUM_THREADS")
    if value:
        try:
            return max(1, int(value))
        except ValueError:
            raise ValueError(f"PDSERVE_NUM_THREADS must be an integer, got {value!r}") from None
    return max(1, (os.cpu_count() or 1) // opts.tp)


def restrict(capabilities: dict, kv_transport: str) -> dict:
    """Advertise only the transport the operator asked for (``auto``: everything)."""
    if kv_transport == "auto":
        return capabilities
    return {**capabilities, "transports": [t for t in capabilities["transports"] if t == kv_transport]}


def worker_info(opts: WorkerOptions, runner, transports: dict) -> dict:
    """``Register.info`` (see ``router.protocol.Register``)."""
    from models.config import model_fingerprint

    return {
        "role": opts.role,
        "tp_size": opts.tp,
        "kv_spec": runner.kv_spec.to_dict(),
        "fingerprint": model_fingerprint(opts.model),
        "model": os.path.basename(os.path.normpath(opts.model)),
        "model_dir": str(opts.model),
        "transports": transports,
        "max_model_len": runner.max_model_len,
        "num_blocks": runner.num_blocks,
        "block_size": runner.block_size,
        "vocab_size": runner.config.vocab_size,
        "eos_token_ids": list(runner.config.eos_token_ids),
        "pid": os.getpid(),
        "host": socket.gethostname(),
        # The cluster manager's node (set by the Ray launcher), else this host.
        "node": os.environ.get(NODE_ID_ENV) or socket.gethostname(),
    }
