"""Moving one request's KV from a prefill TP group into blocks reserved by a decode TP group.

Pieces (one per file):
- ``KVSender`` (sender.py), one per prefill rank: ``start(dest, block_ids)`` gives a
  ``KVTransfer`` (transfer.py); the worker calls ``send_layer(layer)`` from ``on_layer_done``
  (per chunk for a chunked prefill; ``send_all`` for cached prefixes), then
  ``finish(first_token_id, logprob)`` or ``abort()``, and frees the source blocks once
  ``transfer.future`` is done. Copies and sends run on the sender's own thread; the model
  thread only enqueues.
- ``KVReceiver`` (receiver.py), one per decode rank: lands the KV in its rank's pool (zmq) or
  watches writers land it (shm, nixl), and reports to the coordinator.
- ``KVCoordinator`` (coordinator.py), on decode rank 0: owns the ``ReservationTable``, builds the
  destination dict for each reservation, gathers every rank's reports and hands the worker
  ``TransferDone`` / ``TransferFailed`` events (``poll`` or ``await wait_events``).
- Transports: ``zmq`` (zmq_transport.py: msgpack header + zero-copy frames), ``shm``
  (shm_transport.py: the sender copies into the decode pool's shared memory), ``nixl``
  (nixl_transport.py: RDMA WRITEs with notifications). ``negotiate.py`` picks one per pair.

Destination (decode -> router -> prefill), msgpack-able::

    {"transport": "zmq"|"shm"|"nixl", "transfer_id": str, "ttl_s": float,
     "ranks": [{"endpoint": str, "block_ids": [int], "num_blocks": int,
                "shm_path": str, "owners_path": str,    # shm only
                "nixl_agent": str}]}                      # nixl only

Protocol for one transfer ``x`` (messages in wire.py):
1. The coordinator reserves blocks and sends ``open(x, blocks)`` to every decode rank before it
   returns the destination; all TP ranks share one block table.
2. Each prefill rank ``p`` announces itself to each decode rank ``d`` it writes (``start``: the
   writer's id, so its death can release blocks even when the data bypasses ``d``), then
   writes, per layer, the kv-head slice that ``d`` needs (plan.py; equal TP degrees pair rank i
   with rank i). Block runs whose source AND destination ids are consecutive go as one frame /
   copy / WRITE; on a fragmented pool the short runs of a layer are gathered and scattered in
   one operation (blockcopy.py).
3. After its last write to ``d``, ``p`` sends ``done(x)`` to ``d`` (prefill rank 0's ``done`` to
   decode rank 0 carries the first token). Notices (``start``, ``done``, ``abort``) always go on
   the rank's ZMQ link: for zmq after the data on the same ordered connection, for shm after
   the copies, and for nixl every WRITE carries its own notification and ``done`` states how
   many, so ``d`` counts them.
4. Decode rank ``d`` reports ``rank_done(x)`` to the coordinator once every prefill rank that
   writes to it (``plan.sources_for``) sent ``done`` and its data landed.
   **Completion invariant:** the coordinator declares ``x`` done only when all decode ranks
   reported ``rank_done`` and rank 0's report carries the first token.
5. An abort on either side turns into ``close(x)`` on every decode rank; each answers
   ``released(x)`` once no writer can touch its blocks again, and only when every rank has
   answered does the coordinator return the blocks to the free list.

Ownership invariants:
- Data for a transfer id that a rank does not hold open is dropped, never written: zmq frames
  are checked by the receiving rank; shm writers check a per-block owner tag in shared memory
  before every copy; nixl writers READ those tags before their first WRITE to a rank.
- A rank holds a frame of a not-yet-opened id back (bounded: one message, then backpressure)
  until the coordinator's ``open`` or ``close`` arrives or a short timeout drops it.
- Aborted and expired reservations stay quarantined until every rank released them: at once
  for zmq (the rank's own thread is the only writer), after the writers' ``done``/``abort`` for
  shm and nixl, or when the writer is declared dead (``peer_dead``); the quarantine timeout is
  the last resort. A sender gives up ``ttl_s`` after it started, long before an expired
  reservation's quarantine times out.
- Bytes in flight are bounded: zmq high-water marks and a bounded message size, a window of
  outstanding NIXL writes, synchronous shm copies. A slow receiver stalls the sender's thread,
  never the model thread and never growing a buffer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from kvtransfer.spec import TRANSPORT_EXTRAS, TRANSPORTS  # noqa: F401 (TRANSPORTS re-exported)


class TransferError(RuntimeError):
    """A transfer could not be carried out; the message says why and what to check."""


@dataclass(frozen=True)
class TransferDone:
    """All KV of ``transfer_id`` landed on every decode rank; the blocks now belong to the caller,
    who frees them through the allocator when the sequence ends."""

    transfer_id: str
    block_ids: list[int]
    first_token_id: int
    first_logprob: float


@dataclass(frozen=True)
class TransferFailed:
    """The transfer was aborted by the prefill side, expired, or lost its writer; its blocks are
    quarantined and return to the free list by themselves."""

    transfer_id: str
    reason: str


TransferEvent = Union[TransferDone, TransferFailed]


@dataclass(frozen=True)
class RankTarget:
    """One decode rank of a destination."""

    endpoint: str
    block_ids: tuple[int, ...]
    num_blocks: int
    shm_path: str | None = None
    owners_path: str | None = None
    nixl_agent: str | None = None


@dataclass(frozen=True)
class Destination:
    """A checked destination dict (see the module docstring)."""

    transport: str
    transfer_id: str
    ttl_s: float
    ranks: tuple[RankTarget, ...]

    @classmethod
    def parse(cls, dest: dict) -> "Destination":
        """Check a destination dict; raises ValueError naming the bad field."""
        if not isinstance(dest, dict):
            raise ValueError(f"a KV destination must be a dict, got {type(dest).__name__}")
        transport = dest.get("transport")
        if transport not in TRANSPORTS:
            raise ValueError(f"KV destination transport {transport!r} is not one of {TRANSPORTS}")
        transfer_id = dest.get("transfer_id")
        if not isinstance(transfer_id, str) or not transfer_id:
            raise ValueError("KV destination needs a non-empty string transfer_id")
        ttl_s = dest.get("ttl_s")
        if not isinstance(ttl_s, (int, float)) or isinstance(ttl_s, bool) or ttl_s <= 0:
            raise ValueError(f"KV destination ttl_s must be a positive number, got {ttl_s!r}")
        ranks = dest.get("ranks")
        if not isinstance(ranks, list) or not ranks:
            raise ValueError("KV destination needs a non-empty list of ranks")
        targets = []
        for i, entry in enumerate(ranks):
            if not isinstance(entry, dict):
                raise ValueError(f"KV destination rank {i} must be a dict")
            block_ids = entry.get("block_ids")
            num_blocks = entry.get("num_blocks")
            if not isinstance(num_blocks, int) or num_blocks <= 0:
                raise ValueError(f"KV destination rank {i} needs a positive num_blocks")
            if (not isinstance(block_ids, list) or not block_ids or not all(
                    isinstance(b, int) and not isinstance(b, bool) and 0 <= b < num_blocks for b in block_ids)):
                raise ValueError(f"KV destination rank {i} needs block_ids: a non-empty list of "
                                 f"block ids below {num_blocks}")
            if not isinstance(entry.get("endpoint"), str):
                raise ValueError(f"KV destination rank {i} needs an endpoint string")
            for name in TRANSPORT_EXTRAS.get(transport, ()):
                if not isinstance(entry.get(name), str):
                    raise ValueError(f"KV destination rank {i} needs {name!r} for transport {transport}")
            targets.append(RankTarget(entry["endpoint"], tuple(block_ids), num_blocks,
                                      entry.get("shm_path"), entry.get("owners_path"),
                                      entry.get("nixl_agent")))
        if len({t.block_ids for t in targets}) != 1:
            raise ValueError("KV destination ranks must share one block table")
        return cls(transport, transfer_id, float(ttl_s), tuple(targets))
