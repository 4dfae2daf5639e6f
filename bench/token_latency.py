"""Where one stream's per-token time goes: the real model's decode step in this process against
the same step behind the whole serving stack, in the same run.

    python -m bench.token_latency [--enforce-eager] [--rounds 2] [--json token_latency.json]

Each round, alternately (so both see the same machine load):
1. in process: ``ModelRunner`` + the colocated ``DecodeEngine``, no sockets, the threads a lone
   worker gets; one request of ``--prompt-len`` random tokens, then ``--max-tokens`` decode
   steps: the median step's wall time and the CPU time of the thread that ran it;
2. the stack: ``pdserve`` colocated with one worker and the router in its own process (as
   ``pdserve serve --router-process``), one request at a time through the ZMQ client: TPOT and
   TTFT as the client sees them, and the CPU time each part spent per output token, read from
   /proc (router process; worker event loop, model thread(s), ZeroMQ I/O threads; this client).

``tpot_over_step`` near 1 means the stack adds nothing to the step on the token's critical
path; the CPU shares say what the other parts cost the machine. The model's CPU per token
includes each request's prefill. Prompts are fresh every request, so no prefix cache hides a
prefill. The machine may be shared: compare the ratios of one run, not absolute times.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import statistics
import sys
import time
from pathlib import Path

from bench.real_model import real_model_dir
from router.client import AsyncClient
from router.launcher import LocalCluster, threads_per_rank

VOCAB = 49152


def random_prompt(rng: random.Random, length: int) -> list[int]:
    return [rng.randrange(100, VOCAB - 100) for _ in range(length)]


class InProcess:
    """The colocated engine in this process, built once (graphs compiled once)."""

    def __init__(self, model_dir: str, eager: bool):
        import torch

        from decode.engine import DecodeEngine
        from models.runner import ModelRunner

        torch.set_num_threads(threads_per_rank(1))
        self.runner = ModelRunner(model_dir, block_size=16, num_blocks=256, max_model_len=2048,
                                  enforce_eager=eager)
        self.engine = DecodeEngine(self.runner, colocated=True, max_num_seqs=1)
        self.count = 0

    def decode_step_ms(self, prompt: list[int], max_tokens: int) -> tuple[float, float]:
        """(median wall ms, median CPU ms of this thread) of one request's decode steps."""
        from models.request_options import RequestOptions

        rid = f"r{self.count}"
        self.count += 1
        options = RequestOptions(temperature=0.0, ignore_eos=True, max_tokens=max_tokens)
        self.engine.reserve(rid, rid, prompt, options, 0)
        self.engine.prefill_local(rid, rid)
        walls, cpus = [], []
        while (plan := self.engine.build_plan()) is not None:
            wall, cpu = time.perf_counter(), time.thread_time()
            self.engine.apply(self.engine.execute_plan(plan))
            walls.append(time.perf_counter() - wall)
            cpus.append(time.thread_time() - cpu)
        # Step 0 is the prefill.
        return 1e3 * statistics.median(walls[1:]), 1e3 * statistics.median(cpus[1:])

    def close(self) -> None:
        self.runner.close()


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """tid -> (name, user + system CPU seconds) for every thread of ``pid``."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
        except OSError:  # the thread ended
            continue
        fields = stat.rsplit(")", 1)[1].split()
        out[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / tick)
    return out


def part_of(pid: int, tid: int, name: str, kind: str) -> str:
    if kind == "router":
        return "router"
    if name.startswith("ZMQbg"):
        return "worker_zmq_io"
    return "worker_event_loop" if tid == pid else "worker_model"


def cpu_by_part(pids: dict[str, int], before: dict, after: dict) -> dict[str, float]:
    """CPU seconds spent between two ``thread_cpu`` snapshots per process, by part."""
    parts: dict[str, float] = {}
    for kind, threads in after.items():
        pid = pids[kind]
        for tid, (name, seconds) in threads.items():
            spent = seconds - before[kind].get(tid, (name, 0.0))[1]
            key = part_of(pid, tid, name, kind)
            parts[key] = parts.get(key, 0.0) + spent
    return parts


async def stream_one(client: AsyncClient, prompt: list[int], max_tokens: int) -> tuple[float, float, int]:
    """(TTFT ms, TPOT ms, tokens) of one streamed request."""
    start = time.perf_counter()
    times = []
    async for chunk in client.generate(prompt_token_ids=prompt, max_tokens=max_tokens,
                                       ignore_eos=True, temperature=0.0):
        times += [time.perf_counter()] * len(chunk.token_ids)
    tpot = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else float("nan")
    return 1e3 * (times[0] - start), 1e3 * tpot, len(times)


def stack_round(cluster: LocalCluster, pids: dict[str, int], prompts: list[list[int]], max_tokens: int) -> dict:
    async def run():
        async with AsyncClient(cluster.endpoint, timeout=600) as client:
            return [await stream_one(client, p, max_tokens) for p in prompts]

    before = {key: thread_cpu(pid) for key, pid in pids.items()}
    client_before = resource.getrusage(resource.RUSAGE_SELF)
    results = asyncio.run(run())
    client_after = resource.getrusage(resource.RUSAGE_SELF)
    parts = cpu_by_part(pids, before, {key: thread_cpu(pid) for key, pid in pids.items()})
    parts["client"] = (client_after.ru_utime + client_after.ru_stime
                       - client_before.ru_utime - client_before.ru_stime)
    num_tokens = sum(r[2] for r in results)
    return {"ttft_ms": statistics.median(r[0] for r in results),
            "tpot_ms": statistics.median(r[1] for r in results),
            "cpu_ms_per_token": {k: round(1e3 * v / num_tokens, 2) for k, v in sorted(parts.items())}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--enforce-eager", action="store_true", help="no compiled decode graphs")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=2, help="streamed requests per round")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    if min(args.rounds, args.requests, args.prompt_len) < 1 or args.max_tokens < 2:
        parser.error("--rounds, --requests and --prompt-len must be >= 1, --max-tokens >= 2")
    model_dir = str(real_model_dir())
    rng = random.Random(0)
    rounds = []
    in_process = InProcess(model_dir, args.enforce_eager)
    env = {"PDSERVE_ENFORCE_EAGER": "1" if args.enforce_eager else "0"}
    with LocalCluster(model_dir, mode="colocated", num_workers=1, router_in_process=False,
                      max_model_len=2048, enforce_eager=args.enforce_eager, env=env) as cluster:
        pids = {"router": cluster.router_pid, "worker": cluster.worker_processes()[0].proc.pid}
        # Warm-up (first-call costs on both sides).
        in_process.decode_step_ms(random_prompt(rng, args.prompt_len), 4)
        stack_round(cluster, pids, [random_prompt(rng, args.prompt_len)], 4)
        for i in range(args.rounds):
            wall, cpu = in_process.decode_step_ms(random_prompt(rng, args.prompt_len), args.max_tokens)
            stack = stack_round(cluster, pids, [random_prompt(rng, args.prompt_len)
                                                for _ in range(args.requests)], args.max_tokens)
            row = {"round": i, "in_process_step_ms": round(wall, 1), "in_process_step_cpu_ms": round(cpu, 1),
                   "stack_tpot_ms": round(stack["tpot_ms"], 1), "stack_ttft_ms": round(stack["ttft_ms"], 1),
                   "tpot_over_step": round(stack["tpot_ms"] / wall, 3),
                   "cpu_ms_per_token": stack["cpu_ms_per_token"], "load_avg": round(os.getloadavg()[0], 2)}
            print(json.dumps(row), flush=True)
            rounds.append(row)
    in_process.close()
    result = {"model": "smollm2-135m-instruct", "compiled": not args.enforce_eager,
              "threads": threads_per_rank(1), "prompt_len": args.prompt_len,
              "max_tokens": args.max_tokens, "rounds": rounds,
              "tpot_over_step_median": round(statistics.median(r["tpot_over_step"] for r in rounds), 3)}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
