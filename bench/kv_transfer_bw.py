"""KV transport benchmark: bandwidth of each transport next to this machine's memcpy, and the
time to first token with layer-wise streaming versus sending after prefill.

    python -m bench.kv_transfer_bw --json kv_transfer_bw.json

Model: Qwen2.5-0.5B-like KV (24 layers, 2 kv heads, head_dim 64, bfloat16, blocks of 16
tokens): 12 KiB per token, 24 MiB for one 2,048-token request, 768 MiB for 32 of them. The
decode side (coordinator, receiver, shared-memory pool, NIXL agent) runs in its own process;
the prefill side (pool, sender) in this one. A transfer's time runs from the first ``start`` to
the decode side's ``TransferDone`` for the last request (CLOCK_MONOTONIC is shared by both).
Destinations are consecutive blocks, as from a fresh allocator; "fragmented" repeats the single
request with the decode free list reversed, so every block is its own run.

memcpy is torch ``copy_`` of 512 MiB with the default intra-op threads, measured right before
each transport so that both see the same machine load; each ratio is against that value.

Layer-wise: a prefill of 24 layers, each a real matmul workload calibrated to ``--layer-ms``
and run on one core (as a GPU would leave the CPU to the transfer), with ``send_layer`` after
each layer ("layerwise") or ``send_all`` after the last ("after prefill"); TTFT is from prefill
start until the decode side holds the KV and the first token. A real ModelRunner prefill of a
0.5B model over 2,048 tokens takes tens of seconds on a small CPU, which would hide any
transfer; the calibrated layers keep the GPU-like ratio of compute to transfer.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import statistics
import tempfile
import time


import torch

from kvtransfer.allocator import BlockAllocator
from kvtransfer.coordinator import KVCoordinator
from kvtransfer.nixl_transport import nixl_available
from kvtransfer.pool import KVPool
from kvtransfer.receiver import KVReceiver
from kvtransfer.sender import KVSender
from kvtransfer.spec import KVSpec
from kvtransfer.transport import TransferDone

SPEC = KVSpec(num_layers=24, num_kv_heads=2, head_dim=64, block_size=16, dtype="bfloat16")
TOKENS = 2048
BLOCKS_PER_REQUEST = TOKENS // SPEC.block_size
REQUEST_BYTES = BLOCKS_PER_REQUEST * SPEC.block_bytes()


def memcpy_gbps(nbytes: int = 512 << 20, repeats: int = 5) -> float:
    """Large tensor copy_ on this machine (read + write of ``nbytes`` counted as nbytes)."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.zeros_like(src)
    dst.copy_(src)  # fault the pages in
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return nbytes / statistics.median(times) / 1e9


def decode_main(conn, num_blocks: int, run_dir: str) -> None:
    """The decode process: answers ("reserve", n, transport) and ("wait", n) from the bench."""
    torch.set_num_threads(1)
    pool = KVPool(SPEC, num_blocks, backend="shm")
    pool.kv.fill_(0)  # fault the shared pages in before timing
    allocator = BlockAllocator(num_blocks, SPEC.block_size)
    coord = KVCoordinator(allocator, endpoint=f"ipc://{run_dir}/ctrl")
    receiver = KVReceiver(pool, endpoint=f"ipc://{run_dir}/kv", coordinator=coord.endpoint,
                          nixl=nixl_available())
    coord.wait_ready()
    conn.send(coord.describe()["capabilities"]["transports"])
    serial = 0
    while True:
        command = conn.recv()
        if command[0] == "reserve":
            _, count, transport = command
            dests = []
            for _ in range(count):
                serial += 1
                dests.append(coord.reserve(f"bench-{serial}", TOKENS, transport=transport))
            conn.send(dests)
        elif command[0] == "wait":
            _, pending, fragment = command
            failures, last = [], 0.0
            while pending:
                for event in coord.poll(60.0):
                    last = time.monotonic()
                    pending -= 1
                    if isinstance(event, TransferDone):
                        # ``free`` appends in reverse: this leaves the blocks ascending (the next
                        # request gets consecutive blocks) or, to fragment the pool, descending.
                        allocator.free(sorted(event.block_ids, reverse=not fragment))
                    else:
                        failures.append(event.reason)
            coord.poll(0.05)  # let aborted reservations leave quarantine
            conn.send((last, failures))
        else:
            break
    receiver.close()
    coord.close()
    pool.close()
    conn.send("closed")


class DecodeProcess:
    def __init__(self, num_blocks: int, run_dir: str):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=decode_main, args=(child, num_blocks, run_dir), daemon=True)
        self.proc.start()
        self.transports = self.conn.recv()

    def reserve(self, count: int, transport: str) -> list[dict]:
        self.conn.send(("reserve", count, transport))
        return self.conn.recv()

    def wait(self, count: int, fragment: bool = False) -> float:
        """Time of the last of ``count`` completions; their blocks are freed in ascending order
        (so the next reservation is contiguous), or reversed with ``fragment``."""
        self.conn.send(("wait", count, fragment))
        last, failures = self.conn.recv()
        if failures:
            raise RuntimeError(f"transfers failed: {failures[:3]}")
        return last

    def close(self) -> None:
        try:
            self.conn.send(("stop",))
            self.conn.recv()
        finally:
            self.proc.join(10)
            if self.proc.is_alive():
                self.proc.kill()


def move(sender: KVSender, decode: DecodeProcess, transport: str, count: int,
         fragment: bool = False) -> float:
    """GB/s moving ``count`` whole requests at once (``fragment``: leave the decode free list
    reversed afterwards, so the next request lands in one-block runs)."""
    dests = decode.reserve(count, transport)
    start = time.monotonic()
    transfers = []
    for i, dest in enumerate(dests):
        src = list(range(i * BLOCKS_PER_REQUEST, (i + 1) * BLOCKS_PER_REQUEST))
        transfer = sender.start(dest, src, TOKENS)
        transfer.send_all()
        transfer.finish(1, -0.1)
        transfers.append(transfer)
    end = decode.wait(count, fragment)
    for transfer in transfers:
        transfer.wait(60)
    return count * REQUEST_BYTES / (end - start) / 1e9


def layer_workload(target_ms: float):
    """A real matmul workload taking about ``target_ms`` on this machine (one layer's compute)."""
    x, w = torch.randn(256, 896), torch.randn(896, 896)
    reps = 1

    def compute() -> None:
        for _ in range(reps):
            x @ w
    for _ in range(3):  # rescale until a whole layer takes about the target
        compute()
        start = time.perf_counter()
        for _ in range(5):
            compute()
        took_ms = (time.perf_counter() - start) / 5 * 1000
        reps = max(1, round(reps * target_ms / took_ms))
    return compute


def ttft_ms(sender: KVSender, decode: DecodeProcess, transport: str, compute, layerwise: bool) -> float:
    dest = decode.reserve(1, transport)[0]
    start = time.monotonic()
    transfer = sender.start(dest, list(range(BLOCKS_PER_REQUEST)), TOKENS)
    for layer in range(SPEC.num_layers):
        compute()
        if layerwise:
            transfer.send_layer(layer)
    if not layerwise:
        transfer.send_all()
    transfer.finish(1, -0.1)
    end = decode.wait(1)
    transfer.wait(60)
    return (end - start) * 1000


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--requests", type=int, default=32, help="requests moved at once (default 32)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per measurement; the median is kept")
    parser.add_argument("--transports", default="zmq,shm,nixl", help="comma-separated subset to measure")
    parser.add_argument("--layer-ms", type=float, default=2.0,
                        help="compute per layer in the layer-wise test (default 2 ms: a 2,048-token "
                             "prefill of a 0.5B model on a mid-range GPU)")
    args = parser.parse_args(argv)
    if args.requests <= 0 or args.repeats <= 0 or args.layer_ms <= 0:
        parser.error("--requests, --repeats and --layer-ms must be positive")

    num_blocks = args.requests * BLOCKS_PER_REQUEST
    run_dir = tempfile.mkdtemp(prefix="kvbench-")
    pool = KVPool(SPEC, num_blocks)
    pool.kv.view(torch.int16).random_()
    sender = KVSender(pool, sender_id="bench")
    decode = DecodeProcess(num_blocks, run_dir)
    memcpy_runs = []
    result = {"transports": {},
              "model": {**SPEC.to_dict(), "tokens_per_request": TOKENS, "request_bytes": REQUEST_BYTES,
                        "requests_at_once": args.requests}}
    try:
        for transport in args.transports.split(","):
            if transport not in decode.transports:
                print(f"{transport}: not available here", flush=True)
                continue
            # Warm up: connections, NIXL metadata, and every page of both pools in this mapping.
            move(sender, decode, transport, args.requests)
            memcpy = memcpy_gbps()  # right before, so both see the same machine load
            memcpy_runs.append(memcpy)
            single = statistics.median(move(sender, decode, transport, 1) for _ in range(args.repeats))
            many = statistics.median(move(sender, decode, transport, args.requests)
                                     for _ in range(max(1, args.repeats // 2)))
            move(sender, decode, transport, 1, fragment=True)
            scattered = statistics.median(move(sender, decode, transport, 1, fragment=True)
                                          for _ in range(args.repeats))
            result["transports"][transport] = {
                "gbps": round(single, 3), "ratio": round(single / memcpy, 3),
                f"gbps_{args.requests}": round(many, 3), f"ratio_{args.requests}": round(many / memcpy, 3),
                "gbps_fragmented": round(scattered, 3), "ratio_fragmented": round(scattered / memcpy, 3),
                "memcpy_gbps": round(memcpy, 3)}
            print(f"{transport}: memcpy {memcpy:.2f} GB/s; 1 request {single:.2f} GB/s ({single / memcpy:.0%}), "
                  f"{args.requests} requests {many:.2f} GB/s ({many / memcpy:.0%}), "
                  f"1 request into one-block runs {scattered:.2f} GB/s ({scattered / memcpy:.0%})", flush=True)
        result["memcpy_gbps"] = round(statistics.median(memcpy_runs), 3) if memcpy_runs else None

        # Compute on one core, as a GPU would leave the CPU to the transfer; the other core moves KV.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        compute = layer_workload(args.layer_ms)
        start = time.perf_counter()
        for _ in range(SPEC.num_layers):
            compute()
        prefill_ms = (time.perf_counter() - start) * 1000
        layerwise = {"prefill_ms": round(prefill_ms, 2), "layer_ms_target": args.layer_ms,
                     "layer_ms": round(prefill_ms / SPEC.num_layers, 2), "by_transport": {}}
        for transport in result["transports"]:
            pair = {}
            for mode in (True, False):
                key = "ttft_ms_layerwise" if mode else "ttft_ms_after_prefill"
                pair[key] = round(statistics.median(
                    ttft_ms(sender, decode, transport, compute, mode) for _ in range(args.repeats)), 2)
            layerwise["by_transport"][transport] = pair
            print(f"{transport}: prefill {prefill_ms:.1f} ms, TTFT layer-wise {pair['ttft_ms_layerwise']:.1f} ms, "
                  f"after prefill {pair['ttft_ms_after_prefill']:.1f} ms", flush=True)
        torch.set_num_threads(threads)
        if layerwise["by_transport"]:
            headline = "zmq" if "zmq" in layerwise["by_transport"] else next(iter(layerwise["by_transport"]))
            layerwise.update(transport=headline, **layerwise["by_transport"][headline])
        result["layerwise"] = layerwise
    finally:
        sender.close()
        decode.close()
        pool.close()
        shutil.rmtree(run_dir, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
