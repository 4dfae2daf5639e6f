"""Chaos benchmark: streaming load while workers are SIGKILLed and SIGSTOPped, clients cancel at
random, and a hostile connection sends malformed traffic; the supervisor restarts what dies.

    python -m bench.chaos --json chaos.json [--duration 180] [--prefill 2 --decode 2]

1. Starts a supervised local cluster (as ``pdserve serve``; the demo model unless ``--model``).
2. Runs the workload once undisturbed: those outputs are the reference (half the requests are
   greedy, half seeded sampling, so both must come back token for token).
3. For ``--duration`` seconds keeps ``--concurrency`` streams running, cycling through the same
   workload; a ``--cancel-fraction`` of them is cancelled after a random number of tokens.
   Every ``--fault-interval`` seconds a random live worker is SIGKILLed or SIGSTOPped (its whole
   process group); nothing here restarts it: the router notices (disconnect, silence) and
   fails its requests over, and the supervisor kills what is stopped and restarts what died.
   Meanwhile one connection sends malformed traffic: random bytes, wrong field types, and valid
   requests followed by garbage (which fails that connection's requests in flight).
4. Lets the cluster settle (every worker back and idle) and reads every worker's free KV blocks.

Prints and writes ``{"sent", "completed", "cancelled", "failed", "lost", "hangs",
"duplicated_tokens", "mismatched_outputs", "leaked_blocks", ...}``. ``lost``: a request of the
well-behaved client with no final answer within ``--request-timeout``. ``hangs``: a request of
the malformed connection with no answer within that bound. ``duplicated_tokens``: tokens past
the reference output. ``mismatched_outputs``: completed requests (or the part a cancelled one
received) that differ from the reference. ``leaked_blocks``: KV blocks not free once idle.
Exit status 0 only if lost, hangs, duplicated, mismatched and leaked are all 0.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass

import msgpack
import zmq
import zmq.asyncio

from router import protocol as P
from router.client import AsyncClient, Client, ClientTimeout, ServerError
from router.launcher import LocalCluster

CLEAN_KEYS = ("lost", "hangs", "duplicated_tokens", "mismatched_outputs", "leaked_blocks")


@dataclass
class Tally:
    sent: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    lost: int = 0
    hangs: int = 0
    duplicated_tokens: int = 0
    missing_tokens: int = 0
    mismatched_outputs: int = 0
    leaked_blocks: int = 0
    kills: int = 0
    stops: int = 0
    restarts: int = 0
    malformed_sent: int = 0
    malformed_requests: int = 0
    malformed_answered: int = 0


def make_workload(num: int, vocab: int, max_tokens: int, seed: int):
    rng = random.Random(seed)
    prompts = [[rng.randrange(32, min(vocab, 127)) for _ in range(rng.randrange(8, 96))]
               for _ in range(num)]
    params = [{"temperature": 0.0} if i % 2 == 0 else {"temperature": 0.8, "seed": 7000 + i}
              for i in range(num)]
    return prompts, params, max_tokens


async def stream(client: AsyncClient, prompt, params, max_tokens, cancel_after: int | None = None):
    """The tokens of one request, and whether it was cancelled (after ``cancel_after`` tokens)."""
    tokens: list[int] = []
    chunks = client.generate(prompt_token_ids=prompt, max_tokens=max_tokens, ignore_eos=True, **params)
    async for chunk in chunks:
        tokens += chunk.token_ids
        if cancel_after is not None and len(tokens) >= cancel_after and chunk.finish_reason is None:
            await chunks.aclose()
            return tokens, True
    return tokens, False


async def reference_outputs(endpoint, prompts, params, max_tokens) -> list[list[int]]:
    async with AsyncClient(endpoint, timeout=300) as client:
        done = await asyncio.gather(*(stream(client, p, q, max_tokens) for p, q in zip(prompts, params)))
    return [tokens for tokens, _ in done]


def live_workers(cluster: LocalCluster) -> list[dict]:
    status = cluster.router_status() or {}
    return [w for w in status.get("workers", []) if w["alive"] and w.get("pid")]


async def faults(cluster: LocalCluster, args, rng: random.Random, deadline: float, tally: Tally) -> None:
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(args.fault_interval * rng.uniform(0.5, 1.5))
        if time.monotonic() + args.fault_interval > deadline:
            return
        workers = await loop.run_in_executor(None, live_workers, cluster)
        if not workers:
            continue
        victim = rng.choice(workers)
        stop = rng.random() < args.stop_fraction
        try:
            os.killpg(victim["pid"], signal.SIGSTOP if stop else signal.SIGKILL)
        except ProcessLookupError:
            continue
        if stop:
            tally.stops += 1
        else:
            tally.kills += 1
        print(f"{'stopped' if stop else 'killed'} {victim['id']} (pid {victim['pid']})", file=sys.stderr)


async def malformed_sender(endpoint: str, args, rng: random.Random, deadline: float, tally: Tally) -> None:
    """A connection that sends garbage among valid requests; each of its requests must still
    get exactly one answer (a final chunk or an error) within the request timeout."""
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(endpoint)
    pending: dict[str, float] = {}
    n = 0

    async def reader() -> None:
        while True:
            try:
                msg = P.decode(await sock.recv(), (P.Chunk, P.Error))
            except P.ProtocolError:
                continue
            if msg.rid in pending and (isinstance(msg, P.Error) or msg.finish_reason is not None):
                del pending[msg.rid]
                tally.malformed_answered += 1

    read = asyncio.ensure_future(reader())
    try:
        while time.monotonic() < deadline:
            n += 1
            kind = n % 4
            if kind == 0:  # a valid request, then bytes whose request id cannot be read
                rid = f"m{n}"
                pending[rid] = time.monotonic()
                tally.malformed_requests += 1
                await sock.send(P.encode(P.Generate(rid, None, [rng.randrange(32, 127) for _ in range(8)],
                                                    {"max_tokens": 4, "ignore_eos": True})))
                await sock.send(bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 64))))
            elif kind == 1:  # a readable id with a wrong field: answered with an error
                rid = f"w{n}"
                pending[rid] = time.monotonic()
                tally.malformed_requests += 1
                await sock.send(msgpack.packb([P.Generate.TAG, rid, 17, None, {}]))
            elif kind == 2:
                await sock.send(msgpack.packb([1, f"t{n}", "x", None, {"max_tokens": 1}])[:-3])
            else:
                await sock.send_multipart([b"extra", b"frames"])
            tally.malformed_sent += 1
            await asyncio.sleep(args.malformed_interval)
        end = time.monotonic() + args.request_timeout
        while pending and time.monotonic() < end:
            await asyncio.sleep(0.2)
        tally.hangs += len(pending)
    finally:
        read.cancel()
        sock.close(0)
        ctx.term()


async def chaos_load(cluster: LocalCluster, args, prompts, params, max_tokens, reference,
                     tally: Tally) -> None:
    rng = random.Random(args.seed)
    deadline = time.monotonic() + args.duration
    next_index = 0

    async def one_stream(client: AsyncClient) -> None:
        nonlocal next_index
        while time.monotonic() < deadline:
            i = next_index % len(prompts)
            next_index += 1
            tally.sent += 1
            cancel_after = rng.randrange(0, max_tokens) if rng.random() < args.cancel_fraction else None
            try:
                got, cancelled = await asyncio.wait_for(
                    stream(client, prompts[i], params[i], max_tokens, cancel_after), args.request_timeout)
            except (asyncio.TimeoutError, ClientTimeout):
                tally.lost += 1
                continue
            except ServerError as exc:
                tally.failed += 1
                print(f"request failed: {exc}", file=sys.stderr)
                continue
            expected = reference[i]
            if cancelled:
                tally.cancelled += 1
                tally.mismatched_outputs += got != expected[:len(got)]
                continue
            tally.completed += 1
            tally.duplicated_tokens += max(0, len(got) - len(expected))
            tally.missing_tokens += max(0, len(expected) - len(got))
            tally.mismatched_outputs += got != expected

    async with AsyncClient(cluster.endpoint, timeout=args.request_timeout) as client:
        await asyncio.gather(faults(cluster, args, random.Random(args.seed + 1), deadline, tally),
                             malformed_sender(cluster.endpoint, args, random.Random(args.seed + 2), deadline, tally),
                             *(one_stream(client) for _ in range(args.concurrency)))


def settle_and_count_leaks(endpoint: str, num_workers: int, timeout_s: float) -> int:
    """Wait for every worker to be back and idle; return the KV blocks still not free."""
    deadline = time.monotonic() + timeout_s
    with Client(endpoint, timeout=30) as client:
        while True:
            workers = [w for w in client.status()["workers"] if w["alive"]]
            used = sum(w["num_blocks"] - w["free_blocks"] for w in workers)
            if (len(workers) >= num_workers and used == 0) or time.monotonic() > deadline:
                return used if len(workers) >= num_workers else max(used, 1)
            time.sleep(0.5)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the result here")
    parser.add_argument("--model", default="demo",
                        help="anything `pdserve serve --model` takes (default: demo)")
    parser.add_argument("--mode", choices=("disagg", "colocated"), default="disagg")
    parser.add_argument("--prefill", type=int, default=2)
    parser.add_argument("--decode", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="colocated workers")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--kv-transport", default="auto")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of chaos")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--fault-interval", type=float, default=8.0, help="mean seconds between faults")
    parser.add_argument("--stop-fraction", type=float, default=0.5, help="share of faults that SIGSTOP")
    parser.add_argument("--cancel-fraction", type=float, default=0.2, help="share of requests cancelled")
    parser.add_argument("--malformed-interval", type=float, default=0.05,
                        help="seconds between the hostile connection's messages")
    parser.add_argument("--heartbeat-timeout", type=float, default=2.0)
    parser.add_argument("--stuck-timeout", type=float, default=5.0)
    parser.add_argument("--request-timeout", type=float, default=120.0)
    parser.add_argument("--settle-timeout", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.fault_interval <= 0 or args.concurrency < 1:
        parser.error("--duration, --fault-interval and --concurrency must be positive")

    tally = Tally()
    cluster = LocalCluster(args.model, mode=args.mode, num_prefill=args.prefill, num_decode=args.decode,
                           num_workers=args.workers, tp=args.tp, kv_transport=args.kv_transport,
                           supervise=True,
                           router_options={"heartbeat_timeout_s": args.heartbeat_timeout,
                                           "stuck_timeout_s": args.stuck_timeout})
    with cluster:
        prompts, params, max_tokens = make_workload(args.num_prompts, 256, args.max_tokens, args.seed)
        reference = asyncio.run(reference_outputs(cluster.endpoint, prompts, params, max_tokens))
        start = time.monotonic()
        asyncio.run(chaos_load(cluster, args, prompts, params, max_tokens, reference, tally))
        elapsed = time.monotonic() - start
        tally.leaked_blocks = settle_and_count_leaks(cluster.endpoint, len(cluster.roles), args.settle_timeout)
        tally.restarts = cluster.supervisor.num_restarts
        given_up = {k: v["gave_up"] for k, v in cluster.supervisor.snapshot().items() if v["gave_up"]}
    result = {**asdict(tally), "duration_s": round(elapsed, 1), "mode": args.mode,
              "kv_transport": args.kv_transport, "given_up": given_up,
              "layout": f"{args.prefill}p{args.decode}d" if args.mode == "disagg" else f"{args.workers}x"}
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if all(result[k] == 0 for k in CLEAN_KEYS) else 1


if __name__ == "__main__":
    sys.exit(main())
