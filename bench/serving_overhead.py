"""Router benchmark: what the full serving stack costs over the model, and how many tokens/s the
router itself can fan out.

    python -m bench.serving_overhead --json serving_overhead.json

1. Overhead: the demo model at one batch, run (a) in this process through the colocated engine
   (``ModelRunner`` + ``DecodeEngine``, no sockets) and (b) through ``pdserve``'s whole stack
   (router, one colocated worker, the client library). ``overhead_fraction = 1 - (b) / (a)``
   in output tokens/s.
2. Router capacity: 256 concurrent streams over a tiny real model (2 layers, hidden 64) so the
   model step is cheap and routing, detokenization and streaming dominate; output tokens/s as
   the clients receive them.
3. HTTP vs ZMQ fan-out (``--http``): the same 256 streams against one router, alternately over
   the ZMQ client and over OpenAI-compatible SSE (/v1/completions), in the same run; tokens/s
   as clients receive them and the router process's CPU time per 1000 tokens, for each path.

Writes ``{"overhead_fraction", "router_tokens_per_s", ...details}`` (and ``"http_vs_zmq"``).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from router.client import AsyncClient
from router.launcher import LocalCluster, threads_per_rank


def prompts_for(batch: int, prompt_len: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(32, 127) for _ in range(prompt_len)] for _ in range(batch)]


def in_process_tokens_per_s(model_dir: str, prompts, max_tokens: int) -> float:
    """The colocated engine without any socket, with the threads a lone worker gets: the
    ceiling for the full stack."""
    import torch

    from decode.engine import DecodeEngine
    from models.request_options import RequestOptions
    from models.runner import ModelRunner

    torch.set_num_threads(threads_per_rank(1))
    runner = ModelRunner(model_dir, block_size=16, num_blocks=4096)
    engine = DecodeEngine(runner, colocated=True, max_num_seqs=len(prompts))
    options = RequestOptions(temperature=0.0, ignore_eos=True, max_tokens=max_tokens)

    def run_once() -> tuple[int, float]:
        start = time.perf_counter()
        for i, prompt in enumerate(prompts):
            engine.reserve(f"r{i}", f"t{i}", prompt, options, 0)
            engine.prefill_local(f"r{i}", f"t{i}")
        num_tokens = 0
        while (plan := engine.build_plan()) is not None:
            out = engine.apply(engine.execute_plan(plan))
            num_tokens += len(out.items) + len(out.first_tokens)
        return num_tokens, time.perf_counter() - start

    run_once()  # warm-up
    num_tokens, elapsed = run_once()
    runner.close()
    return num_tokens / elapsed


async def count_streams(client, prompts, max_tokens: int) -> tuple[int, float]:
    """Stream every prompt at once through ``client``; (output tokens, seconds)."""
    async def one(prompt) -> int:
        count = 0
        async for chunk in client.generate(prompt_token_ids=prompt, max_tokens=max_tokens,
                                           ignore_eos=True, temperature=0.0):
            count += len(chunk.token_ids)
        return count

    start = time.perf_counter()
    counts = await asyncio.gather(*(one(p) for p in prompts))
    return sum(counts), time.perf_counter() - start


async def stream_all(endpoint: str, prompts, max_tokens: int) -> tuple[int, float]:
    async with AsyncClient(endpoint, timeout=600) as client:
        return await count_streams(client, prompts, max_tokens)


def stack_tokens_per_s(model_dir: str | None, prompts, max_tokens: int, **cluster) -> float:
    # The router runs in its own process, as under `pdserve serve`: sharing this process's GIL
    # with the client would measure the benchmark, not the router.
    with LocalCluster(model_dir, mode="colocated", num_workers=1, router_in_process=False,
                      **cluster) as c:
        asyncio.run(stream_all(c.endpoint, prompts, max_tokens))  # warm-up
        num_tokens, elapsed = asyncio.run(stream_all(c.endpoint, prompts, max_tokens))
    return num_tokens / elapsed


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def stream_all_http(base_url: str, prompts, max_tokens: int) -> tuple[int, float]:
    from router.bench.openai_client import OpenAIClient

    async with OpenAIClient(base_url, timeout=600) as client:
        await client.status()
        return await count_streams(client, prompts, max_tokens)


def http_vs_zmq(model_dir: str, prompts, max_tokens: int, rounds: int = 3) -> dict:
    """Fan-out over ZMQ and over HTTP SSE, alternating on one router process (see the module
    docstring); medians over ``rounds``."""
    from router.http.config import HttpConfig

    paths = {"zmq": [], "http": []}
    with LocalCluster(model_dir, mode="colocated", num_workers=1, router_in_process=False,
                      max_num_seqs=len(prompts), num_kv_blocks=8192, http=HttpConfig(port=0)) as c:
        runs = {"zmq": lambda: stream_all(c.endpoint, prompts, max_tokens),
                "http": lambda: stream_all_http(c.http_url, prompts, max_tokens)}
        for name in runs:  # warm-up
            asyncio.run(runs[name]())
        for _ in range(rounds):
            for name, run in runs.items():
                cpu = cpu_seconds(c.router_pid)
                num_tokens, elapsed = asyncio.run(run())
                cpu = cpu_seconds(c.router_pid) - cpu
                paths[name].append((num_tokens / elapsed, 1e6 * cpu / num_tokens))
    result = {}
    for name, samples in paths.items():
        result[f"{name}_tokens_per_s"] = round(statistics.median(s[0] for s in samples), 1)
        result[f"{name}_router_cpu_ms_per_1k_tokens"] = round(statistics.median(s[1] for s in samples), 1)
    result["ratio"] = round(result["http_tokens_per_s"] / result["zmq_tokens_per_s"], 3)
    result["router_cpu_ratio"] = round(result["zmq_router_cpu_ms_per_1k_tokens"]
                                       / result["http_router_cpu_ms_per_1k_tokens"], 3)
    return result


def tiny_model(directory: Path) -> str:
    """A real 2-layer, hidden-64 Llama written by transformers (random weights)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=258, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=256, eos_token_id=257)
    LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    return str(directory)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the result here")
    parser.add_argument("--batch", type=int, default=16, help="requests in the overhead run")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--streams", type=int, default=256, help="streams in the capacity run")
    parser.add_argument("--stream-tokens", type=int, default=128)
    parser.add_argument("--http", action="store_true",
                        help="only the HTTP vs ZMQ fan-out comparison (3.)")
    args = parser.parse_args(argv)
    if args.http:
        with tempfile.TemporaryDirectory() as tmp:
            tiny = tiny_model(Path(tmp) / "tiny")
            result = {"http_vs_zmq": http_vs_zmq(tiny, prompts_for(args.streams, 16, seed=1),
                                                 args.stream_tokens),
                      "streams": args.streams, "stream_tokens": args.stream_tokens}
        print(json.dumps(result, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
        return 0

    from models.demo import demo_model_dir

    demo = str(demo_model_dir())
    prompts = prompts_for(args.batch, args.prompt_len)
    inproc = in_process_tokens_per_s(demo, prompts, args.max_tokens)
    stack = stack_tokens_per_s(demo, prompts, args.max_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        tiny = tiny_model(Path(tmp) / "tiny")
        router_tps = stack_tokens_per_s(tiny, prompts_for(args.streams, 16, seed=1), args.stream_tokens,
                                        max_num_seqs=args.streams, num_kv_blocks=8192)
    result = {
        "overhead_fraction": round(1 - stack / inproc, 4),
        "router_tokens_per_s": round(router_tps, 1),
        "in_process_tokens_per_s": round(inproc, 1),
        "stack_tokens_per_s": round(stack, 1),
        "batch": args.batch, "prompt_len": args.prompt_len, "max_tokens": args.max_tokens,
        "streams": args.streams, "stream_tokens": args.stream_tokens,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
