"""How a layer reaches its step's attention metadata and KV pool, eager or compiled.

A compiled graph cannot take the per-step metadata (Python lists, varying lengths, a
callback) as inputs without recompiling whenever it changes. So the model's layers call one
opaque custom op, ``pdserve::paged_attention(q, k, v, k_cache, v_cache, handle)``: the graph
sees fixed shapes only (every layer the same ones, so one graph serves all layers), and the
op finds the step's metadata through ``handle``, the id of a ``StepAttention`` that its
runner registered. The runner sets the step's metadata before each forward and clears it
after; the same object serves eager and compiled forwards, so there is one model code path.

Padded rows (a decode batch padded to a compiled bucket) sit after the real rows: their K/V
is never written (the slot mapping covers real rows only) and their output is zero.
"""
from __future__ import annotations

import itertools
import weakref
from typing import Callable

import torch

from models.attention import AttentionMetadata, PagedAttention

KVCache = tuple[torch.Tensor, torch.Tensor]

# handle -> StepAttention. Weak: a closed runner's state goes away with it.
_REGISTRY: "weakref.WeakValueDictionary[int, StepAttention]" = weakref.WeakValueDictionary()
_NEXT_HANDLE = itertools.count(1)


class StepAttention:
    """One runner's KV pool and, while a forward runs, its step's metadata."""

    def __init__(self, kv_caches: list[KVCache], attention: list[PagedAttention]):
        self.kv_caches = kv_caches
        self.attention = attention  # per layer
        self.meta: AttentionMetadata | None = None
        self.on_layer_done: Callable[[int], None] | None = None
        self.handle = next(_NEXT_HANDLE)
        _REGISTRY[self.handle] = self

    def begin(self, meta: AttentionMetadata,
              on_layer_done: Callable[[int], None] | None = None) -> None:
        self.meta, self.on_layer_done = meta, on_layer_done

    def end(self) -> None:
        self.meta = self.on_layer_done = None

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache,
               layer: int | None = None) -> torch.Tensor:
        """Write the real rows' K/V into the layer's pool tensors and attend; q ``[T, heads,
        D]`` -> ``[T, heads, D]`` (zero past the real rows). With ``layer``, then call
        ``on_layer_done(layer)`` (compiled graphs run decode steps, which nobody streams)."""
        meta = self.meta
        if meta is None:
            raise RuntimeError("attention ran outside a step: call begin() first")
        num_real = meta.slot_mapping.numel()
        attention = self.attention[0 if layer is None else layer]
        if q.shape[0] == num_real:
            out = attention(q, k, v, kv_cache, meta)
        else:
            out = q.new_zeros(q.shape)
            out[:num_real] = attention(q[:num_real], k[:num_real], v[:num_real], kv_cache, meta)
        if layer is not None and self.on_layer_done is not None:
            self.on_layer_done(layer)  # this layer's K/V is in the pool: let it ship now
        return out


@torch.library.custom_op("pdserve::paged_attention", mutates_args=())
def _paged_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        k_cache: torch.Tensor, v_cache: torch.Tensor,
                        handle: int) -> torch.Tensor:
    # The pool write is a side effect that nothing in the graph reads (declaring the pool
    # mutated would make the functionalized graph copy it); the output depends on q, k, v,
    # so the op keeps its place between the ops around it.
    return _REGISTRY[handle].attend(q, k, v, (k_cache, v_cache))


@_paged_attention_op.register_fake
def _(q, k, v, k_cache, v_cache, handle):
    return torch.empty_like(q)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, handle: int, layer: int) -> torch.Tensor:
    """Attention of ``layer`` (pool tensors ``k_cache``, ``v_cache``) for the step
    registered under ``handle``."""
    if torch.compiler.is_compiling():
        return _paged_attention_op(q, k, v, k_cache, v_cache, handle)
    # Eager: skip the dispatcher, and let the layer's K/V ship as soon as it is written.
    return _REGISTRY[handle].attend(q, k, v, (k_cache, v_cache), layer)
