"""ModelRunner: one TP rank's model, its paged KV pool, and one forward + sample per step."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from kvtransfer.pool import KVPool, num_blocks_for_budget
from kvtransfer.spec import KVSpec
from models.attention import GatherWorkspace
from models.batch import SampleResult, SequenceChunk, StepBatch, build_step_batch
from models.config import ModelConfig
from models.loader import DTYPES, load_model, resolve_dtype
from models.parallel import SINGLE, ParallelContext
from models.sampler import Sampler

__all__ = ["ModelRunner", "SampleResult", "SequenceChunk"]

DEFAULT_KV_BUDGET_BYTES = 1 << 30
# Without an explicit size, a pool never needs more than this many full-length sequences.
DEFAULT_MAX_FULL_SEQUENCES = 64


class ModelRunner:
    """Owns the model and its ``KVPool``; ``step`` runs a packed batch of prefill chunks and
    decode tokens, writes their K/V into the pool and samples the next tokens.

    ``num_blocks`` sizes the pool directly; otherwise ``kv_budget_bytes`` does (default
    1 GiB, capped at what 64 sequences of ``max_model_len`` need). ``max_model_len``
    defaults to the checkpoint's ``max_position_embeddings``.
    Raises ``ValueError`` on a bad checkpoint or option.
    """

    def __init__(self, model_dir: str | Path, *, dtype: str | torch.dtype = "auto",
                 device: str | torch.device = "cpu", tp: ParallelContext | None = None,
                 block_size: int = 16, num_blocks: int | None = None,
                 kv_budget_bytes: int | None = None, pool_backend: str = "heap",
                 max_model_len: int | None = None, shm_path: str | None = None):
        self.tp = tp or SINGLE
        self.device = torch.device(device)
        self.config = ModelConfig.from_pretrained(model_dir)
        if not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        self.max_model_len = self._check_max_model_len(max_model_len)
        self.block_size = block_size
        self.dtype = resolve_dtype(dtype, self.config)
        dtype_name = next(name for name, d in DTYPES.items() if d == self.dtype)
        self.kv_spec: KVSpec = self.config.kv_spec(block_size, dtype_name)
        if pool_backend == "cuda" and self.device.type != "cuda":
            raise ValueError(f"pool_backend='cuda' needs a CUDA device, got device={device!r}")
        if self.device.type == "cuda" and pool_backend != "cuda":
            raise ValueError(f"a model on {device} needs pool_backend='cuda', got {pool_backend!r}")
        self.model = load_model(model_dir, self.config, dtype=self.dtype, device=self.device,
                                ctx=self.tp, max_positions=self.max_model_len)
        num_blocks = self._num_blocks(num_blocks, kv_budget_bytes)
        self.pool = KVPool(self.kv_spec, num_blocks, tp_size=self.tp.world_size,
                           backend=pool_backend, device=self.device, shm_path=shm_path)
        self.kv_caches = [self.pool.layer(i) for i in range(self.config.num_layers)]
        self.sampler = Sampler()
        self.workspace = GatherWorkspace()

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def step(self, chunks: list[SequenceChunk],
             on_layer_done: Callable[[int], None] | None = None) -> list[SampleResult | None]:
        """Run one forward over ``chunks`` and sample a token for each chunk that has
        ``sampling``; ``None`` for the others. ``on_layer_done(layer)`` is called as soon
        as a layer's K/V is in the pool. Under TP every rank calls this with the same chunks.
        Raises ``ValueError`` for a malformed chunk (before anything is written).
        """
        with torch.inference_mode():
            batch = self._build(chunks)
            hidden = self.model(batch.input_ids, batch.positions, batch.attn, self.kv_caches,
                                on_layer_done)
            wanted = [i for i, c in enumerate(batch.chunks) if c.sampling is not None]
            results: list[SampleResult | None] = [None] * len(chunks)
            if not wanted:
                return results
            rows = torch.tensor([batch.last_rows[i] for i in wanted], device=self.device)
            logits = self.model.compute_logits(hidden[rows])  # [N, vocab] float32
            params = [batch.chunks[i].sampling for i in wanted]
            token_ids, logprobs = self.sampler.sample(
                logits, params, [batch.chunks[i].output_index for i in wanted])
            tops = self.sampler.top_logprobs(logits, [p.num_top_logprobs for p in params])
            for i, token_id, logprob, top in zip(wanted, token_ids.tolist(), logprobs.tolist(), tops):
                results[batch.order[i]] = SampleResult(token_id, logprob, top)
            return results

    def prompt_logits(self, chunks: list[SequenceChunk]) -> list[torch.Tensor]:
        """Like ``step`` but returns float32 logits ``[len(token_ids), vocab]`` at every
        position of each chunk (scoring and checks; writes K/V like ``step``)."""
        with torch.inference_mode():
            batch = self._build(chunks)
            hidden = self.model(batch.input_ids, batch.positions, batch.attn, self.kv_caches)
            logits = self.model.compute_logits(hidden)
            out: list[torch.Tensor] = [torch.empty(0)] * len(chunks)
            for i, c in enumerate(batch.chunks):
                end = batch.last_rows[i] + 1
                out[batch.order[i]] = logits[end - len(c.token_ids):end]
            return out

    def close(self) -> None:
        """Release the KV pool (and its shared-memory file)."""
        self.pool.close()

    # -- helpers ---------------------------------------------------------------------------
    def _build(self, chunks: list[SequenceChunk]) -> StepBatch:
        return build_step_batch(chunks, block_size=self.block_size, num_blocks=self.num_blocks,
                                max_model_len=self.max_model_len,
                                vocab_size=self.config.vocab_size, device=self.device,
                                sliding_window=self.config.sliding_window,
                                workspace=self.workspace)

    def _check_max_model_len(self, max_model_len: int | None) -> int:
        limit = self.config.max_position_embeddings
        if max_model_len is None:
            return limit
        if not isinstance(max_model_len, int) or isinstance(max_model_len, bool) \
                or max_model_len <= 0:
            raise ValueError(f"max_model_len must be a positive integer, got {max_model_len!r}")
        if max_model_len > limit:
            raise ValueError(f"max_model_len {max_model_len} exceeds the model's "
                             f"max_position_embeddings {limit}; lower --max-model-len")
        return max_model_len

    def _num_blocks(self, num_blocks: int | None, kv_budget_bytes: int | None) -> int:
        if num_blocks is not None and kv_budget_bytes is not None:
            raise ValueError("give num_blocks or kv_budget_bytes, not both")
        if num_blocks is not None:
            if not isinstance(num_blocks, int) or isinstance(num_blocks, bool) or num_blocks <= 0:
                raise ValueError(f"num_blocks must be a positive integer, got {num_blocks!r}")
            return num_blocks
        tp_size = self.tp.world_size
        if kv_budget_bytes is not None:
            return num_blocks_for_budget(self.kv_spec, kv_budget_bytes, tp_size)
        cap = DEFAULT_MAX_FULL_SEQUENCES * self.kv_spec.num_blocks_for(self.max_model_len)
        return min(cap, num_blocks_for_budget(self.kv_spec, DEFAULT_KV_BUDGET_BYTES, tp_size))
