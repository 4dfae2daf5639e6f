"""The router's configuration: endpoints, limits and timeouts, validated at construction."""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass

from kvtransfer.spec import TRANSPORT_CHOICES
from router.security import check_bind

KV_TRANSPORTS = TRANSPORT_CHOICES  # re-exported for the CLI


def default_endpoint(name: str) -> str:
    """A per-user ipc endpoint (``client`` or ``workers``) for routers started without one.

    ``$PDSERVE_ENDPOINT`` overrides the client endpoint, so ``pdserve generate`` and
    ``pdserve status`` find a server started with the same environment.
    """
    if name == "client" and os.environ.get("PDSERVE_ENDPOINT"):
        return os.environ["PDSERVE_ENDPOINT"]
    base = os.path.join(tempfile.gettempdir(), f"pdserve-{os.getuid()}")
    return f"ipc://{base}/{name}.ipc"


@dataclass(frozen=True)
class RouterConfig:
    """Everything the router process needs; ValueError says which option to change."""

    frontend: str                        # clients connect here (--listen)
    backend: str                         # workers connect here (--backend)
    model_dir: str | None = None         # --model: workers must serve this checkpoint
    curve_dir: str | None = None         # --curve-dir: CurveZMQ keys (required off-host)
    kv_transport: str = "auto"           # --kv-transport: force one transport for every pair
    max_queue: int = 1024                # requests waiting for a worker; past it: overloaded
    max_client_backlog: int = 100_000    # unsent messages a client may fall behind by (then: overloaded)
    max_worker_backlog: int = 65_536     # unsent messages a worker may fall behind by (then: dead)
    heartbeat_timeout_s: float = 5.0     # a worker silent this long is dead
    stuck_timeout_s: float = 10.0        # a worker with work and no step for this long past its slowest is dead
    max_head_wait_s: float = 10.0        # a queued request that waited this long is no longer overtaken
    max_tokenizing: int = 64             # text prompts being tokenized off the loop (count toward max_queue)
    unavailable_timeout_s: float = 30.0  # a request waits this long for a missing role
    max_attempts: int = 8                # prefill/decode attempts per request (failovers)
    handoff_timeout_s: float = 30.0      # a lost Allocate/KV hand-off is retried after this
    prefill_stall_timeout_s: float = 120.0  # a prefill worker with work and no first token for this long lost it
    tick_s: float = 0.1                  # housekeeping period (liveness, waiting bounds)

    def __post_init__(self) -> None:
        check_bind(self.frontend, self.curve_dir, "--listen")
        check_bind(self.backend, self.curve_dir, "--backend")
        if self.frontend == self.backend:
            raise ValueError(f"--listen and --backend are both {self.frontend}; give them different endpoints")
        if self.kv_transport not in KV_TRANSPORTS:
            raise ValueError(f"--kv-transport must be one of {KV_TRANSPORTS}, got {self.kv_transport!r}")
        for name in ("max_queue", "max_client_backlog", "max_worker_backlog", "max_attempts", "max_tokenizing"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
        for name in ("heartbeat_timeout_s", "unavailable_timeout_s", "handoff_timeout_s",
                     "prefill_stall_timeout_s", "tick_s", "stuck_timeout_s", "max_head_wait_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if self.model_dir is not None and not os.path.isdir(self.model_dir):
            raise ValueError(f"--model {self.model_dir} is not a directory")
