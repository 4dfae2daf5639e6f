"""A worker's options (``pdserve worker``), validated once at construction."""
from __future__ import annotations

import dataclasses
import os
import socket
import uuid
from dataclasses import dataclass

from kvtransfer.spec import TRANSPORT_CHOICES
from router.protocol import ROLES


@dataclass(frozen=True)
class WorkerOptions:
    """What one worker process runs; see ``router.worker_args`` for each option's meaning.

    Raises ValueError naming the option to change.
    """

    role: str
    router: str
    model: str
    tp: int = 1
    dtype: str = "auto"
    device: str = "cpu"
    max_model_len: int | None = None
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_memory: int | None = None          # bytes of KV pool per rank
    kv_transport: str = "auto"
    worker_id: str = ""
    curve_dir: str | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    heartbeat_s: float = 0.5
    kv_dir: str | None = None             # where ipc:// KV endpoints live
    kv_host: str | None = None            # decode: receive KV on tcp://KV_HOST:* instead of ipc://
    enforce_eager: bool = False           # never compile (also PDSERVE_ENFORCE_EAGER=1)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"--role must be one of {ROLES}, got {self.role!r}")
        if self.kv_transport not in TRANSPORT_CHOICES:
            raise ValueError(f"--kv-transport must be one of {TRANSPORT_CHOICES}, got {self.kv_transport!r}")
        if not isinstance(self.tp, int) or self.tp < 1:
            raise ValueError(f"--tp must be a positive integer, got {self.tp!r}")
        if self.num_kv_blocks is not None and self.kv_memory is not None:
            raise ValueError("give --num-kv-blocks or --kv-memory, not both")
        if not self.worker_id:
            object.__setattr__(self, "worker_id", f"{self.role}-{socket.gethostname()}-"
                                                  f"{os.getpid()}-{uuid.uuid4().hex[:6]}")

    @classmethod
    def from_args(cls, args) -> "WorkerOptions":
        names = {f.name for f in dataclasses.fields(cls)}
        values = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
        from models.registry import resolve_model

        values["model"] = str(resolve_model(values.get("model")))
        return cls(**values)
