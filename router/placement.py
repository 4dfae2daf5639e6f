"""Where a request runs, and what it holds there while it does.

``place`` picks the decode worker (its KV reservation) and the prefill worker (the writer of
that KV) for one attempt; ``reserve`` and ``release`` keep each worker's load counters equal
to the sums over the live requests counted against it (``reserved_blocks`` and
``num_decoding`` on the decode side, ``outstanding_tokens`` and ``num_prefilling`` on the
prefill side), released exactly once however the attempt ends.
"""
from __future__ import annotations

from dataclasses import dataclass

from kvtransfer.allocator import block_hashes
from kvtransfer.spec import reservation_blocks
from router.policy import pick_decode, pick_prefill
from router.request import Request
from router.workers import WorkerRecord, WorkerRegistry


@dataclass(frozen=True)
class Placement:
    decode: WorkerRecord
    prefill: WorkerRecord   # ``decode`` itself when it does both (colocated)
    transport: str          # "local" when colocated
    prompt_hashes: list[int]
    num_blocks: int


def anything_fits(registry: WorkerRegistry) -> bool:
    """False when no request at all can be placed now: no model registered yet, or no live
    decode worker with room."""
    if registry.kv_spec is None or registry.max_model_len() is None:
        return False
    return any(w.can_decode and not w.is_full and w.free_blocks_estimate > 0 for w in registry.alive())


def place(registry: WorkerRegistry, req: Request) -> Placement | None:
    """Workers for the next attempt of ``req`` (``anything_fits`` must hold), or None if it
    does not fit now."""
    spec = registry.kv_spec
    context = req.context_ids
    num_blocks = reservation_blocks(len(context), req.spec.max_tokens, len(req.output_ids),
                                    registry.max_model_len(), spec.block_size)
    alive = registry.alive()
    decode = pick_decode(alive, num_blocks)
    if decode is None:
        return None
    if decode.role == "both":
        return Placement(decode, decode, "local", [], num_blocks)
    hashes = block_hashes(context, spec.block_size)
    candidates = [w for w in alive if w.role == "prefill" and registry.transport_for(w, decode) is not None]
    prefill = pick_prefill(candidates, len(context), hashes, spec.block_size)
    if prefill is None:
        return None
    return Placement(decode, prefill, registry.transport_for(prefill, decode) or "", hashes, num_blocks)


def reserve(req: Request, placement: Placement) -> None:
    """Count ``req``'s attempt against the workers of ``placement``."""
    req.decode, req.prefill = placement.decode, placement.prefill
    req.prompt_hashes = placement.prompt_hashes
    req.num_blocks, req.prefill_tokens = placement.num_blocks, len(req.context_ids)
    placement.decode.reserved_blocks += placement.num_blocks
    placement.decode.num_decoding += 1
    placement.prefill.outstanding_tokens += req.prefill_tokens
    placement.prefill.num_prefilling += 1


def release_prefill(req: Request) -> None:
    """The prefill side of the attempt is over (its first token came, or the attempt ended)."""
    if req.prefill_tokens and req.prefill is not None:
        req.prefill.outstanding_tokens -= req.prefill_tokens
        req.prefill.num_prefilling -= 1
        req.prefill_tokens = 0


def release(req: Request) -> None:
    """The attempt is over: nothing of it is counted against any worker any more."""
    release_prefill(req)
    if req.num_blocks and req.decode is not None:
        req.decode.reserved_blocks -= req.num_blocks
        req.decode.num_decoding -= 1
        req.decode.is_full = False
        req.num_blocks = 0
