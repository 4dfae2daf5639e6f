"""The official openai SDK against pdserve's HTTP gateway (real cluster, real sockets):
completions and chat, sync and async, streaming and not, checked against the ZMQ client,
transformers and exact token counts."""
from __future__ import annotations

import asyncio
import random

import pytest

from router.client import Client
from tests.router.http.conftest import BLOCK_SIZE, MODEL_NAME

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow

GREEDY = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}


def prompt_ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(32, 127) for _ in range(n)]


@pytest.fixture(scope="module")
def sdk(http_cluster):
    return openai.OpenAI(base_url=http_cluster.http_url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def zmq(http_cluster):
    with Client(http_cluster.endpoint, timeout=120) as client:
        yield client


def test_models_and_completion_matches_zmq_client(sdk, zmq):
    (model,) = sdk.models.list().data
    assert model.id == MODEL_NAME and model.max_model_len == 512
    prompt = prompt_ids(11, seed=1)
    out = sdk.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=9, **GREEDY)
    ref = zmq.complete(prompt_token_ids=prompt, max_tokens=9, temperature=0.0, ignore_eos=True)
    (choice,) = out.choices
    assert choice.text == ref.text and choice.finish_reason == "length"
    assert out.model == MODEL_NAME and out.id.startswith("cmpl-") and out.object == "text_completion"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (11, 9, 20)
    # A text prompt: the router tokenizes it (bos + one token per byte).
    text = sdk.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=3, **GREEDY)
    assert text.usage.prompt_tokens == 6 and text.usage.completion_tokens == 3


def test_async_streaming_equals_non_streaming(http_cluster, sdk):
    prompts = [prompt_ids(7, seed=2), prompt_ids(13, seed=3)]
    whole = sdk.completions.create(model=MODEL_NAME, prompt=prompts, max_tokens=12, **GREEDY)

    async def stream() -> tuple[dict, list]:
        client = openai.AsyncOpenAI(base_url=http_cluster.http_url + "/v1", api_key="x", max_retries=0)
        texts, usage = {0: "", 1: ""}, []
        reasons = {}
        async for chunk in await client.completions.create(
                model=MODEL_NAME, prompt=prompts, max_tokens=12, stream=True,
                stream_options={"include_usage": True}, **GREEDY):
            if chunk.usage is not None:
                assert chunk.choices == []
                usage.append(chunk.usage)
            for c in chunk.choices:
                texts[c.index] += c.text
                if c.finish_reason:
                    reasons[c.index] = c.finish_reason
        await client.close()
        return texts, usage, reasons

    texts, usage, reasons = asyncio.run(stream())
    assert [texts[0], texts[1]] == [c.text for c in sorted(whole.choices, key=lambda c: c.index)]
    assert reasons == {0: "length", 1: "length"}
    (u,) = usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (20, 24, 44)
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (20, 24)


def test_chat_sync_and_async_stream(http_cluster, sdk, zmq, chat_model):
    transformers = pytest.importorskip("transformers")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    ids = transformers.AutoTokenizer.from_pretrained(str(chat_model)).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    ref = zmq.complete(prompt_token_ids=list(ids), max_tokens=10, temperature=0.0, ignore_eos=True)
    out = sdk.chat.completions.create(model=MODEL_NAME, messages=messages, max_completion_tokens=10,
                                      **GREEDY)
    (choice,) = out.choices
    assert choice.message.role == "assistant" and choice.message.content == ref.text
    assert out.object == "chat.completion" and out.usage.prompt_tokens == len(ids)
    assert out.usage.completion_tokens == 10

    async def stream() -> tuple[str, list]:
        client = openai.AsyncOpenAI(base_url=http_cluster.http_url + "/v1", api_key="x", max_retries=0)
        text, roles = "", []
        async for chunk in await client.chat.completions.create(
                model=MODEL_NAME, messages=messages, max_tokens=10, stream=True, **GREEDY):
            for c in chunk.choices:
                roles += [c.delta.role] if c.delta.role else []
                text += c.delta.content or ""
        await client.close()
        return text, roles

    text, roles = asyncio.run(stream())
    assert text == ref.text and roles == ["assistant"]
    sync_text = "".join(c.choices[0].delta.content or "" for c in sdk.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=10, stream=True, **GREEDY) if c.choices)
    assert sync_text == ref.text


def test_n_with_seed_is_reproducible(sdk):
    prompt = prompt_ids(9, seed=4)
    kwargs = dict(model=MODEL_NAME, prompt=prompt, max_tokens=12, n=3, temperature=1.0, seed=1234,
                  extra_body={"ignore_eos": True})
    first = [c.text for c in sorted(sdk.completions.create(**kwargs).choices, key=lambda c: c.index)]
    again = [c.text for c in sorted(sdk.completions.create(**kwargs).choices, key=lambda c: c.index)]
    assert first == again and len(first) == 3
    assert len(set(first)) > 1  # each sample has its own derived seed
    single = sdk.completions.create(**{**kwargs, "n": 1}).choices[0].text
    assert single == first[0]  # sample 0 uses the request's seed itself


def test_logprobs_equal_the_models(sdk, chat_model):
    torch = pytest.importorskip("torch")
    from tests.tiny_models import load_hf_model, single_thread

    prompt = prompt_ids(10, seed=5)
    out = sdk.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=6, logprobs=3, **GREEDY)
    lp = out.choices[0].logprobs
    model = load_hf_model(chat_model)
    ids = list(prompt)
    with torch.no_grad(), single_thread():
        for step in range(6):
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)
            top = logprobs.topk(3)
            assert lp.token_logprobs[step] == pytest.approx(float(top.values[0]), abs=1e-4)
            assert sorted(lp.top_logprobs[step].values(), reverse=True)[0] == \
                pytest.approx(float(top.values[0]), abs=1e-4)
            ids.append(int(top.indices[0]))
    assert lp.text_offset[0] == 0 and len(lp.tokens) == 6
    # Chat shape: every token with its 2 best alternatives, in order.
    chat = sdk.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "x"}],
                                       max_tokens=4, logprobs=True, top_logprobs=2, **GREEDY)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob


def test_usage_reports_prefix_cache_hits(sdk):
    prompt = prompt_ids(2 * BLOCK_SIZE + 8, seed=6)
    first = sdk.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=2, **GREEDY)
    second = sdk.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=2, **GREEDY)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    # Whole blocks of the prompt but its last token are reused from the prefill worker's cache.
    assert second.usage.prompt_tokens_details.cached_tokens == 2 * BLOCK_SIZE
    assert second.choices[0].text == first.choices[0].text
