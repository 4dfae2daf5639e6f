"""zmq transport: a msgpack ``kv`` header followed by raw K and V frames, one pair per segment.

Large block runs go as zero-copy frames (views of the sender's pool), tracked so the source
blocks stay untouched until ZeroMQ is done with them; short runs of a fragmented pool are
gathered into one frame. The receiving rank checks the header against its open transfer and
copies (or scatters) the frames into the reserved blocks of its own pool.
Messages are at most ``max_message_bytes`` and the DEALER's high-water mark bounds how many are
queued, so bytes in flight are bounded and a slow receiver blocks the sender's thread.
"""
from __future__ import annotations

import time
from typing import Callable, Iterator

import torch
import zmq

from kvtransfer.blockcopy import gather_blocks, scatter_blocks
from kvtransfer.plan import SOLO_RUN_BYTES, HeadSlice, group_runs, slice_block_bytes
from kvtransfer.pool import KVPool
from kvtransfer.transport import TransferError
from kvtransfer.wire import WireError, int_list, pack


class ZmqLink:
    """The prefill rank's DEALER connection to one decode rank's endpoint (data and notices)."""

    def __init__(self, ctx: zmq.Context, endpoint: str, *, sndhwm: int, sndbuf: int, poll_ms: int = 20):
        self.endpoint = endpoint
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.SNDHWM, sndhwm)
        self.sock.setsockopt(zmq.SNDBUF, sndbuf)  # big kernel buffers: fewer, larger socket writes
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDTIMEO, poll_ms)
        self.sock.connect(endpoint)

    def send(self, parts: list, *, deadline: float,
             cancelled: Callable[[], bool] = lambda: False) -> zmq.MessageTracker | None:
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
                    raise TransferError(f"cancelled while {self.endpoint} applied backpressure") from None
                if time.monotonic() > deadline:
                    raise TransferError(f"{self.endpoint} accepted nothing before the deadline; "
                                        "is the decode worker alive?") from None
        tracked = [f for f in frames if isinstance(f, zmq.Frame)]
        return zmq.MessageTracker(*tracked) if tracked else None

    def request(self, payload: bytes, timeout_s: float) -> bytes:
        """A one-off request/reply on this link (used for the NIXL metadata handshake)."""
        self.send([payload], deadline=time.monotonic() + timeout_s)
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


def layer_messages(pool: KVPool, layer: int, runs: list[tuple[int, int, int]], head_slice: HeadSlice,
                   source: dict, max_message_bytes: int) -> Iterator[list]:
    """The ``kv`` messages for one layer's runs: a header, then a K and a V frame per segment.

    A segment is a group of runs (``plan.group_runs``): a large run goes as zero-copy views of
    the pool, shorter runs are gathered into one new frame. ``source`` holds the header's
    source fields (x, s, p, pt). Messages stay under ``max_message_bytes`` unless a single run
    is larger (callers split runs with ``plan.block_runs(max_blocks=...)``).
    """
    (ss, se), dst_heads = head_slice.src, list(head_slice.dst)
    block_bytes = slice_block_bytes(pool.spec, head_slice.src)
    min_alone = max(1, SOLO_RUN_BYTES // block_bytes)
    k, v = pool.layer(layer)  # each [num_blocks, block_size, heads, head_dim]

    def message(batch: list[tuple[int, int, int]]) -> list:
        segments, frames = [], []
        for group in group_runs(batch, min_alone):
            segments.append([[d, n] for _, d, n in group])
            if len(group) == 1:
                s, _, n = group[0]
                frames += [_wire_bytes(k[s:s + n, :, ss:se]), _wire_bytes(v[s:s + n, :, ss:se])]
            else:
                ids = [s + i for s, _, n in group for i in range(n)]
                frames += [_wire_bytes(gather_blocks(part, ids, (ss, se))) for part in (k, v)]
        return [pack("kv", **source, l=layer, h=dst_heads, segs=segments), *frames]

    batch: list[tuple[int, int, int]] = []
    size = 0
    for run in runs:
        if batch and size + 2 * run[2] * block_bytes > max_message_bytes:
            yield message(batch)
            batch, size = [], 0
        batch.append(run)
        size += 2 * run[2] * block_bytes
    if batch:
        yield message(batch)


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
    segments = msg["segs"]
    if len(frames) != 2 * len(segments):
        raise WireError(f"{len(segments)} segments need {2 * len(segments)} frames, got {len(frames)}")
    block_bytes = slice_block_bytes(spec, heads)
    checked = []
    for i, segment in enumerate(segments):
        if not isinstance(segment, list) or not segment:
            raise WireError("each segment must be a non-empty list of [first_block, num_blocks] runs")
        ids = []
        for run in segment:
            if not isinstance(run, list) or len(int_list(run, "segs")) != 2 or run[1] <= 0:
                raise WireError("each run must be [first_block, num_blocks]")
            ids += range(run[0], run[0] + run[1])
        if any(b not in blocks for b in ids):
            raise WireError(f"segment {segment} writes blocks outside the reservation")
        for frame in frames[2 * i:2 * i + 2]:
            if len(frame.buffer) != len(ids) * block_bytes:
                raise WireError(f"frame of {len(frame.buffer)} bytes for {len(ids)} blocks of {block_bytes}")
        checked.append((segment, ids, frames[2 * i:2 * i + 2]))
    h0, h1 = heads
    for segment, ids, kv_frames in checked:
        for part, frame in zip(pool.layer(layer), kv_frames):
            src = torch.frombuffer(frame.buffer, dtype=pool.dtype).view(len(ids), spec.block_size, h1 - h0, -1)
            if len(segment) == 1:
                part[ids[0]:ids[0] + len(ids), :, h0:h1].copy_(src)
            else:
                scatter_blocks(part, ids, (h0, h1), src)
    return 2 * sum(len(ids) for _, ids, _ in checked) * block_bytes
