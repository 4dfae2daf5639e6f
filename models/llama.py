"""The Llama family (Llama 2/3, Mistral, Qwen2/2.5, Qwen3), tensor-parallel, paged KV.

Module and parameter names follow the Hugging Face checkpoints, except the fused
projections listed in ``LlamaForCausalLM.packed_modules_mapping``.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from models.attention import PagedAttention
from models.config import ModelConfig
from models.embedding import ParallelLMHead, VocabParallelEmbedding
from models.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from models.norm import RMSNorm
from models.parallel import SINGLE, ParallelContext
from models.rotary import RotaryEmbedding, apply_rotary
from models.step_attention import StepAttention, paged_attention

class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, ctx: ParallelContext):
        super().__init__()
        self.layer_idx = layer_idx
        # Set by LlamaForCausalLM.bind_attention. The pool tensors are buffers so a compiled
        # layer takes them as inputs: one graph serves every layer.
        self.attn_handle = 0
        self.register_buffer("k_cache", None, persistent=False)
        self.register_buffer("v_cache", None, persistent=False)
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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
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
        out = paged_attention(q, k, v, self.k_cache, self.v_cache, self.attn_handle,
                              self.layer_idx)  # [T, hq, D]
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
        self.self_attn = LlamaAttention(config, layer_idx, ctx)
        self.mlp = LlamaMLP(config, ctx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, residual, cos, sin):
        x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, cos, sin)
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

    def bind_attention(self, state: StepAttention) -> None:
        """Route every layer's attention to ``state`` (its KV pool and step metadata)."""
        for layer, (k_cache, v_cache) in zip(self.model.layers, state.kv_caches):
            layer.self_attn.attn_handle = state.handle
            layer.self_attn.k_cache, layer.self_attn.v_cache = k_cache, v_cache

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                run_layers=None) -> torch.Tensor:
        """input_ids, positions ``[T]`` -> final hidden states ``[T, hidden]``.

        ``run_layers(layers, x, residual, cos, sin) -> (x, residual)``, when given, runs the
        decoder layers instead of calling them one by one (compiled graphs, see
        ``models.compiled``).

        Attention goes to the bound ``StepAttention``, which writes each layer's K/V into
        its pool and then calls its ``on_layer_done(layer)``. On CUDA the write is queued on
        the current stream: a consumer on another stream or thread must synchronize first.
        """
        cos, sin = self.rotary.lookup(positions)
        x = self.model.embed_tokens(input_ids)
        # A zero residual (x + 0 == x exactly) keeps the first layer's graph like the others.
        residual = torch.zeros_like(x)
        x, residual = (run_layers or run_decoder_layers)(self.model.layers, x, residual, cos, sin)
        x, _ = self.model.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden ``[N, hidden]`` -> float32 logits ``[N, vocab]``; pass only rows to sample."""
        return self.lm_head(hidden).float()


def run_decoder_layers(layers, x, residual, cos, sin):
    """Run ``layers`` in order; returns the last one's ``(x, residual)``."""
    for layer in layers:
        x, residual = layer(x, residual, cos, sin)
    return x, residual
