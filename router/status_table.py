"""``pdserve status`` output: the router's totals and one table row per worker."""
from __future__ import annotations

COLUMNS = ("WORKER", "ROLE", "TP", "TRANSPORT", "KV USED", "BLOCKS FREE", "RUNNING", "QUEUED", "RESTARTS",
           "ALIVE")


def format_status(status: dict) -> str:
    """Render a StatusReply's ``status`` dict as text."""
    r = status.get("router", {})
    lines = [f"model {r.get('model')}  workers {r.get('num_workers', 0)}  queued {r.get('queued', 0)}  "
             f"active {r.get('active', 0)}  finished {r.get('finished', 0)}  aborted {r.get('aborted', 0)}  "
             f"failed {r.get('failed', 0)}  rejected {r.get('rejected', 0)}  failovers {r.get('failovers', 0)}  "
             f"restarts {r.get('restarts', 0)}"]
    rows = [COLUMNS]
    for w in status.get("workers", []):
        rows.append((str(w.get("id")), str(w.get("role")), str(w.get("tp")),
                     ",".join(w.get("transports") or []) or "-", f"{100 * w.get('kv_usage', 0):.1f}%",
                     f"{w.get('free_blocks')}/{w.get('num_blocks')}", str(w.get("running")),
                     str(w.get("queued")), str(w.get("restarts", 0)),
                     "yes" if w.get("alive") else f"no ({w.get('dead_rule') or 'dead'})"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    if len(rows) == 1:
        lines.append("(no workers registered)")
    for worker_id, why in (r.get("given_up") or {}).items():
        lines.append(f"given up on {worker_id}: {why}")
    return "\n".join(lines)
