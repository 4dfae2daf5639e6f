"""Command-line options of a worker (``pdserve worker``), shared by the launcher and the CLI.

A role's entry point (``prefill.worker.main(args)`` / ``decode.worker.main(args)``) receives the
``argparse.Namespace`` these options produce:

    role            prefill | decode | both
    router          the router's worker endpoint (its --backend)
    model           a known model name, a .gguf file or a checkpoint directory (None: the
                    default model); resolved by ``models.registry.resolve_model``
    tp              tensor-parallel degree (the worker spawns its own TP ranks)
    dtype           auto | float32 | bfloat16 | float16 (weights and KV)
    device          cpu | cuda
    max_model_len   cap on prompt + output tokens (None: the model's limit)
    block_size      tokens per KV block
    num_kv_blocks   KV pool size in blocks, or
    kv_memory       KV pool size in bytes per rank (parsed from e.g. "2GiB")
    kv_transport    auto | zmq | shm | nixl
    worker_id       unique id (None: made from role, host and pid)
    curve_dir       CurveZMQ key directory (``pdserve keys``)
    max_num_seqs, max_num_batched_tokens, heartbeat_s, kv_dir: engine and link tuning
    kv_host         decode: tcp address to receive KV on (other hosts); None: ipc:// in kv_dir
"""
from __future__ import annotations

import argparse
import math
import re

from kvtransfer.spec import TRANSPORT_CHOICES
from router.protocol import ROLES

DTYPES = ("auto", "float32", "bfloat16", "float16")
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 1000**2,
          "mib": 1 << 20, "g": 1 << 30, "gb": 1000**3, "gib": 1 << 30, "t": 1 << 40, "tb": 1000**4,
          "tib": 1 << 40}


def parse_bytes(text: str) -> int:
    """``"2GiB"``, ``"512MB"``, ``"1e9"`` or ``"4096"`` -> bytes. Raises ValueError."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"{text!r} is not a size; write e.g. 2GiB, 512MiB or a number of bytes")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"{text!r} must be a positive size")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _size(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive finite number")
    return value


def _model_help() -> str:
    from models.registry import DEFAULT_MODEL, MODEL_NAMES

    names = "; ".join(f"{name}{' (the default)' if name == DEFAULT_MODEL else ''}: {what}"
                      for name, what in MODEL_NAMES.items())
    return (f"what to serve: a known name ({names}), a .gguf file or a directory holding one, "
            "or a Hugging Face checkpoint directory (config.json and safetensors). Downloads "
            "and conversions are cached in $PDSERVE_CACHE (default ~/.cache/pdserve)")


MODEL_HELP = _model_help()


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Options that shape a worker's engine (shared by ``serve`` and ``worker``)."""
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    parser.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel degree per worker")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="weights and KV dtype")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--max-model-len", type=positive_int, default=None,
                        help="max prompt + output tokens (default: the model's)")
    parser.add_argument("--block-size", type=positive_int, default=16, help="tokens per KV block")
    pool = parser.add_mutually_exclusive_group()
    pool.add_argument("--num-kv-blocks", type=positive_int, default=None, help="KV pool size in blocks")
    pool.add_argument("--kv-memory", type=_size, default=None,
                      help="KV pool size per rank, e.g. 2GiB (default: the engine's choice)")
    parser.add_argument("--kv-transport", choices=TRANSPORT_CHOICES, default="auto",
                        help="how KV moves from prefill to decode")
    parser.add_argument("--max-num-seqs", type=positive_int, default=None,
                        help="max sequences a decode step runs")
    parser.add_argument("--max-num-batched-tokens", type=positive_int, default=None,
                        help="token budget of one prefill step")
    parser.add_argument("--curve-dir", default=None, help="CurveZMQ key directory (pdserve keys)")
    parser.add_argument("--enforce-eager", action="store_true", default=None,
                        help="run every step eagerly, never compiled (also PDSERVE_ENFORCE_EAGER=1)")


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """Every option of ``pdserve worker``."""
    parser.add_argument("--role", choices=ROLES, required=True, help="what this worker does")
    parser.add_argument("--router", required=True,
                        help="the router's worker endpoint (its --backend), e.g. ipc:///tmp/x/workers.ipc")
    add_engine_arguments(parser)
    parser.add_argument("--worker-id", default=None, help="unique worker id (default: role-host-pid)")
    parser.add_argument("--heartbeat-s", type=positive_float, default=None,
                        help="seconds between heartbeats to the router")
    parser.add_argument("--kv-dir", default=None, help="directory for ipc:// KV endpoints")
    parser.add_argument("--tp-rank", type=positive_int, default=None,
                        help="run only this TP rank (1..TP-1) of a worker whose rank 0 runs elsewhere "
                             "and whose ranks meet at $PDSERVE_TP_INIT (set by the Ray launcher)")
    parser.add_argument("--kv-host", default=None,
                        help="decode: receive KV over tcp on this address (prefill workers on other "
                             "hosts connect there) instead of ipc://")


def engine_argv(args: argparse.Namespace) -> list[str]:
    """The engine options of ``args`` as command-line arguments for a worker process."""
    argv: list[str] = []
    for name in ("model", "tp", "dtype", "device", "max_model_len", "block_size", "num_kv_blocks",
                 "kv_memory", "kv_transport", "max_num_seqs", "max_num_batched_tokens", "curve_dir"):
        value = getattr(args, name, None)
        if value is not None:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    if getattr(args, "enforce_eager", None):
        argv.append("--enforce-eager")
    return argv


def worker_main(args: argparse.Namespace) -> int:
    """``pdserve worker``: run this process as a worker of ``args.role`` (imports the engine,
    and torch, only here)."""
    import sys

    from worker.options import WorkerOptions
    from worker.process import EXIT_CONFIG

    try:
        WorkerOptions.from_args(args)  # a bad option or --model is a configuration error
    except ValueError as exc:
        print(f"pdserve worker: {exc}\n", end="", file=sys.stderr, flush=True)  # one write
        return EXIT_CONFIG
    if getattr(args, "tp_rank", None) is not None:
        return _rank_main(args)
    if args.role == "prefill":
        from prefill.worker import main
    else:
        from decode.worker import main
    return main(args)


def _rank_main(args: argparse.Namespace) -> int:
    """``pdserve worker --tp-rank R``: one TP rank started by a cluster manager."""
    import dataclasses
    import os

    from worker.options import WorkerOptions
    from worker.tp_group import TP_INIT_ENV, run_rank

    if args.role == "prefill":
        from prefill.worker import rank_main
    else:
        from decode.worker import rank_main
    opts = WorkerOptions.from_args(args)
    if not args.tp_rank < opts.tp or not os.environ.get(TP_INIT_ENV):
        raise ValueError(f"--tp-rank must be in [1, {opts.tp - 1}] and ${TP_INIT_ENV} must name the "
                         "group's rendezvous")
    run_rank(rank_main, args.tp_rank, opts.tp, os.environ[TP_INIT_ENV], dataclasses.asdict(opts))
    return 0
