import msgpack
import pytest

from models.request_options import RequestOptions, StopRules
from models.sampler import SamplingParams


def wire_trip(obj):
    return msgpack.unpackb(msgpack.packb(obj, use_bin_type=True), raw=False)


def test_round_trip_is_exact_through_msgpack():
    options = RequestOptions(max_tokens=7, temperature=0.5, top_p=0.9, top_k=3, seed=2**63 - 1,
                             stop_token_ids=(4, 2), ignore_eos=True)
    assert RequestOptions.from_wire(wire_trip(options.to_wire())) == options
    assert options.to_wire() == {"max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "top_k": 3,
                                 "seed": 2**63 - 1, "stop_token_ids": [4, 2], "ignore_eos": True}
    assert RequestOptions.from_wire({}) == RequestOptions()
    assert RequestOptions.from_wire({"stop_token_ids": None}) == RequestOptions()


def test_canonical_form_and_sampling_fields():
    options = RequestOptions(temperature=1, top_p=1, stop_token_ids=[5, 5, 7])
    assert options.temperature == 1.0 and isinstance(options.top_p, float)
    assert options.stop_token_ids == (5, 7)
    assert SamplingParams(**options.sampling_fields) == SamplingParams(temperature=1.0)


@pytest.mark.parametrize("field, value, match", [
    ("max_tokens", 0, "max_tokens must be a positive integer"),
    ("max_tokens", 2.0, "max_tokens must be a positive integer"),
    ("max_tokens", True, "max_tokens must be a positive integer"),
    ("temperature", -0.1, "temperature must be"),
    ("temperature", 1001.0, "temperature must be"),
    ("temperature", "hot", "temperature must be"),
    ("top_p", 0, r"top_p must be a number in \(0, 1\]"),
    ("top_p", 1.5, "top_p must be"),
    ("top_k", -1, "top_k must be an integer >= 0"),
    ("top_k", 1.0, "top_k must be an integer >= 0"),
    ("seed", -1, "seed must be null or an integer"),
    ("seed", 2**63, "seed must be null"),
    ("stop_token_ids", "1", "stop_token_ids must be a list"),
    ("stop_token_ids", list(range(257)), "at most 256"),
    ("stop_token_ids", [-1], "stop_token_ids contains -1"),
    ("stop_token_ids", [1.0], "stop_token_ids contains 1.0"),
    ("ignore_eos", 1, "ignore_eos must be true or false"),
    ("num_top_logprobs", 21, "num_top_logprobs must be an integer in"),
    ("num_top_logprobs", True, "num_top_logprobs must be an integer in"),
])
def test_each_malformed_field_is_rejected(field, value, match):
    with pytest.raises(ValueError, match=match):
        RequestOptions.from_wire({field: value})


def test_malformed_containers_and_vocabulary():
    with pytest.raises(ValueError, match="must be a mapping"):
        RequestOptions.from_wire([["max_tokens", 3]])
    with pytest.raises(ValueError, match="unknown sampling options beam_width"):
        RequestOptions.from_wire({"beam_width": 2})
    with pytest.raises(ValueError, match=r"stop_token_ids contains 300, not a token id of this model"):
        RequestOptions(stop_token_ids=(3, 300)).check_vocab(256)
    RequestOptions(stop_token_ids=(255,)).check_vocab(256)


def test_stop_rules_match_the_options():
    rules = StopRules.of(RequestOptions(max_tokens=3, stop_token_ids=(9,)), eos_token_ids=[2],
                         max_model_len=10)
    assert [rules.check(9, 1, 5), rules.check(2, 1, 5), rules.check(4, 3, 5), rules.check(4, 1, 10),
            rules.check(4, 1, 5)] == ["stop", "stop", "length", "length", None]
    ignoring = StopRules.of(RequestOptions(ignore_eos=True), eos_token_ids=[2], max_model_len=10)
    assert ignoring.check(2, 1, 5) is None
