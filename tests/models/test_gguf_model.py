"""A GGUF checkpoint serves the same model as the safetensors it was converted from, and
``--model`` resolves GGUF files, directories and names."""
import os

import pytest
import torch

from models.batch import SequenceChunk
from models.gguf_convert import is_converted
from models.registry import resolve_model
from models.runner import ModelRunner
from models.sampler import SamplingParams
from tests.models.gguf_files import gguf_from_checkpoint
from tests.tiny_models import make_tiny_checkpoint, single_thread

CASES = {
    "llama-gqa": dict(arch="llama", num_kv_heads=2),
    "llama-tied-head-dim-24": dict(arch="llama", num_kv_heads=1, tie=True, head_dim=24),
    "qwen2-bias": dict(arch="qwen2", num_kv_heads=2),
    "qwen3-qk-norm": dict(arch="qwen3", num_kv_heads=2, head_dim=32),
}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PDSERVE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("case", list(CASES))
def test_gguf_logits_equal_the_safetensors_checkpoint(tmp_path, cache, case):
    hf_dir = make_tiny_checkpoint(tmp_path / "hf", seed=5, **CASES[case])
    model_dir = resolve_model(gguf_from_checkpoint(hf_dir, tmp_path / "tiny.gguf"))
    assert model_dir.parent == cache / "gguf" and is_converted(model_dir)
    prompts = [[3, 17, 9, 44, 2, 8, 100], [5, 6]]
    logits = []
    with single_thread():
        for directory in (hf_dir, model_dir):
            runner = ModelRunner(directory, block_size=4, num_blocks=16)
            try:
                chunks = [SequenceChunk(p, 0, [2 * i, 2 * i + 1], SamplingParams(temperature=0))
                          for i, p in enumerate(prompts)]
                logits.append(runner.prompt_logits(chunks))
            finally:
                runner.close()
    for expected, got in zip(*logits):
        assert expected.std() > 0.1
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_resolve_converts_once_and_names_what_is_wrong(tmp_path, cache):
    hf_dir = make_tiny_checkpoint(tmp_path / "hf", seed=1)
    path = gguf_from_checkpoint(hf_dir, tmp_path / "holder" / "m.gguf", "Q8_0")
    first = resolve_model(path)
    stamp = (first / "config.json").stat().st_mtime_ns
    assert resolve_model(tmp_path / "holder") == first  # a directory holding one .gguf
    assert (first / "config.json").stat().st_mtime_ns == stamp  # cached: not converted again
    assert not (first / "tokenizer.json").exists()  # no vocabulary in the file: token ids only
    assert resolve_model(first) == first and resolve_model(hf_dir) == hf_dir
    os.utime(path, ns=(1, 1))  # the file changed: a new conversion
    assert resolve_model(path) != first
    (tmp_path / "holder" / "n.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="several .gguf files"):
        resolve_model(tmp_path / "holder")
    with pytest.raises(ValueError, match=r"neither a known model name \(smollm2-135m-instruct, demo\)"):
        resolve_model("no-such-model")
    with pytest.raises(ValueError, match="not a .gguf"):
        resolve_model(hf_dir / "config.json")
