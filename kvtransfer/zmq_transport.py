"""zmq transport: a msgpack ``kv`` header followed by raw K and V frames, one pair per block run.

The sender hands zero-copy frames (views of its pool) to ZeroMQ and tracks them, so the source
blocks stay untouched until ZeroMQ is done with them; the receiving rank checks the header
against its open transfer and copies the frames into the reserved blocks of its own pool.
Messages are at most ``max_message_bytes`` and the DEALER's high-water mark bounds how many are
queued, so bytes in flight are bounded and a slow receiver blocks the sender's thread.
"""
from __future__ import annotations

import time
from typing import Callable, Iterator

import torch
import zmq

from kvtransfer.plan import HeadSlice
from kvtransfer.pool import KVPool
from kvtransfer.transport import TransferError
from kvtransfer.wire import WireError, int_list, pack


class ZmqLink:
    """The prefill rank's DEALER connection to one decode rank's endpoint (data and notices)."""

    def __init__(self, ctx: zmq.Context, endpoint: str, *, sndhwm: int, poll_ms: int = 20):
        self.endpoint = endpoint
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.SNDHWM, sndhwm)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDTIMEO, poll_ms)
        self.sock.connect(endpoint)

    def send(self, parts: list, *, deadline: float, cancelled: Callable[[], bool],
             what: str) -> zmq.MessageTracker | None:
        """Send one multipart message, waiting while the receiver applies backpressure.

        Large frames go zero-copy; the returned tracker says when ZeroMQ released them.
        Raises TransferError when ``deadline`` passes or ``cancelled()`` turns true first.
        """
        frames = [p if isinstance(p, bytes) else zmq.Frame(p, copy=False, track=True) for p in parts]
        while True:
            try:
                self.sock.send_multipart(frames, copy=False)
                break
            except zmq.Again:
                if cancelled():
                    raise TransferError(f"{what}: cancelled while {self.endpoint} applied backpressure") from None
                if time.monotonic() > deadline:
                    raise TransferError(f"{what}: {self.endpoint} accepted nothing before the transfer "
                                        "deadline; is the decode worker alive?") from None
        tracked = [f for f in frames if isinstance(f, zmq.Frame)]
        return zmq.MessageTracker(*tracked) if tracked else None

    def request(self, payload: bytes, timeout_s: float) -> bytes:
        """A one-off request/reply on this link (used for the NIXL metadata handshake)."""
        self.send([payload], deadline=time.monotonic() + timeout_s, cancelled=lambda: False,
                  what="handshake")
        if not self.sock.poll(int(timeout_s * 1000)):
            raise TransferError(f"no handshake reply from {self.endpoint} within {timeout_s}s")
        return self.sock.recv()

    def close(self) -> None:
        self.sock.close(linger=0)


def _wire_bytes(t: torch.Tensor):
    """A buffer over ``t``'s bytes: zero-copy for a contiguous CPU view, else a packed copy."""
    if t.device.type != "cpu":
        t = t.cpu()
    return t.contiguous().view(-1).view(torch.uint8).numpy()


def blocks_per_message(spec, head_slice: HeadSlice, max_message_bytes: int) -> int:
    """How many blocks of one layer (K and V of the slice's heads) fit in one message."""
    ss, se = head_slice.src
    return max(1, max_message_bytes // (2 * spec.block_size * (se - ss) * spec.head_dim * spec.itemsize))


def layer_messages(pool: KVPool, layer: int, runs: list[tuple[int, int, int]], head_slice: HeadSlice,
                   source: dict, max_message_bytes: int) -> Iterator[list]:
    """The ``kv`` messages (header, then K and V frames per run) for one layer's runs.

    ``source`` holds the header's source fields (x, s, p, pt). Runs are packed into messages of
    at most ``max_message_bytes`` (a single run larger than that goes alone; callers split runs
    with ``plan.block_runs(max_blocks=...)``).
    """
    (ss, se), dst_heads = head_slice.src, list(head_slice.dst)
    spec = pool.spec
    run_bytes = 2 * spec.block_size * (se - ss) * spec.head_dim * spec.itemsize
    k, v = pool.layer(layer)
    batch: list[tuple[int, int, int]] = []

    def message() -> list:
        header = pack("kv", **source, l=layer, h=dst_heads, runs=[[d, n] for _, d, n in batch])
        frames: list = [header]
        for s, _, n in batch:
            # [n, block_size, heads, head_dim]
            frames += [_wire_bytes(k[s:s + n, :, ss:se]), _wire_bytes(v[s:s + n, :, ss:se])]
        return frames

    size = 0
    for run in runs:
        if batch and size + run[2] * run_bytes > max_message_bytes:
            yield message()
            batch, size = [], 0
        batch.append(run)
        size += run[2] * run_bytes
    if batch:
        yield message()


def land_layer(pool: KVPool, msg: dict, frames: list[zmq.Frame], blocks: frozenset[int]) -> int:
    """Copy a ``kv`` message's frames into ``pool``; returns bytes written.

    Everything is checked before the first byte is written: the layer, the head range, that
    every destination block belongs to the transfer (``blocks``), and every frame's size.
    Raises WireError on any mismatch.
    """
    spec = pool.spec
    layer = msg["l"]
    if not 0 <= layer < spec.num_layers:
        raise WireError(f"layer {layer} is outside the model's {spec.num_layers} layers")
    heads = int_list(msg["h"], "h")
    num_heads = pool.shape[4]
    if len(heads) != 2 or not 0 <= heads[0] < heads[1] <= num_heads:
        raise WireError(f"head range {heads} does not fit this rank's {num_heads} kv heads")
    runs = msg["runs"]
    if len(frames) != 2 * len(runs):
        raise WireError(f"{len(runs)} runs need {2 * len(runs)} frames, got {len(frames)}")
    h0, h1 = heads
    block_bytes = spec.block_size * (h1 - h0) * spec.head_dim * spec.itemsize
    checked = []
    for i, run in enumerate(runs):
        if not isinstance(run, list) or len(int_list(run, "runs")) != 2 or run[1] <= 0:
            raise WireError("each run must be [first_block, num_blocks]")
        start, n = run
        if any(b not in blocks for b in range(start, start + n)):
            raise WireError(f"run {run} writes blocks outside the reservation")
        for frame in frames[2 * i:2 * i + 2]:
            if len(frame.buffer) != n * block_bytes:
                raise WireError(f"frame of {len(frame.buffer)} bytes for a run of {n * block_bytes}")
        checked.append((start, n, frames[2 * i], frames[2 * i + 1]))
    k, v = pool.layer(layer)
    for start, n, fk, fv in checked:
        for dst, frame in ((k, fk), (v, fv)):
            view = dst[start:start + n, :, h0:h1]  # [n, block_size, heads, head_dim]
            view.copy_(torch.frombuffer(frame.buffer, dtype=pool.dtype).view(view.shape))
    return 2 * sum(n for _, n, _, _ in checked) * block_bytes
