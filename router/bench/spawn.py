"""``--spawn CONFIG``: the server configurations the load test starts for itself, one at a time.

A configuration is written ``disagg:<P>p<D>d`` (P prefill workers and D decode workers behind one
router, e.g. ``disagg:1p1d``, ``disagg:2p1d``) or ``colocated:<N>`` (N workers that each prefill
and decode, the baseline disaggregation is measured against). The name is also the column of the
comparison table and the key under ``"configs"`` in the JSON.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

_DISAGG = re.compile(r"disagg:(\d+)p(\d+)d")
_COLOCATED = re.compile(r"colocated:(\d+)")
_FORMS = "disagg:<P>p<D>d (e.g. disagg:1p1d, disagg:2p1d) or colocated:<N> (e.g. colocated:2)"


@dataclass(frozen=True)
class ClusterSpec:
    """One server configuration: ``mode`` "disagg" (``num_prefill`` + ``num_decode`` workers) or
    "colocated" (``num_workers``)."""

    mode: str
    num_prefill: int = 0
    num_decode: int = 0
    num_workers: int = 0

    @property
    def name(self) -> str:
        if self.mode == "disagg":
            return f"disagg:{self.num_prefill}p{self.num_decode}d"
        return f"colocated:{self.num_workers}"


def parse_cluster_spec(text: str) -> ClusterSpec:
    """Parse one ``--spawn`` value. Raises ValueError naming the accepted forms."""
    if match := _DISAGG.fullmatch(text.strip()):
        num_prefill, num_decode = int(match[1]), int(match[2])
        if num_prefill < 1 or num_decode < 1:
            raise ValueError(f"--spawn {text!r}: a disaggregated cluster needs at least one prefill "
                             f"and one decode worker, e.g. disagg:1p1d")
        return ClusterSpec("disagg", num_prefill=num_prefill, num_decode=num_decode)
    if match := _COLOCATED.fullmatch(text.strip()):
        num_workers = int(match[1])
        if num_workers < 1:
            raise ValueError(f"--spawn {text!r}: a colocated cluster needs at least one worker, "
                             f"e.g. colocated:1")
        return ClusterSpec("colocated", num_workers=num_workers)
    raise ValueError(f"--spawn {text!r} is not a configuration; write {_FORMS}")


def parse_cluster_specs(texts: list[str]) -> list[ClusterSpec]:
    """Parse every ``--spawn`` value; the same configuration twice is refused."""
    specs = [parse_cluster_spec(text) for text in texts]
    names = [spec.name for spec in specs]
    for name in names:
        if names.count(name) > 1:
            raise ValueError(f"--spawn lists {name} twice; give each configuration once")
    return specs


@contextmanager
def spawned_cluster(spec: ClusterSpec, **options) -> Iterator[str]:
    """Start the local cluster of ``spec`` (router and workers as separate processes) and yield
    its client endpoint; everything is stopped on exit. ``options`` are ``LocalCluster``'s other
    settings (``model``, ``kv_transport``, ``tp``, ...). Raises ClusterError when it cannot start."""
    from router.launcher import LocalCluster  # the launcher pulls in process management only here

    if spec.mode == "disagg":
        layout = dict(num_prefill=spec.num_prefill, num_decode=spec.num_decode)
    else:
        layout = dict(num_workers=spec.num_workers)
    # The router gets its own process: in this one it would share the interpreter (and its
    # lock) with the load generator, and each would slow the other down.
    with LocalCluster(mode=spec.mode, **layout, router_in_process=False, **options) as cluster:
        yield cluster.endpoint
