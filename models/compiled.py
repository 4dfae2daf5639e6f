"""Decode steps through ``torch.compile``: one graph of decoder layers per padded batch bucket.

A decode step of a 135M-parameter model runs hundreds of small ops; eager PyTorch spends more
time dispatching them than the CPU spends reading the weights. A compiled graph fuses the
pointwise work (norms, rotary, SiLU, residual adds) around the matmuls. Every decoder layer
has the same shapes, so one graph of ``k`` layers (their weights and pool tensors are inputs)
serves every run of ``k`` consecutive layers: the model's layers split into equal groups
(``layers_per_graph``), and a step calls the graph once per group. Shapes are static per
bucket: a batch of ``n`` decode tokens is padded to the smallest bucket ``>= n`` (padded rows
attend to nothing and write no K/V, see ``models.step_attention``), so the number of graphs
is bounded by the number of buckets.
Steps that carry prefill chunks, or more decode tokens than the largest bucket, run eager:
their matmuls are large enough that per-op overhead does not matter.

CUDA runs the same graphs (Triton kernels) but does not capture them as CUDA graphs: a graph
replays fixed shapes and addresses, while the attention op gathers each step's blocks with
tensors whose lengths change every step; that needs a paged-attention kernel over fixed-shape
block tables first. Compiled artifacts are cached on disk (Inductor's FX graph and AOT caches) under
``$PDSERVE_CACHE/inductor`` (default ``~/.cache/pdserve/inductor``), so a restarted worker
loads its graphs instead of compiling them again.
"""
from __future__ import annotations

import logging
import os
import time
import types
from pathlib import Path

import torch

from models.llama import run_decoder_layers

log = logging.getLogger("pdserve.compile")

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32)
# Layers one graph runs. Each call into a graph costs about 0.2 ms of guards and wrappers on
# CPU, while a bigger graph takes longer to compile, and to trace again at every start even when
# Inductor's cache has its code. SmolLM2 (30 layers), one thread (bench/decode_step.py,
# interleaved): a batch-1 step takes 65.0 ms in 30 calls, 60.4 ms in 5 calls of 6, 60.0 ms in 2
# calls of 15; the six buckets' graphs compile from an empty cache in 41 s, 58 s and 68 s, and
# load from the cache in 5-7 s, 8-11 s and 15 s.
MAX_LAYERS_PER_GRAPH = 8
CACHE_ENV = "PDSERVE_CACHE"


def cache_root() -> Path:
    """``$PDSERVE_CACHE`` or ``~/.cache/pdserve``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "pdserve")


def enable_compile_cache() -> Path:
    """Point Inductor's on-disk caches at pdserve's cache directory (unless the user chose
    another with ``TORCHINDUCTOR_CACHE_DIR``) and return it."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    path = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    # Inductor writes its default into the environment on first use: that is not a choice.
    if not path or os.path.abspath(path) == os.path.abspath(default_cache_dir()):
        path = str(cache_root() / "inductor")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    return Path(path)


def buckets_up_to(max_num_seqs: int) -> tuple[int, ...]:
    """The buckets a worker that runs at most ``max_num_seqs`` sequences needs: the defaults
    below it, then ``max_num_seqs`` itself (a bigger graph would never run, and each costs
    seconds to compile or load at start)."""
    if max_num_seqs >= DEFAULT_BUCKETS[-1]:
        return DEFAULT_BUCKETS
    return tuple(b for b in DEFAULT_BUCKETS if b < max_num_seqs) + (max_num_seqs,)


def check_buckets(buckets) -> tuple[int, ...]:
    """Sorted, de-duplicated positive bucket sizes. Raises ``ValueError`` otherwise."""
    try:
        values = sorted({int(b) for b in buckets})
    except (TypeError, ValueError):
        raise ValueError(f"compile buckets must be positive integers, got {buckets!r}") from None
    if not values or values[0] <= 0 or any(isinstance(b, bool) for b in buckets):
        raise ValueError(f"compile buckets must be positive integers, got {buckets!r}")
    return tuple(values)


class CompiledDecoder:
    """Runs decode-only steps of ``model`` (already bound to its ``StepAttention``) through
    one compiled graph per bucket. ``logits(input_ids, positions)`` returns float32 logits
    ``[n, vocab]`` for every row, or ``None`` when ``n`` exceeds the largest bucket."""

    def __init__(self, model: torch.nn.Module, buckets=DEFAULT_BUCKETS):
        self.model = model
        self.buckets = check_buckets(buckets)
        self.compile_seconds: dict[int, float] = {}  # bucket -> first-call time
        enable_compile_cache()
        import torch._dynamo.config as dynamo_config

        # One graph per bucket must fit in Dynamo's per-function cache.
        limit = len(self.buckets) + 2
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, limit)
        dynamo_config.cache_size_limit = max(dynamo_config.cache_size_limit, limit)
        # Dynamo caches graphs per code object: a code object of its own per decoder keeps
        # the graphs of two runners in one process (tests, benchmarks) from sharing a cache.
        code = run_decoder_layers.__code__.replace(co_name=f"_run_group_{id(self):x}")
        self.group_fn = types.FunctionType(code, run_decoder_layers.__globals__, code.co_name)
        self._run_group = torch.compile(self.group_fn, dynamic=False, fullgraph=True)
        layers = tuple(model.model.layers)
        size = layers_per_graph(len(layers), MAX_LAYERS_PER_GRAPH)
        self.groups = [layers[i:i + size] for i in range(0, len(layers), size)]

    def bucket_for(self, num_tokens: int) -> int | None:
        """The smallest bucket holding ``num_tokens`` rows, or None."""
        return next((b for b in self.buckets if b >= num_tokens), None)

    def logits(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
        n = input_ids.shape[0]
        bucket = self.bucket_for(n)
        if bucket is None:
            return None
        if bucket != n:  # padded rows: token 0 at position 0; the attention op skips them
            pad = bucket - n
            input_ids = torch.cat([input_ids, input_ids.new_zeros(pad)])
            positions = torch.cat([positions, positions.new_zeros(pad)])
        if bucket in self.compile_seconds:
            # The graph for this shape exists: check only the guards that tell the cached
            # graphs apart (shapes), not all of them, on each of the per-layer calls.
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                return self._forward(input_ids, positions)[:n]
        start = time.perf_counter()
        out = self._forward(input_ids, positions)[:n]
        self.compile_seconds[bucket] = round(time.perf_counter() - start, 2)
        log.info("compiled the decode graph for batch bucket %d in %.1f s (cache %s)", bucket,
                 self.compile_seconds[bucket], os.environ.get("TORCHINDUCTOR_CACHE_DIR"))
        return out

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids, positions, run_layers=self._run_layers)
        return self.model.compute_logits(hidden)

    def _run_layers(self, layers, x, residual, cos, sin):
        # ``layers`` is the model's layer list, which ``self.groups`` splits in order.
        for group in self.groups:
            x, residual = self._run_group(group, x, residual, cos, sin)
        return x, residual


def layers_per_graph(num_layers: int, most: int) -> int:
    """The largest divisor of ``num_layers`` up to ``most``: equal groups share one graph."""
    return max(d for d in range(1, min(num_layers, most) + 1) if num_layers % d == 0)
