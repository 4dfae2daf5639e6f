"""``pdserve status`` output: the router's totals, one table row per worker, and the KV transport
of every (prefill, decode) pair."""
from __future__ import annotations

COLUMNS = ("WORKER", "ROLE", "TP", "NODE", "TRANSPORT", "KV USED", "BLOCKS FREE", "RUNNING", "QUEUED",
           "RESTARTS", "ALIVE")


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def _short_node(node) -> str:
    """Ray node ids are 56 hex digits; their first 12 tell nodes apart in a table."""
    node = str(node or "-")
    return node[:12] if len(node) == 56 and all(c in "0123456789abcdef" for c in node) else node


def format_status(status: dict) -> str:
    """Render a StatusReply's ``status`` dict as text."""
    r = status.get("router", {})
    lines = [f"model {r.get('model')}  workers {r.get('num_workers', 0)}  queued {r.get('queued', 0)}  "
             f"active {r.get('active', 0)}  finished {r.get('finished', 0)}  aborted {r.get('aborted', 0)}  "
             f"failed {r.get('failed', 0)}  rejected {r.get('rejected', 0)}  failovers {r.get('failovers', 0)}  "
             f"restarts {r.get('restarts', 0)}"]
    rows = [COLUMNS]
    for w in status.get("workers", []):
        alive = (("draining" if w.get("draining") else "yes") if w.get("alive")
                 else f"no ({w.get('dead_rule') or 'dead'})")
        rows.append((str(w.get("id")), str(w.get("role")), str(w.get("tp")), _short_node(w.get("node")),
                     ",".join(w.get("transports") or []) or "-", f"{100 * w.get('kv_usage', 0):.1f}%",
                     f"{w.get('free_blocks')}/{w.get('num_blocks')}", str(w.get("running")),
                     str(w.get("queued")), str(w.get("restarts", 0)), alive))
    lines += _table(rows)
    if len(rows) == 1:
        lines.append("(no workers registered)")
    for worker_id, why in (r.get("given_up") or {}).items():
        lines.append(f"given up on {worker_id}: {why}")
    pairs = status.get("pairs") or []
    if pairs:
        lines.append("")
        lines += _table([("PREFILL", "DECODE", "KV TRANSPORT")] +
                        [(str(p["prefill"]), str(p["decode"]), str(p["transport"] or "none")) for p in pairs])
    return "\n".join(lines)
