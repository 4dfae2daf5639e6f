"""Turns a step's ``SequenceChunk``s into flat model inputs and attention metadata.

Layout: prefill chunks (more than one token) first, in the order given, then every
single-token chunk (decode) so decode rows are one contiguous run for batched attention.
``StepBatch.order`` maps rows back to the caller's chunk order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from models.attention import AttentionMetadata, GatherWorkspace, PrefillSlice
from models.sampler import SamplingParams


@dataclass
class SequenceChunk:
    """Tokens of one sequence to run this step.

    The tokens sit at positions ``num_cached .. num_cached + len(token_ids) - 1``; the
    first ``num_cached`` positions are already in the pool. ``block_table`` lists the pool
    blocks of the whole sequence so far (it must cover every position of this chunk).
    ``sampling=None``: no token wanted (a middle chunk of a chunked prefill).
    ``output_index``: how many tokens the request has generated before this one.
    """

    token_ids: list[int]
    num_cached: int
    block_table: list[int]
    sampling: SamplingParams | None = None
    output_index: int = 0


@dataclass(frozen=True)
class SampleResult:
    token_id: int
    logprob: float
    top_logprobs: list | None = None  # [[token_id, logprob], ...] when the request asked for them


@dataclass
class StepBatch:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    attn: AttentionMetadata
    order: list[int]  # order[i]: caller's index of the i-th laid-out chunk
    last_rows: list[int]  # row of each laid-out chunk's last token
    chunks: list[SequenceChunk]  # laid-out order


def build_step_batch(chunks: list[SequenceChunk], *, block_size: int, num_blocks: int,
                     max_model_len: int, vocab_size: int, device: torch.device,
                     sliding_window: int | None = None,
                     workspace: GatherWorkspace | None = None) -> StepBatch:
    """Validate ``chunks`` and lay them out. Raises ``ValueError`` naming the bad chunk."""
    if not chunks:
        raise ValueError("a step needs at least one chunk")
    for i, chunk in enumerate(chunks):
        _validate(i, chunk, block_size, num_blocks, max_model_len)
    order = [i for i, c in enumerate(chunks) if len(c.token_ids) > 1]
    order += [i for i, c in enumerate(chunks) if len(c.token_ids) == 1]
    laid_out = [chunks[i] for i in order]
    num_prefills = sum(1 for c in laid_out if len(c.token_ids) > 1)
    prefills, decodes = laid_out[:num_prefills], laid_out[num_prefills:]

    token_ids: list[int] = []
    for c in laid_out:
        token_ids.extend(c.token_ids)
    try:
        input_ids = torch.tensor(token_ids, dtype=torch.int64)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError("token ids must be integers") from None
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size:
        bad = next(t for t in token_ids if not 0 <= t < vocab_size)
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab_size})")

    positions, slots, slices, last_rows = [], [], [], []
    row = 0
    for c in prefills:
        n, cached = len(c.token_ids), c.num_cached
        context_len = cached + n
        pos = torch.arange(cached, context_len)
        table = torch.tensor(c.block_table[:-(-context_len // block_size)], dtype=torch.int64)
        positions.append(pos)
        slots.append(table[pos // block_size] * block_size + pos % block_size)
        windowed = sliding_window is not None and context_len > sliding_window
        mask = None
        if cached or windowed:
            key_pos = torch.arange(context_len)
            mask = key_pos[None, :] <= pos[:, None]  # [n, context_len]
            if windowed:
                mask &= key_pos[None, :] > pos[:, None] - sliding_window
            mask = mask.to(device)
        slices.append(PrefillSlice(start=row, num_tokens=n,
                                   context_blocks=table.to(device) if cached else None,
                                   context_len=context_len, mask=mask))
        row += n
        last_rows.append(row - 1)

    attn = AttentionMetadata(slot_mapping=torch.empty(0), prefills=slices, num_prefill_tokens=row,
                             workspace=workspace)
    if decodes:
        dec_pos = [c.num_cached for c in decodes]
        positions.append(torch.tensor(dec_pos, dtype=torch.int64))
        slots.append(torch.tensor([c.block_table[p // block_size] * block_size + p % block_size
                                   for c, p in zip(decodes, dec_pos)], dtype=torch.int64))
        context_lens = [p + 1 for p in dec_pos]
        max_len = max(context_lens)
        max_table = -(-max_len // block_size)
        # Pad with block 0: padded keys are masked out (or cut off when every length is equal).
        tables = []
        for c, n in zip(decodes, context_lens):
            num_used = -(-n // block_size)
            tables.append(c.block_table[:num_used] + [0] * (max_table - num_used))
        attn.num_decodes = len(decodes)
        attn.decode_block_ids = torch.tensor(tables, dtype=torch.int64, device=device).flatten()
        attn.decode_context_len = max_len
        windowed = sliding_window is not None and max_len > sliding_window
        if windowed or min(context_lens) != max_len:
            lens = torch.tensor(context_lens)[:, None]
            key_pos = torch.arange(max_len)[None, :]
            mask = key_pos < lens  # [B, max_len]
            if windowed:
                mask &= key_pos >= lens - sliding_window
            attn.decode_mask = mask[:, None, None, :].to(device)
        last_rows.extend(range(row, row + len(decodes)))
    attn.slot_mapping = torch.cat(slots).to(device)
    return StepBatch(input_ids=input_ids.to(device), positions=torch.cat(positions).to(device),
                     attn=attn, order=order, last_rows=last_rows, chunks=laid_out)


def _validate(i: int, c: SequenceChunk, block_size: int, num_blocks: int,
              max_model_len: int) -> None:
    n = len(c.token_ids)
    if n == 0:
        raise ValueError(f"chunk {i} has no tokens")
    if not isinstance(c.num_cached, int) or c.num_cached < 0:
        raise ValueError(f"chunk {i}: num_cached must be an integer >= 0, got {c.num_cached!r}")
    end = c.num_cached + n
    if end > max_model_len:
        raise ValueError(f"chunk {i} reaches position {end - 1}, past the maximum model "
                         f"length {max_model_len}; shorten the prompt or max_tokens")
    needed = -(-end // block_size)
    if len(c.block_table) < needed:
        raise ValueError(f"chunk {i} covers {end} tokens, which need {needed} blocks of "
                         f"{block_size}; its block table has {len(c.block_table)}")
    table = c.block_table[:needed]
    if min(table) < 0 or max(table) >= num_blocks:
        raise ValueError(f"chunk {i}: block table {table} has ids outside the pool's "
                         f"[0, {num_blocks})")
    if c.sampling is not None and not isinstance(c.sampling, SamplingParams):
        raise ValueError(f"chunk {i}: sampling must be SamplingParams or None, "
                         f"got {type(c.sampling).__name__}")
