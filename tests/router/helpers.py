"""Shared pieces of the router tests: the demo tokenizer and a model description."""
from __future__ import annotations

from models.demo import BOS_ID, EOS_ID, build_tokenizer
from models.tokenizer import Tokenizer
from router.config import RouterConfig
from router.model_info import ModelInfo
from router.runtime import RouterThread


def demo_tokenizer() -> Tokenizer:
    """The demo model's byte-level tokenizer: token id = byte value, plus <s>=256, </s>=257."""
    return Tokenizer(build_tokenizer(), bos_token_id=BOS_ID, eos_token_ids=[EOS_ID], add_bos_token=True)


FINGERPRINT = "f" * 16


def model_info(max_model_len: int = 64, with_tokenizer: bool = True) -> ModelInfo:
    return ModelInfo(name="tiny", fingerprint=FINGERPRINT, vocab_size=258, max_model_len=max_model_len,
                     eos_token_ids=(EOS_ID,), tokenizer=demo_tokenizer() if with_tokenizer else None)


def make_router(tmp_path, **over) -> RouterThread:
    """A router on ipc endpoints under ``tmp_path``, serving ``model_info()``, in a thread."""
    config = RouterConfig(**{"frontend": f"ipc://{tmp_path}/c.ipc", "backend": f"ipc://{tmp_path}/w.ipc",
                             "max_queue": 4, "unavailable_timeout_s": 30.0, "heartbeat_timeout_s": 2.0,
                             "tick_s": 0.05, **over})
    return RouterThread(config, model_info()).start()
