"""Compiled decode graphs: bounded recompiles, padding that touches nothing, eager parity."""
import pytest
import torch
from torch._dynamo.utils import counters

from models.batch import SequenceChunk
import models.compiled
from models.compiled import DEFAULT_BUCKETS, buckets_up_to, check_buckets, layers_per_graph
from models.runner import ModelRunner
from models.sampler import SamplingParams
from tests.tiny_models import make_tiny_checkpoint, single_thread

BLOCK_SIZE = 4
NUM_BLOCKS = 64
BUCKETS = (1, 2, 4)
GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("one-layer"), "llama", num_layers=1,
                                num_kv_heads=2, seed=11)


def decode_all(runner, num_seqs, num_steps, seed):
    """Prefill ``num_seqs`` prompts, then decode them together; tokens per sequence."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 128, (3 + i,), generator=gen).tolist() for i in range(num_seqs)]
    tables = [[1 + 6 * i + j for j in range(6)] for i in range(num_seqs)]
    out = [[r.token_id] for r in runner.step(
        [SequenceChunk(p, 0, t, GREEDY) for p, t in zip(prompts, tables)])]
    for step in range(1, num_steps):
        chunks = [SequenceChunk([o[-1]], len(p) + step - 1, t, GREEDY, step)
                  for p, t, o in zip(prompts, tables, out)]
        for o, r in zip(out, runner.step(chunks)):
            o.append(r.token_id)
    return out


def test_graphs_stay_within_the_buckets_and_match_eager(model_dir):
    with single_thread():
        before = counters["stats"]["unique_graphs"]
        compiled = ModelRunner(model_dir, block_size=BLOCK_SIZE, num_blocks=NUM_BLOCKS,
                               enforce_eager=False, compile_buckets=BUCKETS)
        assert sorted(compiled.decoder.compile_seconds) == list(BUCKETS)  # warmed up
        eager = ModelRunner(model_dir, block_size=BLOCK_SIZE, num_blocks=NUM_BLOCKS)
        # Every batch size from 1 to past the largest bucket (5 and 6 run eager), twice.
        for rep in range(2):
            for num_seqs in range(1, 7):
                assert decode_all(compiled, num_seqs, 4, seed=num_seqs) == \
                    decode_all(eager, num_seqs, 4, seed=num_seqs), (rep, num_seqs)
        assert counters["stats"]["unique_graphs"] - before <= len(BUCKETS)
        compiled.close()
        eager.close()


def test_padded_rows_write_no_kv_and_leave_real_rows_alone(model_dir):
    with single_thread():
        runner = ModelRunner(model_dir, block_size=BLOCK_SIZE, num_blocks=NUM_BLOCKS,
                             enforce_eager=False, compile_buckets=(4,))
        eager = ModelRunner(model_dir, block_size=BLOCK_SIZE, num_blocks=NUM_BLOCKS)
        prompt = [5, 9, 17, 33, 65]
        for r in (runner, eager):
            first = r.step([SequenceChunk(prompt, 0, [7, 3], GREEDY)])[0]
        pools = [[t.clone() for t in r.pool.layer(0)] for r in (runner, eager)]
        # One real decode row padded to 4: only slot 5 (block 3, offset 1) may change.
        got = runner.step([SequenceChunk([first.token_id], 5, [7, 3], GREEDY, 1)])[0]
        want = eager.step([SequenceChunk([first.token_id], 5, [7, 3], GREEDY, 1)])[0]
        assert got.token_id == want.token_id
        assert got.logprob == pytest.approx(want.logprob, abs=1e-4)
        for r, before in zip((runner, eager), pools):
            for after, old in zip(r.pool.layer(0), before):
                changed = (after != old).flatten(2).any(-1).nonzero().tolist()
                assert changed == [[3, 1]]  # [block, offset] of the one new token
        runner.close()
        eager.close()


@pytest.mark.parametrize("bad", [(), (0, 2), (-1,), ("x",), (True,)])
def test_bad_buckets_are_refused(bad):
    with pytest.raises(ValueError, match="compile buckets"):
        check_buckets(bad)


@pytest.mark.parametrize("max_num_seqs,want", [(1, (1,)), (2, (1, 2)), (3, (1, 2, 3)), (8, (1, 2, 4, 8)),
                                                (12, (1, 2, 4, 8, 12)), (32, DEFAULT_BUCKETS),
                                                (256, DEFAULT_BUCKETS)])
def test_a_worker_compiles_no_bucket_past_its_max_num_seqs(max_num_seqs, want):
    assert buckets_up_to(max_num_seqs) == check_buckets(want) == want


@pytest.mark.parametrize("num_layers,most,want", [(30, 16, 15), (30, 10, 10), (24, 16, 12),
                                                 (22, 10, 2), (31, 16, 1), (1, 16, 1), (2, 16, 2)])
def test_layers_split_into_equal_groups(num_layers, most, want):
    assert layers_per_graph(num_layers, most) == want


def test_groups_of_layers_share_one_graph_per_bucket(tmp_path, monkeypatch):
    """Six layers in three groups of two: each bucket compiles once, not once per group, and
    the tokens equal eager's."""
    six = make_tiny_checkpoint(tmp_path / "six-layers", "llama", num_layers=6, num_kv_heads=2,
                               seed=12)
    monkeypatch.setattr(models.compiled, "MAX_LAYERS_PER_GRAPH", 2)
    with single_thread():
        before = counters["stats"]["unique_graphs"]
        compiled = ModelRunner(six, block_size=BLOCK_SIZE, num_blocks=NUM_BLOCKS,
                               enforce_eager=False, compile_buckets=(1, 2))
        assert [len(group) for group in compiled.decoder.groups] == [2, 2, 2]
        assert [layer for group in compiled.decoder.groups for layer in group] == \
            list(compiled.model.model.layers)
        eager = ModelRunner(six, block_size=BLOCK_SIZE, num_blocks=NUM_BLOCKS)
        for num_seqs in (1, 2, 3):
            assert decode_all(compiled, num_seqs, 5, seed=num_seqs) == \
                decode_all(eager, num_seqs, 5, seed=num_seqs), num_seqs
        assert counters["stats"]["unique_graphs"] - before == 2
        compiled.close()
        eager.close()
