"""Session fixtures shared across test packages (imports stay inside them: router tests must
not pay for torch)."""
import os

import pytest

# Workers started by tests run eager: compiling decode graphs costs seconds per worker start,
# and most tests start several. The tests that cover compiled workers clear this.
os.environ.setdefault("PDSERVE_ENFORCE_EAGER", "1")

NUM_BLOCKS = 32
BLOCK_SIZE = 4


@pytest.fixture(scope="session")
def tiny_runner(tmp_path_factory):
    """A tiny model runner shared by the engine tests. Each test builds its own engine, so its
    own allocator and request state; only tests that run steps write into the pool."""
    from models.runner import ModelRunner
    from tests.tiny_models import make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path_factory.mktemp("m") / "llama", arch="llama", vocab_size=128)
    runner = ModelRunner(path, block_size=BLOCK_SIZE, num_blocks=NUM_BLOCKS)
    yield runner
    runner.close()


@pytest.fixture(scope="session")
def prefill_parts(tiny_runner):
    """``tiny_runner`` and rank 0's transfers for prefill engine tests."""
    from kvtransfer.sender import KVSender
    from prefill.engine import RankTransfers

    transfers = RankTransfers(KVSender(tiny_runner.pool, sender_id="test-prefill", rank=0, tp_size=1))
    yield tiny_runner, transfers
    transfers.close()
