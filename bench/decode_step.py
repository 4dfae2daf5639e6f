"""Decode steps of the real model, several engine configurations interleaved step by step.

    python -m bench.decode_step [--batch 1] [--context 256] [--threads 1] [--steps 100]
        [--configs eager,layers:1,layers:8,transformers] [--dtype float32] [--json out.json]

Each configuration is a ``ModelRunner`` on SmolLM2-135M-Instruct (``bench/real_model.py``):
``eager`` runs without compiled graphs, ``layers:K`` compiles decode graphs of up to ``K``
layers each (``models.compiled.MAX_LAYERS_PER_GRAPH``; ``layers:1`` is one call per layer,
``layers:8``, the default, five calls of 6 for this model, ``layers:16`` two calls of 15), and
``transformers`` is the reference: the same checkpoint in transformers, one forward per step over
its own contiguous ``DynamicCache``. All prefill the same ``--batch`` random prompts of
``--context`` tokens, then decode greedily; the configurations take turns one step at a time,
so a shift in the machine's load hits all of them alike. Per configuration: the median and 10th
percentile step wall time, and the share of it spent in attention (``StepAttention.attend``:
the pool write, the K/V gather and SDPA of every layer; pdserve's configurations only). Tokens
are checked equal across configurations (float32: the same model, so the same greedy tokens
unless a near-tie falls the other way in transformers' different summation order).
The machine may be shared: compare the configurations of one run, not absolute times.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import models.compiled
import models.step_attention
from bench.real_model import real_model_dir
from models.batch import SequenceChunk
from models.runner import ModelRunner
from models.sampler import SamplingParams

BLOCK_SIZE = 16
GREEDY = SamplingParams(temperature=0.0)


class AttentionClock:
    """Wall time spent in ``StepAttention.attend`` (eager and compiled alike call it)."""

    def __init__(self):
        self.seconds = 0.0
        self._attend = models.step_attention.StepAttention.attend
        clock = self

        def attend(state, *args, **kwargs):
            start = time.perf_counter()
            try:
                return clock._attend(state, *args, **kwargs)
            finally:
                clock.seconds += time.perf_counter() - start

        models.step_attention.StepAttention.attend = attend

    def close(self) -> None:
        models.step_attention.StepAttention.attend = self._attend


class RunnerSteps:
    """One pdserve configuration: a ``ModelRunner`` stepping the sequences' block tables."""

    attention_share = True

    def __init__(self, config: str, args, tables: list[list[int]]):
        eager = config == "eager"
        if not eager:
            kind, _, value = config.partition(":")
            if kind != "layers" or not value.isdigit() or int(value) < 1:
                raise SystemExit(f"bad config {config!r}: use eager, layers:K (K >= 1) or "
                                 "transformers")
            models.compiled.MAX_LAYERS_PER_GRAPH = int(value)
        self.tables, self.context = tables, args.context
        self.runner = ModelRunner(real_model_dir(), dtype=args.dtype, device=torch.device("cpu"),
                                  block_size=BLOCK_SIZE, num_blocks=1 + sum(map(len, tables)),
                                  pool_backend="heap", enforce_eager=eager,
                                  compile_buckets=[len(tables)])

    def prefill(self, prompts: list[list[int]]) -> list[int]:
        chunks = [SequenceChunk(p, 0, t, GREEDY, 0) for p, t in zip(prompts, self.tables)]
        return [r.token_id for r in self.runner.step(chunks)]

    def decode(self, step: int, last: list[int]) -> list[int]:
        chunks = [SequenceChunk([token], self.context + step - 1, t, GREEDY, step)
                  for token, t in zip(last, self.tables)]
        return [r.token_id for r in self.runner.step(chunks)]

    def close(self) -> None:
        self.runner.close()


class TransformersSteps:
    """The reference: transformers' model, one forward per step over its ``DynamicCache``
    (every sequence has the same length, so no padding or mask is needed)."""

    attention_share = False

    def __init__(self, args):
        import transformers

        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            real_model_dir(), dtype=getattr(torch, args.dtype)).eval()
        self.cache = transformers.DynamicCache(config=self.model.config)

    def _forward(self, ids: list[list[int]]) -> list[int]:
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor(ids), cache=self.cache, use_cache=True,
                             logits_to_keep=1)
        return out.logits[:, -1].argmax(-1).tolist()

    def prefill(self, prompts: list[list[int]]) -> list[int]:
        return self._forward(prompts)

    def decode(self, step: int, last: list[int]) -> list[int]:
        return self._forward([[token] for token in last])

    def close(self) -> None:
        del self.model, self.cache


def build(config: str, args, tables: list[list[int]]):
    return TransformersSteps(args) if config == "transformers" else RunnerSteps(config, args,
                                                                                  tables)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=256, help="prompt tokens per sequence")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=100, help="decode steps per configuration")
    parser.add_argument("--configs", default="eager,layers:1,layers:8")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    configs = [c for c in args.configs.split(",") if c]
    blocks_per_seq = -(-(args.context + args.steps) // BLOCK_SIZE)
    tables = [list(range(1 + i * blocks_per_seq, 1 + (i + 1) * blocks_per_seq))
              for i in range(args.batch)]
    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, 49000, args.context).tolist() for _ in range(args.batch)]
    engines, outputs = {}, {}
    for config in configs:
        start = time.perf_counter()
        engines[config] = build(config, args, tables)
        outputs[config] = [[t] for t in engines[config].prefill(prompts)]
        print(f"{config}: built and prefilled in {time.perf_counter() - start:.1f} s", flush=True)
    clock = AttentionClock()
    times = {c: [] for c in configs}
    attention = {c: 0.0 for c in configs}
    try:
        for step in range(1, args.steps):
            for config, engine in engines.items():
                outs = outputs[config]
                before = clock.seconds
                start = time.perf_counter()
                tokens = engine.decode(step, [o[-1] for o in outs])
                times[config].append(time.perf_counter() - start)
                attention[config] += clock.seconds - before
                for o, token in zip(outs, tokens):
                    o.append(token)
    finally:
        clock.close()
    rows = []
    for config in configs:
        ts = sorted(times[config])
        share = (round(attention[config] / sum(ts), 3) if engines[config].attention_share
                 else None)
        rows.append({"config": config, "median_ms": round(statistics.median(ts) * 1000, 2),
                     "p10_ms": round(ts[len(ts) // 10] * 1000, 2), "attention_share": share,
                     "same_tokens_as_first": outputs[config] == outputs[configs[0]]})
        shown = "-" if share is None else f"{share:.0%}"
        print(f"{config:>12}: step median {rows[-1]['median_ms']:.1f} ms, p10 "
              f"{rows[-1]['p10_ms']:.1f} ms, attention {shown} of the step, tokens equal to "
              f"{configs[0]}: {rows[-1]['same_tokens_as_first']}")
    for engine in engines.values():
        engine.close()
    if args.json:
        report = {"batch": args.batch, "context": args.context, "threads": args.threads,
                  "dtype": args.dtype, "steps": args.steps, "rows": rows}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
