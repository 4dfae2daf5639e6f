"""Paged attention and step layout against a dense reference, on hand-built pools."""
import math
import random

import pytest
import torch

from models.attention import GatherWorkspace, PagedAttention
from models.batch import SequenceChunk, build_step_batch
from models.sampler import SamplingParams

BS, NUM_BLOCKS, HQ, HKV, D = 4, 32, 4, 2, 8


def dense_reference(q, k, v, window=None):
    """Causal attention of q [n, HQ, D] over k/v [L, HKV, D]; queries sit at the last n
    positions. Plain loops: the slow obvious version."""
    n, length = q.shape[0], k.shape[0]
    group = HQ // HKV
    out = torch.empty_like(q)
    for i in range(n):
        pos = length - n + i
        for h in range(HQ):
            keys = range(max(0, pos - window + 1) if window else 0, pos + 1)
            scores = torch.stack([q[i, h] @ k[j, h // group] for j in keys]) / math.sqrt(D)
            weights = scores.softmax(0)
            out[i, h] = sum(w * v[j, h // group] for w, j in zip(weights, keys))
    return out


def run_step(specs, window=None, seed=0, workspace=None):
    """specs: (context_len, num_new) per sequence. Fills the pool with each sequence's
    cached K/V, runs one step over the new tokens, returns (out, expected) per sequence."""
    gen = torch.Generator().manual_seed(seed)
    k_cache = torch.zeros(NUM_BLOCKS, BS, HKV, D)
    v_cache = torch.zeros(NUM_BLOCKS, BS, HKV, D)
    free = list(range(NUM_BLOCKS))
    random.Random(seed).shuffle(free)  # non-contiguous, unordered block tables
    chunks, full = [], []
    for length, num_new in specs:
        table = [free.pop() for _ in range(-(-length // BS))]
        k_all = torch.randn(length, HKV, D, generator=gen)
        v_all = torch.randn(length, HKV, D, generator=gen)
        q_new = torch.randn(num_new, HQ, D, generator=gen)
        for pos in range(length - num_new):
            k_cache[table[pos // BS], pos % BS] = k_all[pos]
            v_cache[table[pos // BS], pos % BS] = v_all[pos]
        chunks.append(SequenceChunk(list(range(num_new)), length - num_new, table,
                                    SamplingParams(temperature=0)))
        full.append((q_new, k_all, v_all))
    batch = build_step_batch(chunks, block_size=BS, num_blocks=NUM_BLOCKS, max_model_len=64,
                             vocab_size=100, device=torch.device("cpu"), sliding_window=window,
                             workspace=workspace)
    q = torch.cat([full[i][0] for i in batch.order])
    k = torch.cat([full[i][1][-len(chunks[i].token_ids):] for i in batch.order])
    v = torch.cat([full[i][2][-len(chunks[i].token_ids):] for i in batch.order])
    out = PagedAttention(HQ, HKV, D, D ** -0.5)(q, k, v, (k_cache, v_cache), batch.attn)
    results = [None] * len(specs)
    for i, last in zip(batch.order, batch.last_rows):
        num_new = len(chunks[i].token_ids)
        expected = dense_reference(*full[i], window=window)
        results[i] = (out[last + 1 - num_new:last + 1], expected)
    for i, (q_new, k_all, v_all) in enumerate(full):  # every new token's K/V landed in its slot
        table, length = chunks[i].block_table, k_all.shape[0]
        for pos in range(length - len(chunks[i].token_ids), length):
            assert torch.equal(k_cache[table[pos // BS], pos % BS], k_all[pos])
            assert torch.equal(v_cache[table[pos // BS], pos % BS], v_all[pos])
    return results


@pytest.mark.parametrize("specs", [
    [(7, 7), (3, 3), (12, 12)],                       # packed fresh prompts
    [(10, 1), (3, 1), (17, 1), (1, 1)],               # decode tokens, different lengths
    [(9, 1), (9, 1)],                                 # equal lengths: no mask needed
    [(11, 5), (6, 1), (14, 14), (4, 1), (13, 2)],     # chunks on cache + decodes + prompt
])
def test_paged_attention_matches_dense(specs):
    for out, expected in run_step(specs):
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_one_workspace_serves_steps_of_growing_and_shrinking_size():
    workspace = GatherWorkspace()
    for seed, specs in enumerate([[(3, 1)], [(10, 1), (17, 1)], [(11, 5), (6, 1)], [(2, 1)]]):
        for out, expected in run_step(specs, seed=seed, workspace=workspace):
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_sliding_window_masks_old_keys():
    for out, expected in run_step([(13, 13), (11, 4), (15, 1), (6, 1)], window=5):
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_layout_puts_prefills_first_and_keeps_caller_order():
    chunks = [SequenceChunk([5], 3, [0]), SequenceChunk([1, 2, 3], 0, [1]),
              SequenceChunk([7], 0, [2]), SequenceChunk([4, 4], 6, [3, 4])]
    batch = build_step_batch(chunks, block_size=BS, num_blocks=8, max_model_len=64,
                             vocab_size=10, device=torch.device("cpu"))
    assert batch.order == [1, 3, 0, 2]
    assert batch.last_rows == [2, 4, 5, 6]
    assert batch.input_ids.tolist() == [1, 2, 3, 4, 4, 5, 7]
    assert batch.positions.tolist() == [0, 1, 2, 6, 7, 3, 0]
    # slot = block_table[pos // BS] * BS + pos % BS
    assert batch.attn.slot_mapping.tolist() == [4, 5, 6, 18, 19, 3, 8]
    assert batch.attn.num_prefill_tokens == 5 and batch.attn.num_decodes == 2
    assert batch.attn.decode_block_ids.tolist() == [0, 2]
    assert batch.attn.decode_mask[:, 0, 0].tolist() == [[True] * 4, [True, False, False, False]]


@pytest.mark.parametrize("chunk, message", [
    (SequenceChunk([], 0, [0]), "no tokens"),
    (SequenceChunk([1, 2], 0, []), "block table has 0"),
    (SequenceChunk([1] * 5, 0, [0]), "need 2 blocks"),
    (SequenceChunk([1], 0, [8]), "outside the pool"),
    (SequenceChunk([1], -1, [0]), "num_cached"),
    (SequenceChunk([1], 63, [0] * 16), "past the maximum model length 32"),
    (SequenceChunk([10], 0, [0]), "token id 10 is outside the vocabulary"),
    (SequenceChunk(["a"], 0, [0]), "token ids must be integers"),
    (SequenceChunk([1], 0, [0], sampling={"temperature": 0}), "SamplingParams"),
])
def test_bad_chunks_are_rejected(chunk, message):
    with pytest.raises(ValueError, match=message):
        build_step_batch([chunk], block_size=BS, num_blocks=8, max_model_len=32, vocab_size=10,
                         device=torch.device("cpu"))
