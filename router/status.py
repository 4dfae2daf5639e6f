"""The router's status snapshot: what ``pdserve status``, ``Client.status()`` and the tests
read. One dict of plain values: the router's counters and every worker it has known."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

from router.payloads import HeartbeatStats

if TYPE_CHECKING:
    from router.server import Router
    from router.workers import WorkerRecord, WorkerRegistry


def router_status(router: Router) -> dict:
    model = router.scheduler.model
    registry = router.registry
    workers = [_worker_status(w, router.supervision.get(w.worker_id, {}))
               for w in sorted(registry.by_id.values(), key=lambda w: (not w.alive, w.role, w.worker_id))]
    return {"router": {"uptime_s": round(time.monotonic() - router.started_at, 3),
                       "model": model.name if model else None,
                       "fingerprint": registry.fingerprint,
                       "kv_spec": registry.kv_spec.to_dict() if registry.kv_spec else None,
                       "num_workers": len(registry.alive()), "http": router.http_url,
                       "restarts": router.num_restarts,
                       "given_up": {wid: s["gave_up"] for wid, s in router.supervision.items()
                                    if s.get("gave_up")},
                       "client_replies_dropped": router.clients.num_dropped if router.clients else 0,
                       **router.scheduler.stats()},
            "workers": workers, "pairs": _pairs(registry)}


def _worker_status(w: WorkerRecord, supervision: dict) -> dict:
    stats = w.stats or HeartbeatStats()
    num_blocks = w.num_blocks if stats.num_blocks is None else stats.num_blocks
    free = num_blocks if stats.free_blocks is None else stats.free_blocks
    return {
        "id": w.worker_id, "role": w.role, "tp": w.tp_size, "alive": w.alive,
        "transports": list(w.transports), "num_blocks": num_blocks, "free_blocks": free,
        "kv_usage": round(1 - free / num_blocks, 4) if num_blocks else 0.0,
        "running": stats.running, "queued": stats.waiting + stats.reserved,
        "assigned": w.num_decoding + w.num_prefilling,
        "num_prefilled": w.num_prefilled, "num_decoded": w.num_decoded,
        "pid": w.info.get("pid"), "host": w.info.get("host"),
        "node": w.info.get("node") or w.info.get("host"), "draining": w.draining,
        "stats": w.stats.to_wire() if w.stats is not None else {},
        "dead_rule": None if w.alive else w.dead_rule,
        "dead_reason": None if w.alive else w.dead_reason,
        "restarts": supervision.get("restarts", 0),
    }


def _pairs(registry: WorkerRegistry) -> list[dict]:
    """The KV transport of every live (prefill, decode) pair."""
    live = sorted(registry.alive(), key=lambda w: w.worker_id)
    return [{"prefill": p.worker_id, "decode": d.worker_id, "transport": registry.transport_for(p, d)}
            for p in live if p.role == "prefill" for d in live if d.role == "decode"]
