"""Engine benchmark: pdserve's ModelRunner against transformers ``generate`` on one machine.

    python -m bench.engine --json engine.json [--quick] [--device cpu|cuda]
        [--models demo,llama-0.37b-random,smollm2-135m-instruct] [--threads N] [--enforce-eager]
        [--new-tokens N] [--dtypes float32,bfloat16]

Both engines run the same checkpoints, the same random 128-token prompts and greedy decoding of
the same number of new tokens (``min_new_tokens`` pins transformers' length), at batch 1, 8 and
32, in float32 and, where the hardware has fast bf16, bfloat16. Checkpoints: the built-in demo
model, a 0.37B-parameter Llama with random weights built here with transformers, and
SmolLM2-135M-Instruct (``bench/real_model.py``; always in both dtypes). pdserve runs as its
workers do: decode steps through compiled graphs (batch buckets 1, 8, 32) unless
``--enforce-eager``, with the thread count its launcher gives one worker on this machine
(``--threads`` to override); transformers gets the same threads.

Per row, ``*_tok_s`` is end to end (prefill + decode): ``batch * new_tokens / wall time``.
Decode alone is timed too (``*_decode_tok_s``; transformers' decode time is its generate time
minus a separately timed prefill forward that, like generate's, fills a cache and keeps the last
position's logits only). ``roofline_fraction`` uses pdserve's decode rate:
at batch 1 decode streams every weight once per token, so the bound is memory bandwidth
(``weight_bytes * tok_s / read_bandwidth``); at larger batches it is compute
(``2 * params * tok_s / matmul_rate``, with the matmul rate measured in the row's dtype).
``ratio`` is ``pdserve_tok_s / hf_tok_s``. ``greedy_match`` is the fraction of sequences whose
tokens all equal transformers'; for each other sequence, ``tie_gaps`` holds transformers' own
logprob gap between its token and pdserve's at the first step where they differ (the context up
to there is the same). A rounding difference can only flip a near-tie, so with
``near_ties`` (every gap within ``TIE_NATS`` of the dtype) a low match is expected drift: one
flipped near-tie changes the rest of the sequence. A larger gap means pdserve picked a token
transformers ranks clearly lower: a bug, not rounding. Embedding tables are not counted (only one row per
token is read), the LM head is. The machine's read bandwidth (large-tensor sum) and matmul
rate (large square matmul) are measured in the same run.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.real_model import real_model_dir
from kvtransfer.allocator import BlockAllocator
from models.batch import SequenceChunk
from models.demo import demo_model_dir
from models.loader import cpu_has_native_bf16
from models.runner import ModelRunner
from models.sampler import SamplingParams
from router.launcher import threads_per_rank

PROMPT_LEN = 128
BLOCK_SIZE = 16
GREEDY = SamplingParams(temperature=0.0)
# 0.37B parameters (0.34B without the input embedding), Llama layout with untied embeddings.
RANDOM_LLAMA = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                 num_attention_heads=16, num_key_value_heads=16, vocab_size=32000,
                 max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False)
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MODELS = ("demo", "llama-0.37b-random", "smollm2-135m-instruct")
# Largest logprob gap a rounding difference between two engines explains: bf16 keeps 8 bits of
# mantissa, so logits of magnitude 10-30 sit 0.06-0.125 apart after every layer's rounding.
TIE_NATS = {"float32": 0.01, "bfloat16": 0.5}


@dataclass(frozen=True)
class RunTiming:
    prefill_s: float
    total_s: float
    outputs: list[list[int]]  # generated tokens per sequence


# -- machine ---------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    """``(fn(), seconds it took)``, waiting for the device on both ends."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - start


def best_time(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    return min(timed(fn, device)[1] for _ in range(repeats))


def measure_read_gbps(device: torch.device, num_bytes: int = 512 << 20) -> float:
    """Read bandwidth in GB/s: summing a tensor much larger than any cache."""
    x = torch.ones(num_bytes // 4, dtype=torch.float32, device=device)
    return num_bytes / best_time(lambda: x.sum(), device, repeats=5) / 1e9


def measure_matmul_gflops(device: torch.device, dtype: torch.dtype, n: int = 2048) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return 2 * n**3 / best_time(lambda: a @ b, device, repeats=5) / 1e9


def has_fast_bf16(device: torch.device) -> bool:
    """bf16 matmuls run natively (CUDA with bf16, or a CPU with AVX512-BF16/AMX and oneDNN)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_has_native_bf16()


# -- models ----------------------------------------------------------------------------------
def build_random_llama(path: Path) -> Path:
    """Save a Llama with seeded random weights (transformers' own init) to ``path``."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**RANDOM_LLAMA, bos_token_id=1, eos_token_id=2)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(path)
    return path


def load_hf(model_dir: Path, dtype: str, device: torch.device):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=TORCH_DTYPES[dtype])
    return model.to(device).eval()


def weight_params(hf_model) -> int:
    """Parameters read per decode step: everything but an untied input embedding table."""
    embed = hf_model.get_input_embeddings().weight
    tied = embed is hf_model.get_output_embeddings().weight
    return sum(p.numel() for p in hf_model.parameters() if tied or p is not embed)


# -- engines -------------------------------------------------------------------------------
def run_pdserve(runner: ModelRunner, prompts: list[list[int]], new_tokens: int) -> RunTiming:
    """Prefill every prompt in one step, then one batched decode step per new token."""
    blocks_per_seq = -(-(len(prompts[0]) + new_tokens) // BLOCK_SIZE)
    allocator = BlockAllocator(runner.num_blocks, BLOCK_SIZE, enable_prefix_cache=False)
    tables = [allocator.allocate(blocks_per_seq) for _ in prompts]
    start = time.perf_counter()
    results = runner.step([SequenceChunk(p, 0, t, GREEDY, 0) for p, t in zip(prompts, tables)])
    outputs = [[r.token_id] for r in results]
    prefill_s = time.perf_counter() - start
    for i in range(1, new_tokens):
        chunks = [SequenceChunk([out[-1]], len(p) + i - 1, t, GREEDY, i)
                  for p, t, out in zip(prompts, tables, outputs)]
        for out, r in zip(outputs, runner.step(chunks)):
            out.append(r.token_id)
    total_s = time.perf_counter() - start  # step() returns Python ints: already synchronized
    for table in tables:
        allocator.free(table)
    return RunTiming(prefill_s, total_s, outputs)


def run_hf(model, prompts: list[list[int]], new_tokens: int, device: torch.device) -> RunTiming:
    input_ids = torch.tensor(prompts, device=device)
    mask = torch.ones_like(input_ids)
    # generate's own prefill keeps the logits of the last position only (``logits_to_keep``)
    # and fills a cache: time the same forward, or decode alone is overstated (at batch 32
    # the LM head over every prompt position costs about a third of the prefill).
    keep = {"logits_to_keep": 1} if model._supports_logits_to_keep() else {}
    with torch.inference_mode():
        _, prefill_s = timed(lambda: model(input_ids=input_ids, attention_mask=mask,
                                           use_cache=True, **keep), device)
        out, total_s = timed(lambda: model.generate(
            input_ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, pad_token_id=0), device)
    return RunTiming(prefill_s, total_s, out[:, input_ids.shape[1]:].tolist())


def tie_gaps(hf_model, prompts: list[list[int]], ours: list[list[int]], theirs: list[list[int]],
             device: torch.device) -> list[float]:
    """For each sequence whose greedy tokens differ: |transformers' logprob of its token minus
    that of pdserve's| at the first differing step, from one forward over the common context."""
    gaps = []
    for prompt, mine, hf in zip(prompts, ours, theirs):
        step = next((i for i, (a, b) in enumerate(zip(mine, hf)) if a != b), None)
        if step is None:
            continue
        context = torch.tensor([prompt + mine[:step]], device=device)
        with torch.inference_mode():
            logprobs = torch.log_softmax(hf_model(input_ids=context).logits[0, -1].float(), -1)
        gaps.append(round(abs(float(logprobs[hf[step]] - logprobs[mine[step]])), 4))
    return gaps


def fastest(runs: list[RunTiming]) -> RunTiming:
    return min(runs, key=lambda r: r.total_s)


# -- benchmark --------------------------------------------------------------------------------
def bench_model(name: str, model_dir: Path, dtype: str, device: torch.device, batches: list[int],
                new_tokens: int, repeats: int, machine: dict, eager: bool) -> list[dict]:
    hf_model = load_hf(model_dir, dtype, device)
    params = weight_params(hf_model)
    vocab_size = hf_model.config.vocab_size
    blocks_per_seq = -(-(PROMPT_LEN + new_tokens) // BLOCK_SIZE)
    runner = ModelRunner(model_dir, dtype=dtype, device=device, block_size=BLOCK_SIZE,
                         num_blocks=max(batches) * blocks_per_seq,
                         pool_backend="cuda" if device.type == "cuda" else "heap",
                         enforce_eager=eager, compile_buckets=batches)
    if runner.decoder is not None:
        print(f"{name} {dtype}: decode graphs compiled (or loaded) in "
              f"{sum(runner.decoder.compile_seconds.values()):.1f} s", flush=True)
    rng = np.random.default_rng(0)
    warmup = [rng.integers(0, vocab_size, PROMPT_LEN).tolist()]
    run_pdserve(runner, warmup, 4)
    run_hf(hf_model, warmup, 4, device)
    rows = []
    for batch in batches:
        prompts = rng.integers(0, vocab_size, (batch, PROMPT_LEN)).tolist()
        ours = fastest([run_pdserve(runner, prompts, new_tokens) for _ in range(repeats)])
        theirs = fastest([run_hf(hf_model, prompts, new_tokens, device) for _ in range(repeats)])
        gaps = tie_gaps(hf_model, prompts, ours.outputs, theirs.outputs, device)
        rows.append(make_row(name, dtype, batch, new_tokens, params, ours, theirs, machine, gaps))
        print_row(rows[-1])
    runner.close()
    del runner, hf_model
    gc.collect()
    return rows


def make_row(name: str, dtype: str, batch: int, new_tokens: int, params: int, ours: RunTiming,
             theirs: RunTiming, machine: dict, gaps: list[float]) -> dict:
    generated = batch * new_tokens
    decoded = batch * (new_tokens - 1)
    ours_decode = decoded / (ours.total_s - ours.prefill_s)
    theirs_decode = decoded / (theirs.total_s - theirs.prefill_s)
    if batch == 1:
        weight_bytes = params * TORCH_DTYPES[dtype].itemsize
        roofline = weight_bytes * ours_decode / (machine["read_gbps"] * 1e9)
    else:
        rate = machine.get(f"matmul_gflops_{dtype}", machine["matmul_gflops"])
        roofline = 2 * params * ours_decode / (rate * 1e9)
    same = sum(a == b for a, b in zip(ours.outputs, theirs.outputs))
    return {
        "model": name, "dtype": dtype, "batch": batch,
        "prompt_len": PROMPT_LEN, "new_tokens": new_tokens, "params": params,
        "pdserve_tok_s": round(generated / ours.total_s, 2),
        "hf_tok_s": round(generated / theirs.total_s, 2),
        "ratio": round(theirs.total_s / ours.total_s, 3),
        "roofline_fraction": round(roofline, 3),
        "pdserve_prefill_s": round(ours.prefill_s, 4),
        "hf_prefill_s": round(theirs.prefill_s, 4),
        "pdserve_decode_tok_s": round(ours_decode, 2),
        "hf_decode_tok_s": round(theirs_decode, 2),
        "greedy_match": round(same / batch, 3),
        "tie_gaps": gaps,
        "near_ties": all(g <= TIE_NATS[dtype] for g in gaps),
    }


HEADER = (f"{'model':<18} {'dtype':<9} {'batch':>5} {'pdserve tok/s':>13} {'hf tok/s':>9} "
          f"{'ratio':>6} {'pd decode':>10} {'hf decode':>10} {'pd/hf prefill s':>16} "
          f"{'roofline':>8} {'match':>6}  first differences")


def print_row(row: dict) -> None:
    prefill = f"{row['pdserve_prefill_s']:.3f}/{row['hf_prefill_s']:.3f}"
    print(f"{row['model']:<18} {row['dtype']:<9} {row['batch']:>5} {row['pdserve_tok_s']:>13.1f} "
          f"{row['hf_tok_s']:>9.1f} {row['ratio']:>6.2f} {row['pdserve_decode_tok_s']:>10.1f} "
          f"{row['hf_decode_tok_s']:>10.1f} {prefill:>16} {row['roofline_fraction']:>8.3f} "
          f"{row['greedy_match']:>6.2f}  {differences(row)}", flush=True)


def differences(row: dict) -> str:
    """How the sequences that differ from transformers' first differ."""
    gaps = row["tie_gaps"]
    if not gaps:
        return "-"
    verdict = "near-ties (rounding)" if row["near_ties"] else "NOT near-ties: check the engine"
    return f"{len(gaps)} at logprob gaps <= {max(gaps):.3f}: {verdict}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 16 new tokens, demo model only")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--threads", type=int, default=threads_per_rank(1),
                        help="torch threads (default: what the launcher gives one worker here)")
    parser.add_argument("--enforce-eager", action="store_true", help="pdserve without compiling")
    parser.add_argument("--dtypes", default=None,
                        help="comma-separated subset of float32,bfloat16 (default: float32, and "
                             "bfloat16 where it is fast; always both for smollm2-135m-instruct)")
    parser.add_argument("--new-tokens", type=int, default=None,
                        help="tokens generated per sequence (default: 128; 16 with --quick)")
    args = parser.parse_args(argv)
    names = [m for m in args.models.split(",") if m]
    if not names or any(m not in MODELS for m in names):
        parser.error(f"--models takes a comma-separated subset of {','.join(MODELS)}")
    only = None if args.dtypes is None else [d for d in args.dtypes.split(",") if d]
    if only is not None and (not only or any(d not in TORCH_DTYPES for d in only)):
        parser.error(f"--dtypes takes a comma-separated subset of {','.join(TORCH_DTYPES)}")
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.new_tokens is not None and args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (one prefill token, then decode)")
    torch.set_num_threads(args.threads)
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        parser.error(f"--device {args.device!r}: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA build of torch and a visible GPU")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda, got {args.device!r}")

    new_tokens = args.new_tokens or (16 if args.quick else 128)
    batches = [1, 8, 32]
    dtypes = only or ["float32"] + (["bfloat16"] if has_fast_bf16(device) else [])
    load_before = os.getloadavg()[0]
    if load_before > 0.5:
        print(f"warning: load average {load_before:.1f} before starting; other processes on "
              "this machine will skew the numbers", flush=True)
    machine = {"device": str(device), "threads": torch.get_num_threads(),
               "compiled": not args.enforce_eager, "native_bf16": has_fast_bf16(device),
               "load_avg_before": round(load_before, 2),
               "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
               "read_gbps": round(measure_read_gbps(device), 2),
               "matmul_gflops": round(measure_matmul_gflops(device, torch.float32), 1)}
    if "bfloat16" in dtypes:
        machine["matmul_gflops_bfloat16"] = round(measure_matmul_gflops(device, torch.bfloat16), 1)
    print(f"machine: {json.dumps(machine)}", flush=True)
    print(HEADER, flush=True)

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    results = []
    with tempfile.TemporaryDirectory(prefix="pdserve-bench-") as tmp:
        models = []
        if "demo" in names:
            models.append(("demo", lambda: demo_model_dir(), 2 if args.quick else 3, dtypes))
        if "llama-0.37b-random" in names and not args.quick:
            models.append(("llama-0.37b-random",
                           lambda: build_random_llama(Path(tmp) / "llama"), 1, dtypes))
        if "smollm2-135m-instruct" in names and not args.quick:
            models.append(("smollm2-135m-instruct", real_model_dir, 1, ["float32", "bfloat16"]))
        for name, make_dir, repeats, model_dtypes in models:
            model_dir = make_dir()
            for dtype in (d for d in model_dtypes if only is None or d in only):
                results += bench_model(name, model_dir, dtype, device, batches, new_tokens,
                                       repeats, machine, args.enforce_eager)
    if args.json:
        args.json.write_text(json.dumps({"results": results, "machine": machine}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
