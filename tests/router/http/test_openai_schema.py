"""Request parsing and the OpenAI -> router parameter mapping (no server)."""
from __future__ import annotations

import pytest

from router.http.errors import APIError
from router.http.openai_schema import (DEFAULT_COMPLETION_MAX_TOKENS, SEED_LIMIT, Prompt,
                                       parse_completion, parse_json, sampling_params)


def test_prompt_shapes():
    parse = lambda prompt: parse_completion({"prompt": prompt}, chat=False).prompts  # noqa: E731
    assert parse("hi") == (Prompt(text="hi"),)
    assert parse([1, 2]) == (Prompt(token_ids=[1, 2]),)
    assert parse(["a", [3, 4]]) == (Prompt(text="a"), Prompt(token_ids=[3, 4]))
    for bad in ([], [[]], [True], [1.5], {"x": 1}, None, [["a"]]):
        with pytest.raises(APIError, match="prompt"):
            parse(bad)


def test_defaults_and_openai_spellings():
    req = parse_completion({"prompt": "x", "max_completion_tokens": 7, "max_tokens": 3, "top_k": -1,
                            "logprobs": 0, "unknown_field": {"ignored": True}}, chat=False)
    assert (req.max_tokens, req.top_k, req.logprobs, req.top_logprobs) == (7, 0, True, 0)
    assert parse_completion({"prompt": "x"}, chat=False).max_tokens == DEFAULT_COMPLETION_MAX_TOKENS
    chat = parse_completion({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}, chat=True)
    assert chat.max_tokens is None and chat.messages == [{"role": "user", "content": "a\nb"}]
    with pytest.raises(APIError, match="top_logprobs needs logprobs"):
        parse_completion({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, chat=True)
    with pytest.raises(APIError, match="stream_options"):
        parse_completion({"prompt": "x", "stream_options": {"include_usage": True}}, chat=False)
    with pytest.raises(APIError, match="choices"):
        parse_completion({"prompt": ["a"] * 3, "n": 64}, chat=False)
    with pytest.raises(APIError) as info:
        parse_json(b"\xff")
    assert info.value.status == 400


def test_sampling_params_derive_a_seed_per_sample():
    req = parse_completion({"prompt": "x", "seed": SEED_LIMIT - 1, "n": 2, "temperature": 0.5,
                            "stop": "\n", "logprobs": 3}, chat=False)
    first, second = (sampling_params(req, i, 100) for i in range(2))
    assert first == {"max_tokens": 16, "ignore_eos": False, "temperature": 0.5, "stop": "\n",
                     "seed": SEED_LIMIT - 1, "num_top_logprobs": 3}
    assert second["seed"] == 0  # wraps inside the valid range
    bad = parse_completion({"prompt": "x", "seed": -5}, chat=False)
    assert sampling_params(bad, 1, 100)["seed"] == -5  # left for the router to refuse
