"""Greedy outputs through ``pdserve serve`` equal transformers' for every layout and transport."""
import asyncio
import random

import pytest

from router.client import AsyncClient, Client
from tests.e2e.helpers import greedy_reference, serve, wait_all_blocks_free
from tests.router.helpers import demo_tokenizer

pytestmark = pytest.mark.slow

TEXTS = ["Hello, world!", "The quick brown fox jumps over the lazy dog. " * 3, "a", "pdserve ✓"]
MAX_TOKENS = 12


def prompts():
    rng = random.Random(7)
    tok = demo_tokenizer()
    ids = [tok.encode(t) for t in TEXTS]
    ids += [[rng.randrange(0, 256) for _ in range(n)] for n in (5, 17, 40, 70)]
    return ids


async def run_all(endpoint, requests, **params):
    async with AsyncClient(endpoint, timeout=120) as client:
        return await asyncio.gather(*(client.complete(**req, **params) for req in requests))


CONFIGS = {
    "colocated-1": ["--mode", "colocated"],
    "colocated-1-compiled": ["--mode", "colocated", "--max-num-seqs", "8"],  # graphs for 1, 2, 4, 8
    "disagg-1p1d-zmq": ["--kv-transport", "zmq"],
    "disagg-1p1d-shm": ["--kv-transport", "shm"],
    "disagg-1p1d-nixl": ["--kv-transport", "nixl"],
    "disagg-2p2d": ["--prefill", "2", "--decode", "2"],
    "colocated-tp2": ["--mode", "colocated", "--tp", "2"],
    "disagg-tp2": ["--tp", "2"],
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_outputs_equal_transformers(name, tiny_model, tmp_path, monkeypatch):
    if name.endswith("nixl"):
        pytest.importorskip("nixl")
    if name.endswith("compiled"):  # the workers' default: decode through compiled graphs
        monkeypatch.delenv("PDSERVE_ENFORCE_EAGER", raising=False)
    ids = prompts()
    expected = greedy_reference(tiny_model, ids, MAX_TOKENS)
    requests = [{"prompt": t} for t in TEXTS] + [{"prompt_token_ids": p} for p in ids[len(TEXTS):]]
    with serve(tmp_path, "--model", str(tiny_model), "--num-kv-blocks", "256", *CONFIGS[name]) as (ep, _):
        results = asyncio.run(run_all(ep, requests, max_tokens=MAX_TOKENS, temperature=0))
        if "--kv-transport" in CONFIGS[name]:
            transport = CONFIGS[name][CONFIGS[name].index("--kv-transport") + 1]
            with Client(ep, timeout=30) as client:
                (decode,) = [w for w in wait_all_blocks_free(client) if w["role"] == "decode"]
            assert set(decode["stats"]["kv_by_transport"]) == {transport}
    tok = demo_tokenizer()
    for req, prompt, want, got in zip(requests, ids, expected, results):
        assert got.token_ids == want, req
        assert got.num_prompt_tokens == len(prompt)
        assert got.finish_reason == ("stop" if want[-1] == 257 else "length")
        assert got.text == tok.decode(want)
        assert got.metrics.ttft > 0 and got.metrics.e2e >= got.metrics.ttft
        assert len(got.metrics.itl) == len(want) - 1
    compiled = "decode graphs for batch buckets (1, 2, 4, 8) ready" in (tmp_path / "serve.log").read_text()
    assert compiled == name.endswith("compiled")
