"""What every rank of a prefill worker does with a step plan: abort, begin, compute with
layer-wise sends, finish. Runs on the model thread (rank 0) or the main thread (ranks 1..K-1).

The model thread never waits on the network. A transfer that finishes or aborts moves to
``RankTransfers.closing`` and the step returns at once; rank 0's engine learns the outcome from
the transfer's future (``PrefillEngine.settle``, on the event loop) and only then lets its
source blocks be reused. Ranks 1..K-1 cannot see rank 0's futures, so before a step writes into
a block that one of their own closing transfers still reads, they wait for that transfer (rank 0
reused the block only after its own transfer of the same request let go of it, so this wait is
at most the skew between ranks; on rank 0 it never waits).
"""
from __future__ import annotations

from concurrent.futures import Future

from kvtransfer.spec import num_blocks_for
from kvtransfer.transport import TransferError
from models.runner import ModelRunner
from worker.step_plan import StepPlan


class RankTransfers:
    """One rank's transfers, by transfer id (each rank sends its own shard): ``active`` until
    finished or aborted, then ``closing`` until their future resolves."""

    def __init__(self, sender, reuse_timeout_s: float = 60.0):
        self.sender = sender
        self.reuse_timeout_s = reuse_timeout_s
        self.active: dict = {}
        self.closing: dict = {}

    def close(self) -> None:
        for transfer in self.active.values():
            transfer.abort("prefill worker shutting down")
        self.active.clear()
        self.closing.clear()
        self.sender.close()

    def wait_before_writing(self, block_ids: set[int]) -> None:
        """Wait for closing transfers that still read any of ``block_ids``; forget settled ones."""
        for transfer_id, transfer in list(self.closing.items()):
            if not transfer.future.done() and block_ids.intersection(transfer.block_ids):
                try:
                    transfer.future.exception(self.reuse_timeout_s)
                except TimeoutError:
                    raise RuntimeError(f"KV transfer {transfer_id} still reads blocks a step must "
                                       f"write after {self.reuse_timeout_s}s") from None
            if transfer.future.done():
                del self.closing[transfer_id]


def written_blocks(plan: StepPlan, block_size: int) -> set[int]:
    """Pool blocks the plan's chunks write K/V into."""
    written: set[int] = set()
    for chunk in plan.chunks:
        first = chunk.num_cached // block_size
        last = num_blocks_for(chunk.num_cached + len(chunk.token_ids), block_size)
        written.update(chunk.block_table[first:last])
    return written


def run_prefill_plan(runner: ModelRunner, transfers: RankTransfers, plan: StepPlan) -> dict:
    """Every rank: abort, begin, compute with layer-wise sends, finish; never waits on the network.

    Returns ``{"results": [...], "failed": [[transfer_id, reason], ...], "started": {transfer_id:
    future}}``: ``failed`` lists transfers that could not begin (the decode side has been told),
    ``started`` the futures of the transfers this step began (rank 0 watches them).
    """
    if not transfers.sender.is_alive():
        # Crash = exit on every rank: this rank's KV would never leave. On ranks 1..K-1 the
        # rank's process ends here and rank 0 sees a dead TP rank; rank 0's health says it too.
        raise RuntimeError(f"the KV sender thread of TP rank {transfers.sender.rank} stopped")
    for transfer_id in plan.aborts:
        transfer = transfers.active.pop(transfer_id, None)
        if transfer is not None:
            transfer.abort()
            transfers.closing[transfer_id] = transfer
    failed: list[list[str]] = []
    started: dict[str, Future] = {}
    for send in plan.sends:
        if send.begin:
            try:
                transfer = transfers.sender.start(send.dest, send.src, send.num_tokens)
            except (ValueError, TransferError) as exc:
                failed.append([send.transfer_id, str(exc)])
                _tell_decode_no_write(transfers, send.dest)
                continue
            transfers.active[send.transfer_id] = transfer
            started[send.transfer_id] = transfer.future
    if not plan.chunks:
        return {"results": [], "failed": failed, "started": started}
    transfers.wait_before_writing(written_blocks(plan, runner.block_size))

    on_gpu = runner.pool.device.type == "cuda"

    def on_layer_done(layer: int) -> None:
        # On a GPU the layer's writes are only queued here: an event marks when they are done.
        ready = layer_written_event() if on_gpu else None
        for send in plan.sends:
            transfer = transfers.active.get(send.transfer_id)
            if transfer is not None:
                transfer.send_layer(layer, send.start, send.stop, ready=ready)

    results = runner.step(plan.sequence_chunks(), on_layer_done)
    for send, result in zip(plan.sends, results):
        transfer = transfers.active.pop(send.transfer_id, None) if send.last else None
        if transfer is not None:
            transfer.finish(result.token_id, result.logprob)
            transfers.closing[send.transfer_id] = transfer
    return {"results": results, "failed": failed, "started": started}


def layer_written_event():
    """A CUDA event recorded on the current stream, after the K/V writes queued so far."""
    import torch

    event = torch.cuda.Event()
    event.record()
    return event


def _tell_decode_no_write(transfers: RankTransfers, dest) -> None:
    """A transfer that failed to begin: the decode side may reuse its blocks at once. Rank 0
    speaks for the group (a reject releases the reservation for every rank)."""
    if transfers.sender.rank != 0:
        return
    try:
        transfers.sender.reject(dest, "the prefill side could not start the transfer")
    except ValueError:
        pass  # a destination too malformed to parse names no decode rank to tell
