"""Concurrent streams, stop rules and cancellation through a real cluster (disaggregated and
colocated), checked against transformers and against the workers' own KV accounting."""
import asyncio
import random

import pytest

from router.client import AsyncClient, Client
from router.launcher import LocalCluster
from tests.e2e.helpers import greedy_reference, wait_all_blocks_free
from tests.router.helpers import demo_tokenizer

pytestmark = pytest.mark.slow

LAYOUTS = {"disagg": {"mode": "disagg"}, "colocated": {"mode": "colocated", "num_workers": 2}}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def cluster(request, tiny_model):
    with LocalCluster(str(tiny_model), num_kv_blocks=512, **LAYOUTS[request.param]) as running:
        yield running


async def stream_one(client, prompt, max_tokens):
    tokens, text, reasons = [], [], []
    async for chunk in client.generate(prompt_token_ids=prompt, max_tokens=max_tokens, temperature=0):
        tokens += chunk.token_ids
        text.append(chunk.text)
        reasons.append(chunk.finish_reason)
    assert all(r is None for r in reasons[:-1]) and reasons[-1] is not None
    return tokens, "".join(text)


def test_64_concurrent_streams_of_mixed_lengths_are_exact(cluster, tiny_model):
    rng = random.Random(64)
    # ASCII prompts: no character spans the prompt and the output, so the text is decode(output)
    prompts = [[rng.randrange(32, 127) for _ in range(rng.randrange(1, 100))] for _ in range(64)]
    lengths = [rng.randrange(1, 24) for _ in range(64)]
    expected = greedy_reference(tiny_model, prompts, lengths)

    async def run():
        async with AsyncClient(cluster.endpoint, timeout=120) as client:
            return await asyncio.gather(*(stream_one(client, p, n) for p, n in zip(prompts, lengths)))
    results = asyncio.run(run())
    tok = demo_tokenizer()
    for (tokens, text), want in zip(results, expected):
        assert tokens == want
        assert text == tok.decode(want)
    with Client(cluster.endpoint, timeout=30) as client:
        wait_all_blocks_free(client)


def test_stop_strings_and_stop_token_ids_cut_the_output(cluster, tiny_model):
    prompt = list(b"Once upon a time")
    (ref,) = greedy_reference(tiny_model, [prompt], 30, stop_ids=())
    tok = demo_tokenizer()
    full_text = tok.decode(ref)
    printable = [i for i in range(8, 20) if 32 <= ref[i] < 127 and 32 <= ref[i + 1] < 127]
    with Client(cluster.endpoint, timeout=60) as client:
        if printable:
            i = printable[0]
            stop = bytes(ref[i:i + 2]).decode()
            got = client.complete(prompt_token_ids=prompt, max_tokens=30, temperature=0, stop=stop,
                                  ignore_eos=True)
            assert got.finish_reason == "stop"
            assert got.text == full_text[:full_text.index(stop)]
        got = client.complete(prompt_token_ids=prompt, max_tokens=30, temperature=0,
                              stop_token_ids=[ref[6]], ignore_eos=True)
        first = ref.index(ref[6])
        assert got.token_ids == ref[:first + 1] and got.finish_reason == "stop"
        got = client.complete(prompt_token_ids=prompt, max_tokens=3, temperature=0, ignore_eos=True)
        assert got.token_ids == ref[:3] and got.finish_reason == "length"


def test_cancel_mid_stream_frees_kv_on_every_worker(cluster):
    async def run():
        async with AsyncClient(cluster.endpoint, timeout=120) as client:
            streams = [client.generate(prompt_token_ids=list(range(1, 60)), max_tokens=400,
                                       ignore_eos=True, temperature=0) for _ in range(4)]
            for stream in streams:
                for _ in range(3):
                    chunk = await stream.__anext__()
                    assert chunk.finish_reason is None
            busy = await client.status()
            for stream in streams:
                await stream.aclose()
            return busy
    busy = asyncio.run(run())
    decode_busy = [w for w in busy["workers"] if w["role"] in ("decode", "both")]
    assert sum(w["num_blocks"] - w["free_blocks"] for w in decode_busy) > 0 or \
        sum(w["assigned"] for w in decode_busy) == 4
    with Client(cluster.endpoint, timeout=30) as client:
        workers = wait_all_blocks_free(client)
        assert all(w["free_blocks"] == w["num_blocks"] for w in workers)
        assert client.status()["router"]["active"] == 0


def test_cancels_at_random_moments_leave_every_worker_up_and_exact(cluster, tiny_model):
    """Requests cancelled at random points of their lives (queued, prefilling, with the last
    chunk or the KV in flight, decoding): no worker dies or restarts, every block comes back,
    and a fresh request still matches transformers."""
    rng = random.Random(1234)
    before = {w["id"]: w["pid"] for w in Client(cluster.endpoint, timeout=30).status()["workers"]}

    async def one(client, prompt, max_tokens, cancel_after):
        stream = client.generate(prompt_token_ids=prompt, max_tokens=max_tokens, temperature=0)
        try:
            await asyncio.wait_for(_drain(stream), cancel_after)
        except asyncio.TimeoutError:
            pass
        finally:
            await stream.aclose()

    async def run():
        async with AsyncClient(cluster.endpoint, timeout=120) as client:
            await asyncio.gather(*(one(client, [rng.randrange(32, 127) for _ in range(rng.randrange(1, 200))],
                                       rng.randrange(1, 30), rng.random() * 0.4) for _ in range(200)))
    asyncio.run(run())
    prompt = list(b"after the storm")
    (expected,) = greedy_reference(tiny_model, [prompt], 8)
    with Client(cluster.endpoint, timeout=60) as client:
        workers = wait_all_blocks_free(client)
        assert {w["id"]: w["pid"] for w in workers if w["alive"]} == before
        assert client.complete(prompt_token_ids=prompt, max_tokens=8, temperature=0).token_ids == expected


async def _drain(stream):
    async for _ in stream:
        pass
