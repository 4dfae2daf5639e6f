"""The Llama family (Llama 2/3, Mistral, Qwen2/2.5, Qwen3), tensor-parallel, paged KV.

Module and parameter names follow the Hugging Face checkpoints, except the fused
projections listed in ``LlamaForCausalLM.packed_modules_mapping``.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from models.attention import AttentionMetadata, PagedAttention
from models.config import ModelConfig
from models.embedding import ParallelLMHead, VocabParallelEmbedding
from models.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from models.norm import RMSNorm
from models.parallel import SINGLE, ParallelContext
from models.rotary import RotaryEmbedding, apply_rotary

KVCache = tuple[torch.Tensor, torch.Tensor]


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, ctx: ParallelContext):
        super().__init__()
        d = config.head_dim
        self.qkv_proj = QKVParallelLinear(config.hidden_size, d, config.num_heads,
                                          config.num_kv_heads, config.attention_bias, ctx)
        self.o_proj = RowParallelLinear(config.num_heads * d, config.hidden_size, False, ctx)
        self.num_heads = self.qkv_proj.num_local_heads
        self.num_kv_heads = self.qkv_proj.num_local_kv_heads
        self.head_dim = d
        if config.qk_norm:
            self.q_norm = RMSNorm(d, config.rms_norm_eps)
            self.k_norm = RMSNorm(d, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, d, d ** -0.5)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        num_tokens = x.shape[0]
        hq, hkv = self.num_heads, self.num_kv_heads
        qkv = self.qkv_proj(x).view(num_tokens, hq + 2 * hkv, self.head_dim)
        if self.q_norm is not None:
            q = apply_rotary(self.q_norm(qkv[:, :hq]), cos, sin)  # [T, hq, D]
            k = apply_rotary(self.k_norm(qkv[:, hq:hq + hkv]), cos, sin)  # [T, hkv, D]
        else:  # q and k heads are adjacent: rotate them in one pass
            qk = apply_rotary(qkv[:, :hq + hkv], cos, sin)
            q, k = qk[:, :hq], qk[:, hq:]
        v = qkv[:, hq + hkv:]
        out = self.attn(q, k, v, kv_cache, meta)  # [T, hq, D]
        return self.o_proj(out.view(num_tokens, hq * self.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, ctx: ParallelContext):
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [size, size], False, ctx)
        self.down_proj = RowParallelLinear(size, config.hidden_size, False, ctx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, ctx: ParallelContext):
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = LlamaAttention(config, ctx)
        self.mlp = LlamaMLP(config, ctx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, residual, cos, sin, kv_cache: KVCache, meta: AttentionMetadata,
                on_layer_done: Callable[[int], None] | None):
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, cos, sin, kv_cache, meta)
        if on_layer_done is not None:  # this layer's K/V is in the pool: let it ship now
            on_layer_done(self.layer_idx)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, ctx: ParallelContext):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, ctx)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i, ctx)
                                    for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Causal LM over a paged KV pool. Build on the meta device, then materialize and load
    with ``models.loader.load_model``."""

    # checkpoint projection name -> (fused parameter, shard id)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: ModelConfig, ctx: ParallelContext = SINGLE):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, ctx)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, ctx)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary: RotaryEmbedding | None = None

    def init_rotary(self, max_positions: int, dtype: torch.dtype, device) -> None:
        """Precompute the rope table for positions ``[0, max_positions)``."""
        c = self.config
        self.rotary = RotaryEmbedding(c.head_dim, max_positions, c.rope_theta, c.rope_scaling,
                                      dtype=dtype, device=device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata, kv_caches: list[KVCache],
                on_layer_done: Callable[[int], None] | None = None) -> torch.Tensor:
        """input_ids, positions ``[T]`` -> final hidden states ``[T, hidden]``.

        Writes each layer's K/V into ``kv_caches[layer]`` and then calls
        ``on_layer_done(layer)``. On CUDA the write is queued on the current stream: a
        consumer on another stream or thread must synchronize before reading the blocks.
        """
        cos, sin = self.rotary.lookup(positions)
        x = self.model.embed_tokens(input_ids)
        residual = None
        for layer, kv_cache in zip(self.model.layers, kv_caches):
            x, residual = layer(x, residual, cos, sin, kv_cache, meta, on_layer_done)
        x, _ = self.model.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden ``[N, hidden]`` -> float32 logits ``[N, vocab]``; pass only rows to sample."""
        return self.lm_head(hidden).float()
