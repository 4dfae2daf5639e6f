"""Linear layers of SmolLM2-135M-Instruct's shapes (batch 1 by default), one thread, side by side:
float32 ``F.linear``, float32 through MKL's prepacked sgemm (``torch.ops.mkl._mkl_linear`` on a
``_mkl_reorder_linear_weight``-packed weight), bf16 ``F.linear`` and oneDNN's prepacked bf16
linear (``torch.ops.mkldnn._linear_pointwise`` on a ``_reorder_linear_weight``-packed weight).

    python -m bench.linear_kernels [--threads 1] [--iters 10] [--batch 1]

Decode at batch 1 reads every weight once per token, so these times bound a step from below.
As in a real step, every layer has weights of its own (30 distinct copies of each projection,
538 MB in float32 in all): each kernel streams its weights from memory rather than finding one
small matrix in cache. On a CPU without native bf16, torch's bf16 ``F.linear`` converts in
software; the packed oneDNN kernel reads half the bytes of float32.
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


def streamed_us(calls: list, iters: int) -> float:
    """Mean microseconds per call of ``calls`` (one per layer), run in order ``iters`` times."""
    for call in calls:
        call()
    start = time.perf_counter()
    for _ in range(iters):
        for call in calls:
            call()
    return (time.perf_counter() - start) / (iters * len(calls)) * 1e6


def layer_calls(kind: str, k: int, n: int, copies: int, batch: int = 1) -> list:
    """``copies`` linears of shape (in ``k``, out ``n``) on ``batch`` rows, each with its own
    weight."""
    calls = []
    for _ in range(copies):
        x, w = torch.randn(batch, k), torch.randn(n, k) / k ** 0.5
        if kind == "fp32":
            calls.append(lambda x=x, w=w: F.linear(x, w))
            continue
        if kind == "mkl_fp32":  # MKL's packed sgemm: the weight is blocked once, not per call
            packed = torch.ops.mkl._mkl_reorder_linear_weight(w, batch)
            calls.append(lambda x=x, w=w, p=packed: torch.ops.mkl._mkl_linear(x, p, w, None, batch))
            continue
        x, w = x.bfloat16(), w.bfloat16()
        if kind == "bf16":
            calls.append(lambda x=x, w=w: F.linear(x, w))
        else:
            packed = torch.ops.mkldnn._reorder_linear_weight(w, batch)
            calls.append(lambda x=x, w=packed: torch.ops.mkldnn._linear_pointwise(
                x, w, None, "none", [], ""))
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--iters", type=int, default=10, help="passes over every layer")
    parser.add_argument("--batch", type=int, default=1,
                        help="rows per linear (1: batch-1 decode; 16 or more: batched decode "
                             "and prefill, where the CPU computes rather than streams)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    packed_ok = hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and torch.backends.mkldnn.is_available()
    mkl_ok = hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight") and torch.backends.mkl.is_available()
    kinds = ["fp32"] + (["mkl_fp32"] if mkl_ok else []) + ["bf16"] + (["onednn_bf16"] if packed_ok else [])
    totals = dict.fromkeys(kinds, 0.0)
    print(f"{'layer':>8} {'in x out':>12} " + " ".join(f"{kind + ' us':>15}" for kind in kinds))
    for name, (k, n) in SHAPES.items():
        row = {kind: streamed_us(layer_calls(kind, k, n, 1 if name == "lm_head" else LAYERS,
                                             args.batch), args.iters) for kind in kinds}
        print(f"{name:>8} {f'{k}x{n}':>12} " + " ".join(f"{row[kind]:>15.1f}" for kind in kinds))
    # The whole step in a real step's order: each layer's four projections, then the LM head.
    for kind in kinds:
        per_shape = {name: layer_calls(kind, k, n, 1 if name == "lm_head" else LAYERS, args.batch)
                     for name, (k, n) in SHAPES.items()}
        calls = [per_shape[name][i] for i in range(LAYERS) for name in SHAPES if name != "lm_head"]
        calls += per_shape["lm_head"]
        totals[kind] = streamed_us(calls, args.iters) * len(calls)
        del per_shape, calls
    print(f"all linears of one batch-{args.batch} step in layer order ({LAYERS} layers + LM head): "
          + ", ".join(f"{kind} {us / 1000:.1f} ms" for kind, us in totals.items() if us))


if __name__ == "__main__":
    main()
