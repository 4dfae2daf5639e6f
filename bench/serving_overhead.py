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

Writes ``{"overhead_fraction", "router_tokens_per_s", ...details}``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
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


async def stream_all(endpoint: str, prompts, max_tokens: int) -> tuple[int, float]:
    async with AsyncClient(endpoint, timeout=600) as client:
        async def one(prompt) -> int:
            count = 0
            async for chunk in client.generate(prompt_token_ids=prompt, max_tokens=max_tokens,
                                               ignore_eos=True, temperature=0.0):
                count += len(chunk.token_ids)
            return count

        start = time.perf_counter()
        counts = await asyncio.gather(*(one(p) for p in prompts))
        return sum(counts), time.perf_counter() - start


def stack_tokens_per_s(model_dir: str | None, prompts, max_tokens: int, **cluster) -> float:
    # The router runs in its own process, as under `pdserve serve`: sharing this process's GIL
    # with the client would measure the benchmark, not the router.
    with LocalCluster(model_dir, mode="colocated", num_workers=1, router_in_process=False,
                      **cluster) as c:
        asyncio.run(stream_all(c.endpoint, prompts, max_tokens))  # warm-up
        num_tokens, elapsed = asyncio.run(stream_all(c.endpoint, prompts, max_tokens))
    return num_tokens / elapsed


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
    args = parser.parse_args(argv)

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
