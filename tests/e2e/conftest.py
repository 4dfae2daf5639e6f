import pytest

from tests.tiny_models import make_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A 2-layer llama with the byte-level tokenizer (vocab 258, EOS 257), 2 kv heads (TP 2 ok)."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "llama", "llama", num_kv_heads=2,
                                vocab_size=258, with_tokenizer=True, seed=3)


@pytest.fixture(scope="session")
def other_model(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("other") / "llama", "llama", num_kv_heads=2,
                                vocab_size=258, with_tokenizer=True, seed=4, num_layers=3)
