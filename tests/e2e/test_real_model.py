"""The default model, SmolLM2-135M-Instruct (a Q4_1 GGUF from the package index), served end to
end: greedy answers to chats equal transformers' own load of the same GGUF file, token for
token, in every serving shape, and they stop at <|im_end|>.

The wheel, its conversion and transformers' reference are cached under $PDSERVE_CACHE
(default ~/.cache/pdserve), so only the first run downloads and computes them.
"""
import asyncio
import hashlib
import json
import subprocess
import sys

import pytest

from models.registry import DEFAULT_MODEL, cache_root, resolve_model
from models.tokenizer import Tokenizer
from router.chat_template import ChatTemplate
from router.client import AsyncClient, Client
from tests.e2e.helpers import serve, wait_all_blocks_free
from worker.runner import EAGER_ENV

pytestmark = pytest.mark.slow

IM_END = 2  # <|im_end|>, the model's EOS
MAX_TOKENS = 48
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
CHATS = [
    CAPITAL,
    [{"role": "user", "content": "Name three primary colors."}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "Who wrote Romeo and Juliet?"}],
    [{"role": "user", "content": "Explain in two sentences why the sky is blue."}],
    [{"role": "system", "content": "You are a pirate. Answer like one."},
     {"role": "user", "content": "How are you today?"}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a fun fact about octopuses."}],
    [{"role": "user", "content": "Translate 'good morning' into Spanish and French."}],
]
SHAPES = {  # one server each; the first serves the default model with no --model at all
    # Compiled decode graphs (the others run eager), for batches of up to the 8 chats.
    "colocated": ["--mode", "colocated", "--max-num-seqs", "8"],
    "1p1d-shm": ["--kv-transport", "shm"],
    "2p2d-zmq": ["--prefill", "2", "--decode", "2", "--kv-transport", "zmq"],
    "tp3": ["--mode", "colocated", "--tp", "3"],  # 9 heads and 3 kv heads over 3 ranks
}
# Three ranks on a small machine step slowly: TP runs the chats whose answers are short (8-14
# tokens, still past a block boundary), the other shapes all of them.
CHATS_OF = {"tp3": [0, 1, 7]}


@pytest.fixture(scope="module")
def model_dir():
    return resolve_model(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def reference(model_dir):
    """transformers' chat prompts and greedy answers, computed once and cached on disk (keyed
    by the GGUF's bytes, the chats and transformers' version)."""
    import transformers

    gguf = next(model_dir.glob("*.gguf"))
    key = hashlib.sha256()
    with open(gguf, "rb") as f:
        while block := f.read(1 << 24):
            key.update(block)
    key.update(json.dumps([CHATS, MAX_TOKENS, transformers.__version__]).encode())
    path = cache_root() / "test-reference" / f"smollm2-{key.hexdigest()[:16]}.json"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(_transformers_reference(gguf)))
        tmp.replace(path)
    return json.loads(path.read_text())


def _transformers_reference(gguf) -> dict:
    import tempfile
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as alone:  # transformers must see the GGUF and nothing else
        (Path(alone) / gguf.name).symlink_to(gguf)
        tokenizer = AutoTokenizer.from_pretrained(alone, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(alone, gguf_file=gguf.name,
                                                     dtype=torch.float32).eval()
    texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in CHATS]
    prompts = [list(tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"]) for c in CHATS]
    width = max(map(len, prompts))  # one left-padded batch
    ids = torch.tensor([[IM_END] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_TOKENS,
                             do_sample=False, eos_token_id=IM_END, pad_token_id=IM_END)
    outputs = []
    for row in out[:, width:].tolist():
        outputs.append(row[:row.index(IM_END) + 1] if IM_END in row else row)
    return {"texts": texts, "prompts": prompts, "outputs": outputs}


def test_chat_template_renders_as_transformers_does(model_dir, reference):
    template = ChatTemplate.from_model_dir(model_dir)
    tokenizer = Tokenizer.from_dir(model_dir)
    for chat, text, ids in zip(CHATS, reference["texts"], reference["prompts"]):
        rendered = template.render(chat, add_generation_prompt=True)
        assert rendered == text
        assert tokenizer.encode(rendered, add_special_tokens=False) == ids
    assert tokenizer.eos_token_ids == (IM_END,)


def test_transformers_answers_the_capital_question(reference):
    answer = reference["outputs"][0]
    assert answer[-1] == IM_END and len(answer) < MAX_TOKENS  # it stops by itself


async def _chat_all(endpoint, chats):
    async with AsyncClient(endpoint, timeout=300) as client:
        return await asyncio.gather(*(client.chat_complete(c, max_tokens=MAX_TOKENS, temperature=0)
                                      for c in chats))


@pytest.mark.parametrize("shape", list(SHAPES))
def test_greedy_chats_equal_transformers(shape, model_dir, reference, tmp_path, monkeypatch):
    model = [] if shape == "colocated" else ["--model", str(model_dir)]
    if shape == "colocated":  # the serving default: decode steps through compiled graphs
        monkeypatch.delenv(EAGER_ENV, raising=False)
    with serve(tmp_path, *model, "--num-kv-blocks", "128", *SHAPES[shape], timeout_s=600) as (ep, _):
        chosen = CHATS_OF.get(shape, range(len(CHATS)))
        results = asyncio.run(_chat_all(ep, [CHATS[i] for i in chosen]))
        with Client(ep, timeout=60) as client:
            assert client.status()["router"]["model"] == DEFAULT_MODEL
            wait_all_blocks_free(client)
            if shape == "colocated":  # the blocking client and the command line chat too
                capital = client.chat_complete("What is the capital of France?", temperature=0)
                assert capital.token_ids == reference["outputs"][0]
                chunks = list(client.chat(CAPITAL, temperature=0))
                assert [t for c in chunks for t in c.token_ids] == reference["outputs"][0]
                assert "".join(c.text for c in chunks) == capital.text
        if shape == "colocated":
            out = subprocess.run([sys.executable, "-m", "router.cli", "generate", "--endpoint", ep,
                                  "--chat", "What is the capital of France?", "--temperature", "0"],
                                 capture_output=True, text=True, timeout=120)
            assert out.returncode == 0 and "Paris" in out.stdout and "finish: stop" in out.stderr
    if shape == "colocated":
        assert "decode graphs for batch buckets (1, 2, 4, 8) ready" in (tmp_path / "serve.log").read_text()
    assert len(results) == len(chosen)
    for i, got in zip(chosen, results):
        want = reference["outputs"][i]
        assert got.token_ids == want, CHATS[i]
        assert got.num_prompt_tokens == len(reference["prompts"][i])
        assert got.finish_reason == ("stop" if want[-1] == IM_END else "length")
    assert "Paris" in results[0].text and results[0].finish_reason == "stop"
    assert "<|im_end|>" not in results[0].text
