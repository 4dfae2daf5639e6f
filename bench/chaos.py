"""Chaos benchmark: streaming load while workers are SIGKILLed and restarted at random.

    python -m bench.chaos --json chaos.json [--duration 60] [--prefill 2 --decode 2]

1. Starts a local cluster (the demo model unless ``--model``).
2. Runs the workload once undisturbed: those outputs are the reference (half the requests are
   greedy, half seeded sampling, so both must come back token for token).
3. For ``--duration`` seconds keeps ``--concurrency`` streams running, cycling through the same
   workload, while every ``--kill-interval`` seconds a random worker is killed with SIGKILL and
   restarted ``--restart-after`` seconds later.
4. Lets the cluster settle and reads every worker's free KV blocks.

Prints and writes ``{"sent", "completed", "failed", "lost", "duplicated_tokens",
"leaked_blocks", "mismatched_outputs", ...}``. ``lost``: a request that neither completed nor
failed with a server error within ``--request-timeout``. ``duplicated_tokens``: tokens a client
received past the reference output. ``mismatched_outputs``: completed requests whose tokens
differ from the reference. ``leaked_blocks``: KV blocks not free on any worker once idle.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass


from router.client import AsyncClient, Client, ClientTimeout, ServerError
from router.launcher import LocalCluster


@dataclass
class Tally:
    sent: int = 0
    completed: int = 0
    failed: int = 0
    lost: int = 0
    duplicated_tokens: int = 0
    missing_tokens: int = 0
    mismatched_outputs: int = 0
    leaked_blocks: int = 0
    kills: int = 0
    restarts: int = 0


def make_workload(num: int, vocab: int, max_tokens: int, seed: int):
    rng = random.Random(seed)
    prompts = [[rng.randrange(32, min(vocab, 127)) for _ in range(rng.randrange(8, 96))]
               for _ in range(num)]
    params = [{"temperature": 0.0} if i % 2 == 0 else {"temperature": 0.8, "seed": 7000 + i}
              for i in range(num)]
    return prompts, params, max_tokens


async def stream(client: AsyncClient, prompt, params, max_tokens) -> list[int]:
    tokens: list[int] = []
    async for chunk in client.generate(prompt_token_ids=prompt, max_tokens=max_tokens,
                                       ignore_eos=True, **params):
        tokens += chunk.token_ids
    return tokens


async def reference_outputs(endpoint, prompts, params, max_tokens) -> list[list[int]]:
    async with AsyncClient(endpoint, timeout=300) as client:
        return list(await asyncio.gather(*(stream(client, p, q, max_tokens)
                                           for p, q in zip(prompts, params))))


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
            try:
                got = await asyncio.wait_for(stream(client, prompts[i], params[i], max_tokens),
                                             args.request_timeout)
            except (asyncio.TimeoutError, ClientTimeout):
                tally.lost += 1
                continue
            except ServerError as exc:
                tally.failed += 1
                print(f"request failed: {exc}", file=sys.stderr)
                continue
            tally.completed += 1
            expected = reference[i]
            tally.duplicated_tokens += max(0, len(got) - len(expected))
            tally.missing_tokens += max(0, len(expected) - len(got))
            if got != expected:
                tally.mismatched_outputs += 1

    async def chaos() -> None:
        loop = asyncio.get_running_loop()
        while time.monotonic() + args.kill_interval < deadline:
            await asyncio.sleep(args.kill_interval * rng.uniform(0.5, 1.5))
            victim = rng.choice(cluster.workers)
            await loop.run_in_executor(None, cluster.kill_worker, victim.worker_id, signal.SIGKILL)
            tally.kills += 1
            print(f"killed {victim.worker_id}", file=sys.stderr)
            await asyncio.sleep(args.restart_after)
            await loop.run_in_executor(None, cluster.start_worker, victim.role, victim.worker_id)
            tally.restarts += 1

    async with AsyncClient(cluster.endpoint, timeout=args.request_timeout) as client:
        await asyncio.gather(chaos(), *(one_stream(client) for _ in range(args.concurrency)))


def settle_and_count_leaks(endpoint: str, num_workers: int, timeout_s: float) -> int:
    """Wait for every worker to be back and idle; return the KV blocks still not free."""
    deadline = time.monotonic() + timeout_s
    with Client(endpoint, timeout=30) as client:
        while True:
            workers = [w for w in client.status()["workers"] if w["alive"]]
            used = sum(w["num_blocks"] - w["free_blocks"] for w in workers)
            if (len(workers) >= num_workers and used == 0) or time.monotonic() > deadline:
                return used
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
    parser.add_argument("--kv-transport", default="auto")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of chaos")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--kill-interval", type=float, default=8.0)
    parser.add_argument("--restart-after", type=float, default=2.0)
    parser.add_argument("--request-timeout", type=float, default=120.0)
    parser.add_argument("--settle-timeout", type=float, default=90.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.kill_interval <= 0 or args.concurrency < 1:
        parser.error("--duration, --kill-interval and --concurrency must be positive")

    tally = Tally()
    cluster = LocalCluster(args.model, mode=args.mode, num_prefill=args.prefill,
                           num_decode=args.decode, num_workers=args.workers,
                           kv_transport=args.kv_transport)
    with cluster:
        prompts, params, max_tokens = make_workload(args.num_prompts, 256, args.max_tokens, args.seed)
        reference = asyncio.run(reference_outputs(cluster.endpoint, prompts, params, max_tokens))
        start = time.monotonic()
        asyncio.run(chaos_load(cluster, args, prompts, params, max_tokens, reference, tally))
        elapsed = time.monotonic() - start
        tally.leaked_blocks = settle_and_count_leaks(cluster.endpoint, len(cluster.roles),
                                                     args.settle_timeout)
    result = {**asdict(tally), "duration_s": round(elapsed, 1), "mode": args.mode,
              "kv_transport": args.kv_transport,
              "layout": f"{args.prefill}p{args.decode}d" if args.mode == "disagg" else f"{args.workers}x"}
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    clean = all(result[k] == 0 for k in ("lost", "duplicated_tokens", "leaked_blocks",
                                         "mismatched_outputs"))
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
