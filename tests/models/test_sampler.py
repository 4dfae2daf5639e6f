import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch

from models.sampler import Sampler, SamplingParams

GREEDY = SamplingParams(temperature=0.0)


def random_logits(num_rows: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_rows, vocab_size, generator=generator) * 3


def draw(logits_row: torch.Tensor, params: SamplingParams, num_draws: int, sampler=None) -> list[int]:
    """Tokens from ``num_draws`` samples of one row, using output indices 0..num_draws-1."""
    sampler = sampler or Sampler()
    batch = logits_row.expand(num_draws, -1)
    tokens, _ = sampler.sample(batch, [params] * num_draws, list(range(num_draws)))
    return tokens.tolist()


# -- SamplingParams ----------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, field", [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": "1"}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"top_k": 2.0}, "top_k"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**63}, "seed"),
    ({"seed": 1.5}, "seed"),
    ({"seed": False}, "seed"),
])
def test_params_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_params_defaults_and_greedy():
    params = SamplingParams()
    assert (params.temperature, params.top_p, params.top_k, params.seed) == (1.0, 1.0, 0, None)
    assert not params.is_greedy
    assert GREEDY.is_greedy
    assert SamplingParams(seed=2**63 - 1).seed == 2**63 - 1


def test_params_dict_round_trip_and_errors():
    params = SamplingParams(temperature=0.7, top_p=0.9, top_k=40, seed=123)
    assert params.to_dict() == {"temperature": 0.7, "top_p": 0.9, "top_k": 40, "seed": 123,
                                "num_top_logprobs": 0}
    assert SamplingParams.from_dict(params.to_dict()) == params
    assert SamplingParams.from_dict({"top_k": 5}) == SamplingParams(top_k=5)
    with pytest.raises(ValueError, match="unknown sampling parameter.*max_tokens"):
        SamplingParams.from_dict({"temperature": 1.0, "max_tokens": 3})
    with pytest.raises(ValueError, match="mapping"):
        SamplingParams.from_dict([("temperature", 1.0)])
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams.from_dict({"top_p": 2})


def test_top_logprobs_are_the_k_best_raw_logprobs():
    logits = random_logits(3, 50)
    tops = Sampler.top_logprobs(logits, [2, 0, 20])
    expected = torch.log_softmax(logits, -1)
    assert tops[1] is None and len(tops[0]) == 2 and len(tops[2]) == 20
    for row, top in ((0, tops[0]), (2, tops[2])):
        order = expected[row].argsort(descending=True)[:len(top)].tolist()
        assert [t for t, _ in top] == order
        assert [v for _, v in top] == pytest.approx(expected[row, order].tolist())
    assert Sampler.top_logprobs(logits, [0, 0, 0]) == [None, None, None]
    with pytest.raises(ValueError, match="num_top_logprobs"):
        SamplingParams(num_top_logprobs=21)


# -- greedy --------------------------------------------------------------------------------
def test_greedy_is_argmax_with_raw_logprobs():
    logits = random_logits(6, 50)
    tokens, logprobs = Sampler().sample(logits, [GREEDY] * 6, [0] * 6)
    assert tokens.dtype == torch.int64 and logprobs.dtype == torch.float32
    assert torch.equal(tokens, logits.argmax(-1))
    expected = torch.log_softmax(logits, -1)[torch.arange(6), tokens]
    assert torch.allclose(logprobs, expected)


def test_greedy_ties_pick_lowest_id_and_top_k_one_is_greedy():
    logits = random_logits(4, 30)
    logits[0, [3, 7]] = 100.0  # a tie between ids 3 and 7
    expected = logits.argmax(-1)
    assert expected[0] == 3
    top1 = [SamplingParams(temperature=1.5, top_k=1, seed=s) for s in range(2)] + \
           [SamplingParams(temperature=0.5, top_k=1)] * 2
    tokens, _ = Sampler().sample(logits, top1, [0, 1, 2, 3])
    assert torch.equal(tokens, expected)


def test_tiny_temperature_is_argmax_without_nan():
    logits = random_logits(3, 40) * 1e4
    params = [SamplingParams(temperature=1e-7, seed=i) for i in range(3)]
    tokens, logprobs = Sampler().sample(logits, params, [0, 0, 0])
    assert torch.equal(tokens, logits.argmax(-1))
    assert torch.isfinite(logprobs).all()


def test_masked_tokens_are_never_drawn():
    logits = torch.zeros(1, 20)
    logits[0, 10:] = float("-inf")
    assert set(draw(logits[0], SamplingParams(temperature=5.0, seed=1), 300)) == set(range(10))


def test_logprob_is_of_raw_logits_not_scaled():
    logits = random_logits(1, 10)
    tokens, logprobs = Sampler().sample(logits, [SamplingParams(temperature=3.0, top_k=4, seed=9)], [5])
    assert math.isclose(logprobs.item(), torch.log_softmax(logits[0], -1)[tokens.item()].item(),
                        rel_tol=1e-6)


# -- seeded reproducibility --------------------------------------------------------------------
def test_seeded_draw_is_batch_invariant():
    logits = random_logits(8, 64, seed=1)
    target = SamplingParams(temperature=1.3, top_p=0.95, top_k=20, seed=42)
    alone, alone_lp = Sampler().sample(logits[:1], [target], [7])
    others = [GREEDY, SamplingParams(), SamplingParams(seed=1), SamplingParams(top_k=3, seed=42),
              SamplingParams(temperature=0.2), SamplingParams(top_p=0.5, seed=7),
              SamplingParams(temperature=2.0)]
    for order in ([0, 1, 2, 3, 4, 5, 6, 7], [7, 6, 5, 0, 4, 3, 2, 1], [3, 0, 5, 1, 7, 2, 6, 4]):
        params = [target] + others
        batch_logits = logits[order]
        batch_params = [params[i] for i in order]
        indices = [7 if i == 0 else i for i in order]
        tokens, lp = Sampler().sample(batch_logits, batch_params, indices)
        pos = order.index(0)
        assert tokens[pos] == alone[0]
        assert lp[pos] == alone_lp[0]


def test_seeded_draw_depends_on_seed_and_index():
    row = torch.zeros(100)
    first = draw(row, SamplingParams(seed=5), 40)
    assert first == draw(row, SamplingParams(seed=5), 40)
    assert first != draw(row, SamplingParams(seed=6), 40)
    assert len(set(first)) > 20  # different output indices give different draws


SUBPROCESS_DRAW = textwrap.dedent("""
    import json, torch
    torch.set_num_threads(1)
    from models.sampler import Sampler, SamplingParams
    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(3)) * 2
    params = [SamplingParams(temperature=0.9, top_p=0.9, seed=s) for s in (0, 1, 2**62, 17, 99)]
    tokens, _ = Sampler().sample(logits, params, [0, 3, 11, 100, 4096])
    print(json.dumps(tokens.tolist()))
""")


def test_seeded_draw_is_process_invariant():
    result = subprocess.run([sys.executable, "-c", SUBPROCESS_DRAW], capture_output=True,
                            text=True, timeout=120, check=True)
    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(3)) * 2
    params = [SamplingParams(temperature=0.9, top_p=0.9, seed=s) for s in (0, 1, 2**62, 17, 99)]
    tokens, _ = Sampler().sample(logits, params, [0, 3, 11, 100, 4096])
    assert json.loads(result.stdout) == tokens.tolist()


def test_unseeded_draws_are_fresh():
    row = torch.zeros(1000)
    a = draw(row, SamplingParams(), 20, Sampler())
    b = draw(row, SamplingParams(), 20, Sampler())
    assert a != b
    assert len(set(a)) > 10


# -- filtering ---------------------------------------------------------------------------------
def test_top_k_never_leaves_the_k_best():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(4))
    allowed = set(logits.topk(5).indices.tolist())
    seen = set(draw(logits, SamplingParams(temperature=50.0, top_k=5, seed=3), 400))
    assert seen == allowed


def test_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([0.1, 0.5, 0.05, 0.3, 0.05])  # sorted: ids 1, 3, 0, 2/4
    logits = probs.log()
    assert set(draw(logits, SamplingParams(top_p=0.75, seed=1), 400)) == {1, 3}
    assert set(draw(logits, SamplingParams(top_p=0.85, seed=1), 400)) == {0, 1, 3}
    assert set(draw(logits, SamplingParams(top_p=0.45, seed=1), 50)) == {1}
    assert set(draw(logits, SamplingParams(seed=1), 400)) == {0, 1, 2, 3, 4}


def test_top_p_applies_to_the_top_k_renormalized_distribution():
    logits = torch.tensor([0.1, 0.4, 0.2, 0.3]).log()
    # top_k=2 leaves ids 1, 3 with mass 4/7, 3/7; top_p=0.5 then keeps only id 1.
    assert set(draw(logits, SamplingParams(top_k=2, top_p=0.5, seed=2), 200)) == {1}
    assert set(draw(logits, SamplingParams(top_k=2, top_p=0.6, seed=2), 200)) == {1, 3}
    assert set(draw(logits, SamplingParams(top_k=3, seed=2), 300)) == {1, 2, 3}


def test_seeded_frequencies_follow_the_tempered_distribution():
    probs = torch.tensor([0.5, 0.3, 0.2])
    num_draws = 4000
    for temperature in (1.0, 0.5):
        tokens = torch.tensor(draw(probs.log(), SamplingParams(temperature=temperature, seed=11),
                                   num_draws))
        expected = (probs.log() / temperature).softmax(-1)
        observed = torch.bincount(tokens, minlength=3).float() / num_draws
        assert torch.allclose(observed, expected, atol=0.03), (temperature, observed, expected)


# -- errors -----------------------------------------------------------------------------------
def test_bad_inputs_raise_value_error():
    sampler = Sampler()
    with pytest.raises(ValueError, match="2-D"):
        sampler.sample(torch.zeros(5), [GREEDY], [0])
    with pytest.raises(ValueError, match="as many"):
        sampler.sample(torch.zeros(2, 5), [GREEDY], [0, 0])
    with pytest.raises(ValueError, match="as many"):
        sampler.sample(torch.zeros(2, 5), [GREEDY] * 2, [0])
    with pytest.raises(ValueError, match="output indices"):
        sampler.sample(torch.zeros(1, 5), [GREEDY], [-1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_seeded_draw_is_device_invariant():
    logits = random_logits(4, 1000)
    params = [SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=s) for s in range(4)]
    cpu, _ = Sampler().sample(logits, params, [0, 1, 2, 3])
    gpu, _ = Sampler().sample(logits.cuda(), params, [0, 1, 2, 3])
    assert torch.equal(cpu, gpu.cpu())
