import json
import os
import subprocess
import sys

import pytest
import torch

from models.demo import EOS_ID, FILES, demo_model_dir, demo_weights, write_demo_checkpoint
from models.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return demo_model_dir(tmp_path_factory.mktemp("cache"))


def test_files_in_hf_layout(demo_dir):
    assert demo_dir.name == "demo-v1"
    assert sorted(os.listdir(demo_dir)) == sorted(FILES)
    config = json.loads((demo_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_key_value_heads"] % 2 == 0  # TP=2 splits the kv heads
    assert json.loads((demo_dir / "generation_config.json").read_text())["eos_token_id"] == EOS_ID
    tok = Tokenizer.from_dir(demo_dir)
    assert tok.vocab_size == config["vocab_size"]
    assert tok.decode(tok.encode("demo ✓")) == "demo ✓"


def test_loads_with_transformers_and_output_varies(demo_dir):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(demo_dir).eval()
    assert sum(p.numel() for p in model.parameters()) == sum(w.size for w in demo_weights().values())
    tok = Tokenizer.from_dir(demo_dir)
    prompt = torch.tensor([tok.encode("Hello, world")])
    with torch.no_grad():
        logits = model(prompt).logits
        out = model.generate(prompt, max_new_tokens=48, min_new_tokens=48, do_sample=False)
    assert torch.isfinite(logits).all()
    generated = out[0, prompt.shape[1]:].tolist()
    assert len(generated) == 48
    assert len(set(generated)) >= 10  # not one token forever
    text = tok.decode(generated)
    assert sum(ch.isprintable() or ch == "\n" for ch in text) >= 0.8 * len(text)


def test_writes_are_deterministic(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    write_demo_checkpoint(first)
    write_demo_checkpoint(second)
    for name in FILES:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_generated_once_and_env_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PDSERVE_CACHE", str(tmp_path))
    path = demo_model_dir()
    assert path == tmp_path / "demo-v1"
    stamps = {name: (path / name).stat().st_mtime_ns for name in FILES}
    assert demo_model_dir() == path
    assert {name: (path / name).stat().st_mtime_ns for name in FILES} == stamps
    assert os.listdir(tmp_path) == ["demo-v1"]  # no temporary directory left behind


def test_concurrent_first_use(tmp_path):
    code = "import sys; from models.demo import demo_model_dir; print(demo_model_dir(sys.argv[1]))"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    try:
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0] * 4, [err for _, err in results]
    assert {out.strip() for out, _ in results} == {str(tmp_path / "demo-v1")}
    assert os.listdir(tmp_path) == ["demo-v1"]
    reference = tmp_path / "ref"
    reference.mkdir()
    write_demo_checkpoint(reference)
    for name in FILES:
        assert (tmp_path / "demo-v1" / name).read_bytes() == (reference / name).read_bytes()
