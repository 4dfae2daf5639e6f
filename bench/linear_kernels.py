"""Batch-1 linear layers of SmolLM2-135M-Instruct's shapes, one thread, side by side:
float32 ``F.linear``, bf16 ``F.linear`` and oneDNN's prepacked bf16 linear
(``torch.ops.mkldnn._linear_pointwise`` on a ``_reorder_linear_weight``-packed weight).

    python -m bench.linear_kernels [--threads 1] [--iters 200]

Decode at batch 1 reads every weight once per token, so these times bound a step from below;
on a CPU without native bf16, torch's bf16 ``F.linear`` converts in software and loses to
float32, while the packed oneDNN kernel reads half the bytes and wins.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

# (in, out) of one layer's projections and the LM head: hidden 576, 9 heads + 2x3 kv heads of
# 64, MLP 1536 (gate and up fused), vocabulary 49,152.
SHAPES = {"qkv": (576, 960), "o": (576, 576), "gate_up": (576, 3072), "down": (1536, 576),
          "lm_head": (576, 49152)}
LAYERS = 30


def timed_us(fn, iters: int) -> float:
    for _ in range(10):
        fn()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--iters", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    packed_ok = hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and torch.backends.mkldnn.is_available()
    totals = {"fp32": 0.0, "bf16": 0.0, "onednn_bf16": 0.0}
    print(f"{'layer':>8} {'in x out':>12} {'fp32 us':>9} {'bf16 us':>9} {'oneDNN bf16 us':>15}")
    for name, (k, n) in SHAPES.items():
        x, w = torch.randn(1, k), torch.randn(n, k) / k ** 0.5
        xb, wb = x.bfloat16(), w.bfloat16()
        row = {"fp32": timed_us(lambda: F.linear(x, w), args.iters),
               "bf16": timed_us(lambda: F.linear(xb, wb), args.iters)}
        if packed_ok:
            packed = torch.ops.mkldnn._reorder_linear_weight(wb, None)
            row["onednn_bf16"] = timed_us(
                lambda: torch.ops.mkldnn._linear_pointwise(xb, packed, None, "none", [], ""), args.iters)
        repeat = 1 if name == "lm_head" else LAYERS
        for kind, us in row.items():
            totals[kind] += us * repeat
        print(f"{name:>8} {f'{k}x{n}':>12} {row['fp32']:>9.1f} {row['bf16']:>9.1f} "
              f"{row.get('onednn_bf16', float('nan')):>15.1f}")
    print(f"all linears of one batch-1 step ({LAYERS} layers + LM head): "
          + ", ".join(f"{kind} {us / 1000:.1f} ms" for kind, us in totals.items() if us))


if __name__ == "__main__":
    main()
