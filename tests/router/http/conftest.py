"""One disaggregated cluster (1 prefill + 1 decode worker, tiny model with a chat template)
serving HTTP on a free port, shared by the HTTP tests that need workers."""
from __future__ import annotations

import json

import pytest

from tests.tiny_models import make_tiny_checkpoint

# ChatML over the byte-level demo tokenizer: the markers are plain text to it.
CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
MODEL_NAME = "tiny-chat"
BLOCK_SIZE = 16
NUM_KV_BLOCKS = 96


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("http") / "tiny-chat", "llama",
                                vocab_size=258, with_tokenizer=True, seed=5)
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    return path


@pytest.fixture(scope="session")
def http_cluster(chat_model):
    """A LocalCluster with HTTP on 127.0.0.1:<free port>; ``.http_url`` is its base URL."""
    from router.http.config import HttpConfig
    from router.launcher import LocalCluster

    cluster = LocalCluster(str(chat_model), mode="disagg", num_prefill=1, num_decode=1,
                           block_size=BLOCK_SIZE, num_kv_blocks=NUM_KV_BLOCKS,
                           http=HttpConfig(port=0, served_model_name=MODEL_NAME))
    with cluster:
        yield cluster
