"""Paged attention over the KV pool, for a packed batch of prefill chunks and decode tokens.

A step's tokens are laid out as ``[prefill chunk 0 | prefill chunk 1 | ... | decode tokens]``:
each prefill chunk (more than one query token, possibly on top of cached tokens) attends on
its own; all decode tokens (one query each) attend together in one padded SDPA call. The
metadata is built once per step (``models.batch``) and shared by every layer.

Pool layout per layer: K and V each ``[num_blocks, block_size, num_kv_heads, head_dim]``;
token ``pos`` of a sequence lives in slot ``block_table[pos // block_size] * block_size +
pos % block_size``. Block tables need not be contiguous or ordered.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PrefillSlice:
    """One prefill chunk: query rows ``[start, start + num_tokens)`` of the step."""

    start: int
    num_tokens: int
    # None: no cached tokens, attend causally to this chunk's own fresh K/V.
    # Otherwise the chunk's whole context is gathered from the pool by these blocks.
    context_blocks: torch.Tensor | None  # [num_context_blocks] int64
    context_len: int
    # None: plain causal over fresh K/V. Else [num_tokens, context_len] bool, True = attend.
    mask: torch.Tensor | None


class GatherWorkspace:
    """Reusable memory for K/V gathered by block table, one buffer each for K and V.

    On CPU a large fresh tensor is page-faulted in on every use (several times the cost of
    the copy itself); one buffer, grown as needed, serves every layer of every step. A
    gathered tensor is valid until the next ``gather`` into the same buffer.
    """

    def __init__(self) -> None:
        self._buffers: list[torch.Tensor | None] = [None, None]

    def gather(self, which: int, cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
        """``cache[block_ids]`` (``which``: 0 for K, 1 for V) -> ``[n, *cache.shape[1:]]``."""
        shape = (block_ids.numel(), *cache.shape[1:])
        numel = shape[0] * cache[0].numel()
        buf = self._buffers[which]
        if buf is None or buf.numel() < numel or buf.dtype != cache.dtype \
                or buf.device != cache.device:
            grown = numel if buf is None else max(numel, buf.numel() * 3 // 2)
            buf = self._buffers[which] = torch.empty(grown, dtype=cache.dtype, device=cache.device)
        out = buf[:numel].view(shape)
        return torch.index_select(cache, 0, block_ids, out=out)


@dataclass
class AttentionMetadata:
    """Everything a layer needs to place and read K/V for one step."""

    slot_mapping: torch.Tensor  # [num_tokens] int64: pool slot of every new token
    prefills: list[PrefillSlice]
    num_prefill_tokens: int  # decode rows start here
    num_decodes: int = 0
    decode_block_ids: torch.Tensor | None = None  # [num_decodes * max_blocks] int64, row-major
    decode_context_len: int = 0  # longest decode context; gathered keys are cut to it
    decode_mask: torch.Tensor | None = None  # [num_decodes, 1, 1, decode_context_len] bool
    workspace: GatherWorkspace | None = None  # None: gather into fresh tensors


class PagedAttention:
    """Attention of one layer's local heads; writes this step's K/V into the pool first."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.enable_gqa = num_heads != num_kv_heads

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 kv_cache: tuple[torch.Tensor, torch.Tensor],
                 meta: AttentionMetadata) -> torch.Tensor:
        """q ``[T, num_heads, head_dim]``, k/v ``[T, num_kv_heads, head_dim]`` -> ``[T,
        num_heads, head_dim]``. ``kv_cache`` is the layer's (K, V) pool tensors."""
        k_cache, v_cache = kv_cache
        self._write(k, v, k_cache, v_cache, meta.slot_mapping)
        if not meta.prefills:  # decode-only step: nothing to scatter
            return self._decode(q, k_cache, v_cache, meta)
        out = torch.empty_like(q)
        for p in meta.prefills:
            end = p.start + p.num_tokens
            if p.context_blocks is None:
                k_ctx, v_ctx = k[p.start:end], v[p.start:end]
            else:  # [context_len, num_kv_heads, head_dim] gathered by block table
                k_ctx = _gather(meta, 0, k_cache, p.context_blocks).flatten(0, 1)[:p.context_len]
                v_ctx = _gather(meta, 1, v_cache, p.context_blocks).flatten(0, 1)[:p.context_len]
            # [1, heads, len, head_dim] views for SDPA
            o = self._sdpa(q[p.start:end].transpose(0, 1).unsqueeze(0),
                           k_ctx.transpose(0, 1).unsqueeze(0), v_ctx.transpose(0, 1).unsqueeze(0),
                           p.mask, is_causal=p.mask is None)
            out[p.start:end] = o[0].transpose(0, 1)
        if meta.num_decodes:
            out[meta.num_prefill_tokens:] = self._decode(q[meta.num_prefill_tokens:], k_cache,
                                                         v_cache, meta)
        return out

    def _decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """All decode rows in one padded SDPA: q ``[B, heads, D]`` -> ``[B, heads, D]``."""
        n, length = meta.num_decodes, meta.decode_context_len
        # [B * max_blocks, block_size, kv_heads, D] -> [B, kv_heads, length, D]
        k_ctx = _gather(meta, 0, k_cache, meta.decode_block_ids).view(n, -1, *k_cache.shape[2:])
        v_ctx = _gather(meta, 1, v_cache, meta.decode_block_ids).view(n, -1, *v_cache.shape[2:])
        o = self._sdpa(q.unsqueeze(2), k_ctx[:, :length].transpose(1, 2),
                       v_ctx[:, :length].transpose(1, 2), meta.decode_mask, is_causal=False)
        return o.reshape(n, self.num_heads, self.head_dim)  # from [B, heads, 1, D]

    @staticmethod
    def _write(k, v, k_cache, v_cache, slot_mapping) -> None:
        num_kv_heads, head_dim = k_cache.shape[-2:]
        k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
        v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)

    def _sdpa(self, q, k, v, mask, is_causal: bool) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                              scale=self.scale, enable_gqa=self.enable_gqa)


def _gather(meta: AttentionMetadata, which: int, cache: torch.Tensor,
            block_ids: torch.Tensor) -> torch.Tensor:
    # index_select of whole blocks: one memcpy each, far faster than a 2-D advanced index.
    if meta.workspace is None:
        return cache.index_select(0, block_ids)
    return meta.workspace.gather(which, cache, block_ids)
