"""The model stack against transformers, the reference, for each supported architecture."""
import random

import pytest
import torch
from transformers import GenerationConfig

from models.batch import SequenceChunk
from models.runner import ModelRunner
from models.sampler import SamplingParams
from tests.tiny_models import load_hf_model, make_tiny_checkpoint, single_thread

BLOCK_SIZE = 4
NUM_BLOCKS = 96
GREEDY = SamplingParams(temperature=0)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}

CASES = {
    "llama-gqa": dict(arch="llama", num_kv_heads=2),
    "llama-mqa-llama3-rope": dict(arch="llama", num_kv_heads=1, rope_scaling=LLAMA3),
    "llama-linear-rope-tied": dict(arch="llama", num_kv_heads=4, tie=True,
                                   rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "mistral-head-dim-24": dict(arch="mistral", num_kv_heads=2, head_dim=24),
    "mistral-sliding-window-6": dict(arch="mistral", num_kv_heads=2, sliding_window=6),
    "qwen2-bias": dict(arch="qwen2", num_kv_heads=2),
    "qwen3-qk-norm-tied": dict(arch="qwen3", num_kv_heads=1, head_dim=32, tie=True),
}
# The same checks through compiled decode graphs, one per architecture. The bucket (4) is
# larger than the 3-sequence decode steps below, so padded rows are exercised too.
COMPILED = ("llama-gqa", "mistral-sliding-window-6", "qwen2-bias", "qwen3-qk-norm-tied")
COMPILE_BUCKETS = (4,)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module", params=list(CASES) + [f"{name}-compiled" for name in COMPILED])
def case(request, tmp_path_factory):
    name = request.param.removesuffix("-compiled")
    compiled = name != request.param
    model_dir = make_tiny_checkpoint(tmp_path_factory.mktemp(request.param), seed=7,
                                     **CASES[name])
    runner = ModelRunner(model_dir, block_size=BLOCK_SIZE, num_blocks=NUM_BLOCKS,
                         enforce_eager=not compiled, compile_buckets=COMPILE_BUCKETS)
    assert (runner.decoder is not None) == compiled
    yield runner, load_hf_model(model_dir)
    runner.close()


def prompts(lengths, seed=0, vocab=128):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


class Blocks:
    """Hands out shuffled, non-contiguous block ids."""

    def __init__(self, seed=0):
        self.free = list(range(NUM_BLOCKS))
        random.Random(seed).shuffle(self.free)

    def take(self, num_tokens):
        return [self.free.pop() for _ in range(-(-num_tokens // BLOCK_SIZE))]


@torch.inference_mode()
def hf_logits(hf, token_ids):
    return hf(torch.tensor([token_ids])).logits[0].float()


def test_packed_prefill_logits_match(case):
    runner, hf = case
    batch = prompts([5, 13, 1, 9, 16])
    blocks = Blocks(seed=1)
    chunks = [SequenceChunk(p, 0, blocks.take(len(p)), GREEDY) for p in batch]
    for p, logits in zip(batch, runner.prompt_logits(chunks)):
        expected = hf_logits(hf, p)
        assert expected.std() > 0.3  # the reference is not flat, so the check has teeth
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_greedy_generation_matches_hf_generate(case):
    runner, hf = case
    batch = prompts([7, 12, 3], seed=2)
    num_new = 32
    blocks = Blocks(seed=2)
    tables = [blocks.take(len(p) + num_new) for p in batch]
    results = runner.step([SequenceChunk(p, 0, t, GREEDY) for p, t in zip(batch, tables)])
    outputs = [[r.token_id] for r in results]
    for step in range(1, num_new):  # every sequence decodes in the same step
        chunks = [SequenceChunk([out[-1]], len(p) + step - 1, t, GREEDY, output_index=step)
                  for p, t, out in zip(batch, tables, outputs)]
        for out, result in zip(outputs, runner.step(chunks)):
            out.append(result.token_id)
    # Greedy with no stop token: generate merges in the checkpoint's eos unless cleared there.
    hf.generation_config.eos_token_id = None
    config = GenerationConfig(max_new_tokens=num_new, do_sample=False, pad_token_id=0)
    for p, out in zip(batch, outputs):
        with torch.inference_mode():
            expected = hf.generate(torch.tensor([p]), generation_config=config)[0, len(p):]
        assert out == expected.tolist()


def test_chunked_prefill_and_prefix_reuse_match_full_prefill(case):
    runner, _ = case
    prompt, other = prompts([19, 6], seed=3)
    blocks = Blocks(seed=3)
    table = blocks.take(len(prompt))
    full = runner.prompt_logits([SequenceChunk(prompt, 0, table, GREEDY)])[0]

    # Chunked prefill: chunks of 5 (not block-aligned), each packed with an unrelated prompt.
    table = blocks.take(len(prompt))
    pieces = []
    for start in range(0, len(prompt), 5):
        chunk = SequenceChunk(prompt[start:start + 5], start, table, None)
        side = SequenceChunk(other, 0, blocks.take(len(other)), GREEDY)
        pieces.append(runner.prompt_logits([side, chunk])[1])
    torch.testing.assert_close(torch.cat(pieces), full, rtol=1e-5, atol=1e-5)

    # Prefix reuse: a new sequence shares the first 3 full blocks and prefills only the rest.
    num_shared = 3 * BLOCK_SIZE
    reused = table[:3] + blocks.take(len(prompt) - num_shared)
    tail = runner.prompt_logits([SequenceChunk(prompt[num_shared:], num_shared, reused, GREEDY)])
    torch.testing.assert_close(tail[0], full[num_shared:], rtol=1e-5, atol=1e-5)


def test_mixed_step_matches_separate_steps(case):
    """Decode tokens, a chunk on top of a cached prefix and a fresh prompt in one forward
    give the same next tokens as running them alone."""
    runner, hf = case
    a, b, c = prompts([9, 14, 4], seed=4)
    blocks = Blocks(seed=4)
    ta, tb, tc = blocks.take(len(a) + 1), blocks.take(len(b)), blocks.take(len(c))
    first_a = runner.step([SequenceChunk(a, 0, ta, GREEDY)])[0].token_id
    runner.step([SequenceChunk(b[:8], 0, tb, None)])
    mixed = runner.step([SequenceChunk([first_a], len(a), ta, GREEDY, 1),
                         SequenceChunk(b[8:], 8, tb, GREEDY),
                         SequenceChunk(c, 0, tc, GREEDY)])
    expected = [hf_logits(hf, a + [first_a])[-1].argmax().item(),
                hf_logits(hf, b)[-1].argmax().item(),
                hf_logits(hf, c)[-1].argmax().item()]
    assert [r.token_id for r in mixed] == expected
