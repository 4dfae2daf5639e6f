"""The ``pdserve`` command: serve, router, worker, generate, status, scale, keys, bench.

User errors print one line (``pdserve <command>: what went wrong``) and exit non-zero; no
tracebacks. Logs go to stderr (level from ``$PDSERVE_LOG``, default INFO); ``serve`` prints
exactly one line to stdout, containing ``ready`` and the client endpoint, once every worker
has registered.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from router.config import KV_TRANSPORTS, default_endpoint
from router.http.config import add_http_arguments, http_config_from_args
from router.ray_args import add_ray_arguments, ray_cluster
from router.worker_args import add_engine_arguments, add_worker_arguments, positive_float, positive_int

PROG = "pdserve"


class UserError(Exception):
    """A problem the user can fix; printed as one line."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Disaggregated prefill/decode LLM serving.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="start a router and its local workers")
    serve.add_argument("--mode", choices=("disagg", "colocated"), default="disagg")
    serve.add_argument("--prefill", type=int, default=1, help="prefill workers (disagg)")
    serve.add_argument("--decode", type=int, default=1, help="decode workers (disagg)")
    serve.add_argument("--workers", type=int, default=1, help="workers of role both (colocated)")
    serve.add_argument("--listen", default=None, help="client endpoint (default: a per-user ipc path, "
                                                      "or $PDSERVE_ENDPOINT)")
    serve.add_argument("--router-process", action="store_true",
                       help="run the router as its own process instead of a thread")
    serve.add_argument("--no-restart", action="store_true",
                       help="do not restart workers that die (or kill those declared stuck)")
    _add_liveness_arguments(serve)
    add_engine_arguments(serve)
    add_http_arguments(serve)
    add_ray_arguments(serve)

    router = sub.add_parser("router", help="start only the router; workers connect to --backend")
    router.add_argument("--listen", default=None, help="client endpoint")
    router.add_argument("--backend", default=None, help="worker endpoint")
    router.add_argument("--model", default=None,
                        help="refuse workers that serve another checkpoint (a name, .gguf or directory)")
    router.add_argument("--kv-transport", choices=KV_TRANSPORTS, default="auto")
    router.add_argument("--curve-dir", default=None, help="CurveZMQ key directory (pdserve keys)")
    _add_liveness_arguments(router)
    router.add_argument("--shutdown-workers", action="store_true",
                        help="tell registered workers to shut down when the router stops")
    add_http_arguments(router)

    worker = sub.add_parser("worker", help="start one worker and register it with a router")
    add_worker_arguments(worker)

    gen = sub.add_parser("generate", help="stream a completion to the terminal")
    gen.add_argument("prompt", nargs="?", default=None, help="prompt text")
    gen.add_argument("--chat", default=None, metavar="MESSAGE",
                     help="a user message, answered through the model's chat template")
    gen.add_argument("--system", default=None, help="a system message before --chat")
    gen.add_argument("--prompt-token-ids", default=None, help="comma-separated token ids instead of text")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    gen.add_argument("--stop-token-ids", default=None, help="comma-separated token ids")
    gen.add_argument("--ignore-eos", action="store_true")
    _add_client_arguments(gen)

    status = sub.add_parser("status", help="show the router's workers and load")
    _add_client_arguments(status)

    scale = sub.add_parser("scale", help="add or drain workers of a running pdserve serve cluster")
    scale.add_argument("--prefill", type=int, default=None, help="prefill workers wanted")
    scale.add_argument("--decode", type=int, default=None, help="decode workers wanted")
    _add_client_arguments(scale)

    keys = sub.add_parser("keys", help="generate CurveZMQ keys for router, workers and clients")
    keys.add_argument("dir", help="directory to write the keys to")

    sub.add_parser("bench", help="load-test a server (pdserve bench --help)", add_help=False)
    return parser


def _add_liveness_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--heartbeat-timeout", type=positive_float, default=5.0,
                        help="seconds of worker silence before it is declared dead")
    parser.add_argument("--stuck-timeout", type=positive_float, default=10.0,
                        help="seconds past its slowest step that a worker with work may go without "
                             "completing a step before it is declared dead")
    parser.add_argument("--max-queue", type=positive_int, default=1024, help="waiting requests before 'overloaded'")
    parser.add_argument("--unavailable-timeout", type=positive_float, default=30.0,
                        help="seconds a request waits for a missing worker role (for example "
                             "while the only decode worker restarts)")
    parser.add_argument("--handoff-timeout", type=positive_float, default=30.0,
                        help="seconds before a lost Allocate or KV hand-off is retried")
    parser.add_argument("--prefill-stall-timeout", type=positive_float, default=120.0,
                        help="seconds a prefill worker may hold requests without any first token")


def _router_options(args) -> dict:
    """The router's queue and liveness settings (``RouterConfig`` fields) from the flags
    ``_add_liveness_arguments`` adds."""
    return {"max_queue": args.max_queue, "heartbeat_timeout_s": args.heartbeat_timeout,
            "stuck_timeout_s": args.stuck_timeout, "unavailable_timeout_s": args.unavailable_timeout,
            "handoff_timeout_s": args.handoff_timeout,
            "prefill_stall_timeout_s": args.prefill_stall_timeout}


def _add_client_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoint", default=None, help="router client endpoint (default: the "
                                                         "per-user one, or $PDSERVE_ENDPOINT)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the router")
    parser.add_argument("--curve-dir", default=None, help="CurveZMQ key directory (pdserve keys)")


def _token_ids(text: str | None, option: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"{option} must be comma-separated integers, got {text!r}") from None


# -- commands -----------------------------------------------------------------------------------
def cmd_serve(args) -> int:
    from router.launcher import LocalCluster

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    engine = {name: getattr(args, name) for name in (
        "model", "tp", "dtype", "device", "max_model_len", "block_size", "num_kv_blocks", "kv_memory",
        "kv_transport", "max_num_seqs", "max_num_batched_tokens", "enforce_eager")}
    router_options = _router_options(args)
    if args.launcher == "ray":  # Ray restarts the workers: no local supervisor
        cluster = ray_cluster(args, engine, http_config_from_args(args), router_options)
    else:
        cluster = LocalCluster(mode=args.mode, num_prefill=args.prefill, num_decode=args.decode,
                               num_workers=args.workers, listen=args.listen or default_endpoint("client"),
                               curve_dir=args.curve_dir, router_in_process=not args.router_process,
                               log_to_stderr=True, http=http_config_from_args(args),
                               supervise=not args.no_restart, router_options=router_options,
                               drain_timeout_s=args.drain_timeout, **engine)
    with cluster:
        layout = (f"{args.prefill} prefill + {args.decode} decode" if args.mode == "disagg"
                  else f"{args.workers} colocated")
        http = f", http {cluster.http_url}" if cluster.http_url else ""
        where = " on Ray" if args.launcher == "ray" else ""
        print(f"pdserve ready: {cluster.endpoint}{http} ({layout} workers{where}, TP {args.tp})", flush=True)
        while not stop.wait(0.5):
            pass
        logging.getLogger("pdserve").info("stopping")
    return 0


def cmd_router(args) -> int:
    from router.config import RouterConfig
    from router.runtime import run_router

    from models.registry import resolve_model

    model_dir = str(resolve_model(args.model)) if args.model else None
    config = RouterConfig(frontend=args.listen or default_endpoint("client"),
                          backend=args.backend or default_endpoint("workers"), model_dir=model_dir,
                          curve_dir=args.curve_dir, kv_transport=args.kv_transport,
                          **_router_options(args))

    def ready(router) -> None:
        http = f", http {router.http_url}" if router.http_url else ""
        print(f"pdserve router ready: clients {config.frontend}{http}, workers {config.backend}", flush=True)

    run_router(config, ready, stop_workers=args.shutdown_workers, http=http_config_from_args(args))
    return 0


def cmd_worker(args) -> int:
    from router.worker_args import worker_main

    _die_with_parent()
    return worker_main(args)


def _die_with_parent() -> None:
    """A worker spawned by the launcher exits when the launcher does, even on SIGKILL."""
    parent = os.environ.get("PDSERVE_PARENT_PID")
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        return
    if str(os.getppid()) != parent:  # the launcher died before prctl took effect
        sys.exit(1)


def _client(args):
    from router.client import Client

    endpoint = args.endpoint or default_endpoint("client")
    client = Client(endpoint, timeout=args.timeout, curve=args.curve_dir)
    return client, endpoint


def cmd_generate(args) -> int:
    from router.client import ClientTimeout

    prompt_ids = _token_ids(args.prompt_token_ids, "--prompt-token-ids")
    if sum(x is not None for x in (args.prompt, prompt_ids, args.chat)) != 1:
        raise UserError('give exactly one of a prompt ("text"), --prompt-token-ids and --chat')
    if args.system is not None and args.chat is None:
        raise UserError("--system goes with --chat")
    messages = None
    if args.chat is not None:
        messages = ([{"role": "system", "content": args.system}] if args.system is not None else [])
        messages.append({"role": "user", "content": args.chat})
    client, endpoint = _client(args)
    with client:
        try:
            stream = client.generate(args.prompt, prompt_token_ids=prompt_ids, messages=messages,
                                     max_tokens=args.max_tokens,
                                     temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                     seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos,
                                     stop_token_ids=_token_ids(args.stop_token_ids, "--stop-token-ids"))
            num_tokens, reason, any_text = 0, None, False
            for chunk in stream:
                num_tokens += len(chunk.token_ids)
                reason = chunk.finish_reason
                any_text = any_text or bool(chunk.text)
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
        except ClientTimeout:
            raise UserError(f"no answer from a router at {endpoint} within {args.timeout:g}s; start one "
                            "with `pdserve serve`, or pass --endpoint") from None
    sys.stdout.write("\n")
    print(f"[{num_tokens} tokens, finish: {reason}{'' if any_text else ', no tokenizer: no text'}]",
          file=sys.stderr)
    return 0


def cmd_status(args) -> int:
    from router.client import ClientTimeout
    from router.status_table import format_status

    client, endpoint = _client(args)
    with client:
        try:
            status = client.status()
        except ClientTimeout:
            raise UserError(f"no answer from a router at {endpoint} within {args.timeout:g}s") from None
    print(format_status(status))
    return 0


def cmd_scale(args) -> int:
    from router.client import ClientTimeout

    if args.prefill is None and args.decode is None:
        raise UserError("give --prefill N and/or --decode M")
    client, endpoint = _client(args)
    with client:
        try:
            result = client.scale(prefill=args.prefill, decode=args.decode)
        except ClientTimeout:
            raise UserError(f"no answer from a router at {endpoint} within {args.timeout:g}s") from None
    print(f"prefill {result['prefill']}  decode {result['decode']}  added {', '.join(result['added']) or '-'}  "
          f"draining {', '.join(result['draining']) or '-'}")
    return 0


def cmd_keys(args) -> int:
    from router.security import create_keys

    for path in create_keys(args.dir):
        print(path)
    return 0


def cmd_bench(argv: list[str]) -> int:
    from router.bench.main import add_arguments, run

    parser = argparse.ArgumentParser(prog=f"{PROG} bench", description="Load-test a pdserve server.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


COMMANDS = {"serve": cmd_serve, "router": cmd_router, "worker": cmd_worker,
            "generate": cmd_generate, "status": cmd_status, "scale": cmd_scale, "keys": cmd_keys}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv else None
    try:
        logging.basicConfig(level=log_level(), stream=sys.stderr,
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")
        if command == "bench":
            return cmd_bench(argv[1:])
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if not _is_user_error(exc):
            raise
        print(f"{PROG} {command}: {exc}", file=sys.stderr)
        return 1


def log_level() -> str:
    """The level named by $PDSERVE_LOG (default INFO). Raises UserError for an unknown name."""
    level = os.environ.get("PDSERVE_LOG", "INFO").upper()
    if not isinstance(logging.getLevelName(level), int):
        raise UserError(f"PDSERVE_LOG={os.environ['PDSERVE_LOG']!r} is not a log level; "
                        "use DEBUG, INFO, WARNING or ERROR")
    return level


def _is_user_error(exc: Exception) -> bool:
    from router.client_types import ServerError
    from router.launcher import ClusterError

    return isinstance(exc, (UserError, ValueError, ServerError, ClusterError, OSError))


if __name__ == "__main__":
    sys.exit(main())
