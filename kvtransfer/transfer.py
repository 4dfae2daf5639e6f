"""The caller's handle on one request's KV transfer (created by ``KVSender.start``).

State on the caller's side: open -> finished (``finish``) or aborted (``abort``). Every call
only validates and enqueues; the sender's thread does the work and resolves ``future``.
"""
from __future__ import annotations

from concurrent.futures import Future
from typing import TYPE_CHECKING

from kvtransfer.plan import block_span
from kvtransfer.transport import Destination

if TYPE_CHECKING:
    from kvtransfer.sender import KVSender


class KVTransfer:
    """One request's KV on its way from this prefill rank to a destination."""

    def __init__(self, sender: KVSender, dest: Destination, block_ids: list[int], num_tokens: int):
        self.transfer_id = dest.transfer_id
        self.dest = dest
        self.block_ids = block_ids
        self.num_tokens = num_tokens
        self.future: Future = Future()
        self._sender = sender
        self._state = "open"  # open -> finished | aborted (caller side)
        self.cancelled = False  # set on abort or failure: the sender thread drops queued work

    def send_layer(self, layer_idx: int, start: int = 0, stop: int | None = None, *,
                   ready=None) -> None:
        """Queue layer ``layer_idx``'s K/V of tokens ``[start, stop)`` (default: all tokens).

        Call it from ``on_layer_done``; for a chunked prefill pass the chunk's token range so
        only the blocks that chunk filled are sent. ``ready``: on a GPU, a CUDA event recorded
        after the layer's K/V writes were queued; the sender thread waits on it before reading
        the blocks (the hook runs when the writes are queued, not done). Ignored after ``abort``.
        """
        if self._state == "aborted":
            return
        if self._state != "open":
            raise RuntimeError(f"transfer {self.transfer_id} is finished; no more layers can be sent")
        num_layers = self._sender.pool.spec.num_layers
        if not 0 <= layer_idx < num_layers:
            raise ValueError(f"layer {layer_idx} is outside the model's {num_layers} layers")
        self._queue_layers(range(layer_idx, layer_idx + 1), start, stop, ready)

    def send_all(self, start: int = 0, stop: int | None = None) -> None:
        """Queue every layer of tokens ``[start, stop)`` at once (prefix-cache hits, or sending
        after prefill): one copy or WRITE per block run covers all layers."""
        if self._state == "aborted":
            return
        if self._state != "open":
            raise RuntimeError(f"transfer {self.transfer_id} is finished; no more layers can be sent")
        self._queue_layers(range(self._sender.pool.spec.num_layers), start, stop)

    def _queue_layers(self, layers: range, start: int, stop: int | None, ready=None) -> None:
        stop = self.num_tokens if stop is None else stop
        if stop > self.num_tokens:
            raise ValueError(f"token range ends at {stop}, past the transfer's {self.num_tokens} tokens")
        first, last = block_span(start, stop, self._sender.pool.spec.block_size)
        self._sender._put(("layers", self, layers, first, last, ready))

    def finish(self, first_token_id: int, first_logprob: float) -> None:
        """Every layer was sent: tell the decode side, with the first sampled token."""
        if self._state != "open":
            raise RuntimeError(f"transfer {self.transfer_id} was already {self._state}")
        self._state = "finished"
        self._sender._put(("finish", self, int(first_token_id), float(first_logprob)))

    def abort(self, reason: str = "aborted by the prefill worker") -> None:
        """Stop sending; queued layers are dropped and the decode side is told."""
        if self._state == "aborted" or self.future.done():
            return
        self._state = "aborted"
        self.cancelled = True
        self._sender._put(("abort", self, reason))

    def wait(self, timeout: float | None = None) -> None:
        """Block until the source blocks are no longer read. Raises TransferError if the
        transfer failed or was aborted, TimeoutError if ``timeout`` passes first."""
        self.future.result(timeout)
