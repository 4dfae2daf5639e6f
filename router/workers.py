"""The router's view of its workers: registration checks, liveness and load accounting.

A worker is accepted only if its Register info is well formed and its model fingerprint and KV
spec equal the cluster's (the router's ``--model`` fingerprint, else the first accepted
worker's). A worker is dead when its connection drops or a liveness rule (router/liveness.py)
says so; a dead worker that speaks again is told it is unknown (``HeartbeatAck(registered=False)``)
and registers anew, unless it was declared stuck or unhealthy: that process is refused until it
restarts.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from kvtransfer.negotiate import choose_transport
from kvtransfer.spec import KVSpec
from router.liveness import BROKEN, DISCONNECTED, Progress, verdict
from router.payloads import HeartbeatStats
from router.policy import PrefixIndex
from router.protocol import ROLES

log = logging.getLogger("pdserve.router")

# Register info: key -> accepted types. Required keys first, then optional ones.
REGISTER_INFO_TYPES = {"role": str, "tp_size": int, "kv_spec": dict, "fingerprint": str,
                       "transports": (list, dict), "max_model_len": int, "num_blocks": int,
                       "vocab_size": int}
OPTIONAL_INFO_TYPES = {"model": str, "model_dir": str, "eos_token_ids": list, "pid": int,
                       "host": str, "block_size": int, "node": str, "registration": int}
MAX_DEAD_RECORDS = 64
MAX_REFUSED_PROCESSES = 256


class RegistrationError(ValueError):
    """Why a worker was refused; sent back in ``Registered.error``."""


@dataclass(eq=False)
class WorkerRecord:
    """One registered worker and the router's load accounting for it."""

    worker_id: str
    identity: bytes                 # zmq routing id of its connection
    role: str
    tp_size: int
    kv_spec: KVSpec
    transports: tuple[str, ...]     # KV transports it can run (kvtransfer.negotiate order)
    capabilities: dict              # kvtransfer.negotiate.capabilities() of the worker
    num_blocks: int
    max_model_len: int
    info: dict
    last_seen: float
    alive: bool = True
    stats: HeartbeatStats | None = None   # the last heartbeat's
    reserved_blocks: int = 0        # blocks held by requests this router placed here (decode)
    num_decoding: int = 0           # requests placed here as their decode worker
    outstanding_tokens: int = 0     # prompt tokens sent here for prefill, not yet done
    num_prefilling: int = 0
    is_full: bool = False           # refused an Allocate; cleared by a free, a retry timer or a heartbeat
    num_refusals: int = 0           # refusals since its last accepted Allocate (sets the retry backoff)
    retry_timer: "asyncio.TimerHandle | None" = None
    num_prefilled: int = 0          # first tokens it produced (prefill or colocated)
    num_decoded: int = 0            # requests that finished with it as their decode worker
    last_progress: float = 0.0      # when it last produced a first token (or registered)
    draining: bool = False          # being removed (router/scaling.py): gets no new requests
    progress: Progress = field(default_factory=Progress)  # step counter and health (heartbeats)
    dead_rule: str | None = None    # why it was declared dead: a router.liveness rule name
    dead_reason: str | None = None  # ... in words
    prefix: PrefixIndex = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.prefix is None:
            self.prefix = PrefixIndex(max(1, self.num_blocks))

    @property
    def pid(self) -> int | None:
        pid = self.info.get("pid")
        return pid if isinstance(pid, int) else None

    @property
    def can_decode(self) -> bool:
        return self.role in ("decode", "both")

    @property
    def can_prefill(self) -> bool:
        return self.role in ("prefill", "both")

    @property
    def free_blocks_estimate(self) -> int:
        return self.num_blocks - self.reserved_blocks


def check_info(info: dict) -> None:
    """Raise RegistrationError unless ``info`` has every required key with the right type."""
    if not isinstance(info, dict):
        raise RegistrationError("Register.info must be a mapping")
    for key, types in {**REGISTER_INFO_TYPES, **OPTIONAL_INFO_TYPES}.items():
        if key not in info:
            if key in REGISTER_INFO_TYPES:
                raise RegistrationError(f"Register.info lacks {key!r}")
            continue
        value = info[key]
        if not isinstance(value, types) or (isinstance(value, bool) and types is int):
            raise RegistrationError(f"Register.info[{key!r}] has the wrong type {type(value).__name__}")
    if info["role"] not in ROLES:
        raise RegistrationError(f"role must be one of {ROLES}, got {info['role']!r}")
    for key in ("tp_size", "num_blocks", "vocab_size"):
        if info[key] < 1:
            raise RegistrationError(f"{key} must be positive, got {info[key]}")
    if info["max_model_len"] < 2:
        raise RegistrationError(f"max_model_len must be at least 2, got {info['max_model_len']}")


class WorkerRegistry:
    """Registered workers by id and by connection, and the cluster's reference model/KV spec."""

    def __init__(self, fingerprint: str | None, kv_transport: str = "auto"):
        self.fingerprint = fingerprint
        self.kv_transport = kv_transport
        self.kv_spec: KVSpec | None = None
        self.by_id: dict[str, WorkerRecord] = {}
        self.by_identity: dict[bytes, WorkerRecord] = {}
        self._pair_transport: dict[tuple[str, str], str | None] = {}  # negotiated once per pair
        # (worker_id, pid) of processes declared stuck or unhealthy -> why; bounded, oldest first out.
        self._refused: dict[tuple[str, int | None], str] = {}

    def register(self, identity: bytes, worker_id: str, info: dict, now: float) -> WorkerRecord:
        """Accept a worker, or raise RegistrationError saying why it is refused.

        Registering again on the same connection is idempotent (a repeated Register); the
        caller first declares dead a worker that ``is_reregistration`` finds.
        """
        current = self.by_identity.get(identity)
        if current is not None and current.worker_id == worker_id and current.alive:
            return current
        if not isinstance(worker_id, str) or not 0 < len(worker_id) <= 256:
            raise RegistrationError("worker_id must be a non-empty string of at most 256 characters")
        check_info(info)
        why = self._refused.get((worker_id, info.get("pid")))
        if why is not None:
            raise RegistrationError(f"this worker process (pid {info.get('pid')}) was declared dead: {why}; "
                                    "it must restart before it can serve again")
        old = self.by_id.get(worker_id)
        if old is not None and old.alive:
            raise RegistrationError(f"worker id {worker_id!r} is already registered by a live worker "
                                    f"(pid {old.info.get('pid')}); give each worker a unique --worker-id")
        try:
            spec = KVSpec.from_dict(info["kv_spec"])
        except (ValueError, TypeError) as exc:
            raise RegistrationError(f"bad KV spec: {exc}") from None
        if self.fingerprint is not None and info["fingerprint"] != self.fingerprint:
            raise RegistrationError(
                f"model mismatch: this worker serves {info.get('model', '?')} (fingerprint "
                f"{info['fingerprint']}) but the cluster serves fingerprint {self.fingerprint}; "
                "start the worker with the same --model as the router and the other workers")
        if self.kv_spec is not None:
            why = self.kv_spec.mismatch(spec)
            if why is not None:
                raise RegistrationError(f"{why} (cluster vs this worker); start every worker with the "
                                        "same --dtype and --block-size")
        caps = info["transports"]
        if isinstance(caps, list):
            caps = {"transports": caps}
        transports = caps.get("transports") or []
        if not isinstance(transports, list) or (not transports and info["role"] != "both"):
            raise RegistrationError("Register.info['transports'] must list the KV transports a "
                                    "prefill or decode worker runs")
        transports = tuple(str(t) for t in transports)
        if (self.kv_transport != "auto" and info["role"] != "both"
                and self.kv_transport not in transports):
            raise RegistrationError(f"the router uses --kv-transport {self.kv_transport} but this worker "
                                    f"supports {list(transports)}; start it with the same --kv-transport")
        worker = WorkerRecord(worker_id=worker_id, identity=identity, role=info["role"],
                              tp_size=info["tp_size"], kv_spec=spec, transports=transports,
                              capabilities=caps,
                              num_blocks=info["num_blocks"], max_model_len=info["max_model_len"],
                              info=info, last_seen=now, last_progress=now)
        self.fingerprint = info["fingerprint"]
        self.kv_spec = spec
        if old is not None:
            self.by_id.pop(worker_id)  # a restarted worker replaces its dead record
        self._pair_transport = {k: v for k, v in self._pair_transport.items() if worker_id not in k}
        self.by_id[worker_id] = worker
        self.by_identity[identity] = worker
        self._trim_dead()
        return worker

    def is_reregistration(self, identity: bytes, info) -> WorkerRecord | None:
        """The live worker on this connection if its Register starts a new registration: it
        lost this router (a router stalled past the worker's timeout looks lost) and dropped
        every request, so what the router holds for it is gone."""
        current = self.by_identity.get(identity)
        if current is None or not isinstance(info, dict):
            return None
        return current if info.get("registration") != current.info.get("registration") else None

    def mark_dead(self, worker: WorkerRecord, rule: str = DISCONNECTED, reason: str = "") -> bool:
        """Declare a worker dead (``rule``: a router.liveness rule name); False if it already was."""
        if not worker.alive:
            return False
        worker.alive = False
        worker.dead_rule, worker.dead_reason = rule, reason or rule
        self.by_identity.pop(worker.identity, None)
        if rule in BROKEN:
            self._refused[(worker.worker_id, worker.pid)] = f"{rule}: {reason}"
            while len(self._refused) > MAX_REFUSED_PROCESSES:
                del self._refused[next(iter(self._refused))]
        return True

    def verdicts(self, now: float, heartbeat_timeout_s: float,
                 stuck_timeout_s: float) -> list[tuple[WorkerRecord, str, str]]:
        """Live workers a liveness rule (router/liveness.py) declares dead now: (worker, rule, reason)."""
        found = []
        for w in self.by_identity.values():
            v = verdict(w.progress, w.last_seen, now, heartbeat_timeout_s, stuck_timeout_s)
            if v is not None:
                found.append((w, *v))
        return found

    def alive(self) -> list[WorkerRecord]:
        return list(self.by_identity.values())

    def max_model_len(self) -> int | None:
        """The smallest max model length of the live workers (None if none is live)."""
        lens = [w.max_model_len for w in self.by_identity.values()]
        return min(lens) if lens else None

    def max_decode_blocks(self) -> int:
        return max((w.num_blocks for w in self.by_identity.values() if w.can_decode), default=0)

    def transport_for(self, prefill: WorkerRecord, decode: WorkerRecord) -> str | None:
        """The KV transport a (prefill, decode) pair uses, or None if they share none."""
        if prefill is decode:
            return "local"
        key = (prefill.worker_id, decode.worker_id)
        if key not in self._pair_transport:
            try:
                name, _ = choose_transport(prefill.capabilities, decode.capabilities, self.kv_transport)
            except ValueError as exc:
                log.warning("workers %s and %s cannot exchange KV: %s", *key, exc)
                name = None
            self._pair_transport[key] = name
        return self._pair_transport[key]

    def _trim_dead(self) -> None:
        dead = [w for w in self.by_id.values() if not w.alive]
        for w in dead[:max(0, len(dead) - MAX_DEAD_RECORDS)]:
            del self.by_id[w.worker_id]
