"""``pdserve serve`` options of the Ray launcher (``--launcher ray``), and building it from them."""
from __future__ import annotations

import argparse


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--launcher", choices=("local", "ray"), default="local",
                        help="local: worker processes on this machine; ray: Ray actors on a Ray cluster")
    ray = parser.add_argument_group("--launcher ray")
    ray.add_argument("--ray-address", default="auto",
                     help="Ray cluster to use: auto (the one this node belongs to) or an address")
    ray.add_argument("--backend", default=None,
                     help="the router's worker endpoint (default: tcp on 127.0.0.1 when every Ray node "
                          "is this machine, else on this node's address, which needs --curve-dir)")
    ray.add_argument("--cpus-per-rank", type=float, default=1.0, help="CPUs each TP rank reserves")
    ray.add_argument("--gpus-per-rank", type=float, default=None,
                     help="GPUs each TP rank reserves (default: 1 with --device cuda, else 0)")
    ray.add_argument("--max-restarts", type=int, default=-1,
                     help="times Ray restarts a worker (-1: without limit)")
    ray.add_argument("--drain-timeout", type=float, default=60.0,
                     help="seconds a worker removed by `pdserve scale` may finish its requests before "
                          "they fail over")
    ray.add_argument("--kv-host", default=None,
                     help="decode workers receive KV over tcp on this address; 'node': each node's own")


def ray_cluster(args: argparse.Namespace, engine: dict, http=None, router_options: dict | None = None):
    """The ``RayCluster`` that ``pdserve serve --launcher ray`` runs (``http``: its HttpConfig,
    or None). Raises ValueError."""
    from router.ray_launcher import RayCluster, RayOptions

    if args.mode != "disagg":
        raise ValueError("--launcher ray runs --mode disagg (prefill and decode workers)")
    gpus = args.gpus_per_rank if args.gpus_per_rank is not None else (1.0 if args.device == "cuda" else 0.0)
    options = RayOptions(address=args.ray_address, cpus_per_rank=args.cpus_per_rank, gpus_per_rank=gpus,
                         max_restarts=args.max_restarts, drain_timeout_s=args.drain_timeout,
                         kv_host=args.kv_host)
    from router.config import default_endpoint

    return RayCluster(num_prefill=args.prefill, num_decode=args.decode,
                      listen=args.listen or default_endpoint("client"),
                      backend=args.backend, curve_dir=args.curve_dir, ray=options, http=http,
                      router_options=router_options, **engine)
