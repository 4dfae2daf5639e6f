"""Shared pieces of the router tests: the demo tokenizer and a model description."""
from __future__ import annotations

from models.demo import BOS_ID, EOS_ID, build_tokenizer
from models.tokenizer import Tokenizer
from router.model_info import ModelInfo


def demo_tokenizer() -> Tokenizer:
    """The demo model's byte-level tokenizer: token id = byte value, plus <s>=256, </s>=257."""
    return Tokenizer(build_tokenizer(), bos_token_id=BOS_ID, eos_token_ids=[EOS_ID], add_bos_token=True)


def model_info(max_model_len: int = 64, with_tokenizer: bool = True) -> ModelInfo:
    return ModelInfo(name="tiny", fingerprint="f" * 16, vocab_size=258, max_model_len=max_model_len,
                     eos_token_ids=(EOS_ID,), tokenizer=demo_tokenizer() if with_tokenizer else None)
