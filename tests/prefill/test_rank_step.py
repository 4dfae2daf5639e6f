"""``run_prefill_plan`` against a real decode receiver: the KV that lands is the KV the step
computed, bit for bit. On a GPU the sender reads each layer only after the layer's CUDA event
(the hook runs when the writes are queued, not done); without one the same path runs on CPU."""
import tempfile

import pytest
import torch

from kvtransfer.allocator import BlockAllocator
from kvtransfer.coordinator import KVCoordinator
from kvtransfer.pool import KVPool
from kvtransfer.receiver import KVReceiver
from kvtransfer.sender import KVSender
from kvtransfer.transport import TransferDone
from models.runner import ModelRunner
from prefill.rank_step import RankTransfers, run_prefill_plan
from tests.tiny_models import make_tiny_checkpoint
from worker.step_plan import KVSend, PlanChunk, StepPlan

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="needs a GPU"))]


@pytest.fixture(params=DEVICES)
def runner(request, tiny_runner, tmp_path):
    if request.param == "cpu":
        yield tiny_runner
        return
    model = make_tiny_checkpoint(tmp_path / "llama", arch="llama", vocab_size=128)
    runner = ModelRunner(model, device=request.param, block_size=4, num_blocks=16)
    yield runner
    runner.close()


@pytest.fixture()
def decode_side(runner):
    run_dir = tempfile.mkdtemp(prefix="pdkv-", dir="/tmp")
    pool = KVPool(runner.kv_spec, 16)
    coordinator = KVCoordinator(BlockAllocator(16, 4), endpoint=f"ipc://{run_dir}/c", tp_size=1)
    receiver = KVReceiver(pool, endpoint=f"ipc://{run_dir}/r0", coordinator=f"ipc://{run_dir}/c")
    transfers = RankTransfers(KVSender(runner.pool, sender_id="P", rank=0, tp_size=1))
    coordinator.wait_ready()
    yield pool, coordinator, transfers
    transfers.close()
    receiver.close()
    coordinator.close()


SAMPLING = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": None}


def test_a_transfer_that_cannot_begin_releases_the_decode_reservation(runner, decode_side):
    if runner.pool.device.type != "cpu":
        pytest.skip("the CPU case covers it")
    _, coordinator, transfers = decode_side
    dest = coordinator.reserve("t-small", 4, transport="zmq", writer="P")     # one block
    prompt = list(range(3, 17))
    plan = StepPlan((PlanChunk(prompt, 0, [9, 2, 7, 4], SAMPLING, 0),),
                    (KVSend("t-small", True, True, 0, len(prompt), dest, [9, 2, 7, 4], len(prompt)),))
    output = run_prefill_plan(runner, transfers, plan)
    ((transfer_id, reason),) = output["failed"]
    assert transfer_id == "t-small" and "4 source blocks for a destination of 1" in reason
    for _ in range(500):                      # the decode side hears at once, not at a timeout
        coordinator.poll(0.02)
        if coordinator.stats()["num_free_blocks"] == 16:
            break
    assert coordinator.stats()["num_free_blocks"] == 16


def test_the_kv_that_lands_is_the_kv_the_step_wrote(runner, decode_side):
    decode_pool, coordinator, transfers = decode_side
    prompt = list(range(3, 17))                                    # 14 tokens, 4 blocks
    dest = coordinator.reserve("t1", 16, transport="zmq", writer="P")
    src = [9, 2, 7, 4]
    plan = StepPlan((PlanChunk(prompt, 0, src, SAMPLING, 0),),
                    (KVSend("t1", True, True, 0, len(prompt), dest, src, len(prompt)),))
    output = run_prefill_plan(runner, transfers, plan)
    assert output["failed"] == [] and output["started"]["t1"].result(60) is None
    events = []
    for _ in range(500):
        events += coordinator.poll(0.02)
        if events:
            break
    (done,) = events
    assert isinstance(done, TransferDone) and done.first_token_id == output["results"][0].token_id
    sent = runner.pool.kv[:, :, src].flatten(2, 3)[:, :, :len(prompt)].cpu()
    landed = decode_pool.kv[:, :, done.block_ids[:4]].flatten(2, 3)[:, :, :len(prompt)]
    assert torch.equal(sent, landed)
