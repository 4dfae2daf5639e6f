"""Prometheus metrics of the router, served at ``/metrics`` by the HTTP gateway.

Names follow vLLM's with the prefix ``pdserve:`` (so its dashboards port by a rename), plus what
only a disaggregated server has: KV hand-offs per transport, transfer failures, reservation
expiries, quarantined blocks, failovers and worker restarts.

``RouterMetrics`` is the scheduler's ``Observer``: it is told of each request's milestones on
the router's loop and keeps plain counters and ``FastHistogram``s (a bisect and two adds per
observation: these run once per streamed token). Gauges and the workers' own counters (from
their heartbeats) are read when Prometheus scrapes. Every router has its own
``CollectorRegistry``, so several routers can live in one process (tests).
"""
from __future__ import annotations

import time
from bisect import bisect_left

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from router.payloads import HeartbeatStats

PREFIX = "pdserve:"
# vLLM's buckets (vllm/v1/metrics/loggers.py).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TOKEN_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                         5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                           50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
KV_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                      30.0)
KV_BYTES_BUCKETS = tuple(float(4 ** i * 1024) for i in range(13))  # 1 KiB .. 16 GiB


class FastHistogram:
    """A Prometheus histogram without locks (single-threaded use on the router's loop)."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, int]]:
        """Cumulative ``(le, count)`` pairs, +Inf last."""
        out, total = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts):
            total += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), total))
        return out


class RouterMetrics:
    """The router's metrics; attach with ``scheduler.observer = RouterMetrics(router)``."""

    def __init__(self, router):
        self.router = router
        self.ttft = FastHistogram(TTFT_BUCKETS)
        self.itl = FastHistogram(TOKEN_LATENCY_BUCKETS)
        self.tpot = FastHistogram(TOKEN_LATENCY_BUCKETS)
        self.e2e = FastHistogram(REQUEST_LATENCY_BUCKETS)
        self.queue = FastHistogram(REQUEST_LATENCY_BUCKETS)
        self.kv_seconds: dict[str, FastHistogram] = {}
        self.kv_bytes: dict[str, FastHistogram] = {}
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self.num_prefix_queries = 0
        self.num_prefix_hits = 0
        self.success: dict[str, int] = {}
        self.failures: dict[str, int] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    # -- Observer (router/scheduler.py) ---------------------------------------------------------
    def on_scheduled(self, req) -> None:
        self.queue.observe(time.monotonic() - req.arrival)

    def on_token(self, req) -> None:
        now = time.monotonic()
        self.num_generation_tokens += 1
        if req.first_token_at is None:
            req.first_token_at = now
            self.ttft.observe(now - req.arrival)
            self.num_prompt_tokens += req.num_prompt_tokens
            self.num_prefix_queries += req.num_prompt_tokens
            self.num_prefix_hits += min(req.num_cached_tokens, req.num_prompt_tokens)
        else:
            self.itl.observe(now - req.last_token_at)
        req.last_token_at = now

    def on_kv_landed(self, req) -> None:
        """The decode worker started a request whose KV another worker pushed to it."""
        registry = self.router.registry
        spec = registry.kv_spec
        if req.prefill is None or req.prefill is req.decode or spec is None or not req.prefill_sent_at:
            return
        transport = registry.transport_for(req.prefill, req.decode) or "unknown"
        if transport not in self.kv_seconds:
            self.kv_seconds[transport] = FastHistogram(KV_SECONDS_BUCKETS)
            self.kv_bytes[transport] = FastHistogram(KV_BYTES_BUCKETS)
        self.kv_seconds[transport].observe(time.monotonic() - req.prefill_sent_at)
        self.kv_bytes[transport].observe(len(req.context_ids) * spec.block_bytes() / spec.block_size)

    def on_finished(self, req, reason: str, error_code: str | None) -> None:
        if error_code is not None:
            self.failures[error_code] = self.failures.get(error_code, 0) + 1
            return
        self.success[reason] = self.success.get(reason, 0) + 1
        now = time.monotonic()
        self.e2e.observe(now - req.arrival)
        num_output = len(req.output_ids)
        if num_output > 1 and req.first_token_at is not None:
            self.tpot.observe((req.last_token_at - req.first_token_at) / (num_output - 1))

    def on_rejected(self, code: str) -> None:
        self.failures[code] = self.failures.get(code, 0) + 1

    # -- exposition ------------------------------------------------------------------------------
    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)

    def collect(self):
        """prometheus_client's collector protocol: every family, read now."""
        router = self.router
        sched = router.scheduler
        yield _gauge("num_requests_running", "Requests placed on workers (prefilling or decoding).",
                     len(sched.requests) - len(sched.waiting))
        yield _gauge("num_requests_waiting", "Requests queued in the router for a worker.",
                     len(sched.waiting))
        yield from self._worker_families()
        yield _counter("prompt_tokens", "Prompt tokens prefilled (counted at the first token).",
                       self.num_prompt_tokens)
        yield _counter("generation_tokens", "Output tokens streamed to clients.", self.num_generation_tokens)
        yield _counter("prefix_cache_queries", "Prompt tokens looked up in the prefill prefix cache.",
                       self.num_prefix_queries)
        yield _counter("prefix_cache_hits", "Prompt tokens found in the prefill prefix cache.",
                       self.num_prefix_hits)
        yield _labelled_counter("request_success", "Finished requests by finish reason.",
                                "finished_reason", self.success)
        yield _labelled_counter("request_failure", "Failed or refused requests by error code.",
                                "code", self.failures)
        yield _counter("request_failovers", "Requests restarted on other workers after a worker "
                       "died or failed them.", sched.counters.get("failovers", 0))
        # Fed by the local supervisor (pdserve serve) where the router has one.
        yield _counter("worker_restarts", "Workers restarted by the local supervisor.",
                       getattr(router, "num_restarts", 0))
        for name, doc, hist in (
                ("time_to_first_token_seconds", "Time to first token.", self.ttft),
                ("inter_token_latency_seconds", "Time between consecutive output tokens.", self.itl),
                ("time_per_output_token_seconds", "Mean time per output token after the first, per request.",
                 self.tpot),
                ("e2e_request_latency_seconds", "Request latency, arrival to finish.", self.e2e),
                ("request_queue_time_seconds", "Time from arrival to first placement on workers.",
                 self.queue)):
            yield _histogram(name, doc, {(): hist})
        yield _histogram("kv_transfer_seconds", "KV hand-off per transport: from the Prefill order "
                         "to the decode worker starting the request (compute and push overlap).",
                         {(t,): h for t, h in self.kv_seconds.items()}, ("transport",))
        yield _histogram("kv_transfer_bytes", "KV bytes pushed per hand-off (context tokens x KV "
                         "bytes per token, all layers and ranks), per transport.",
                         {(t,): h for t, h in self.kv_bytes.items()}, ("transport",))

    def _worker_families(self):
        labels = ("worker", "role")
        usage = GaugeMetricFamily(PREFIX + "kv_cache_usage_perc",
                                  "Fraction of a worker's KV blocks in use (0 to 1).", labels=labels)
        running = GaugeMetricFamily(PREFIX + "worker_num_requests_running",
                                    "Requests a worker is running.", labels=labels)
        queued = GaugeMetricFamily(PREFIX + "worker_num_requests_waiting",
                                   "Requests a worker holds but does not run yet.", labels=labels)
        quarantined = GaugeMetricFamily(PREFIX + "kv_quarantined_blocks",
                                        "KV blocks held back until a late writer can no longer "
                                        "write into them.", labels=labels)
        failures = CounterMetricFamily(PREFIX + "kv_transfer_failures",
                                       "KV transfers that failed, as the worker counts them.", labels=labels)
        expiries = CounterMetricFamily(PREFIX + "kv_reservation_expiries",
                                       "Decode reservations whose KV never arrived in time.", labels=labels)
        for w in self.router.registry.alive():
            key = (w.worker_id, w.role)
            stats = w.stats or HeartbeatStats()
            num_blocks = w.num_blocks if stats.num_blocks is None else stats.num_blocks
            free = num_blocks if stats.free_blocks is None else stats.free_blocks
            usage.add_metric(key, 1 - free / num_blocks if num_blocks else 0.0)
            running.add_metric(key, stats.running)
            queued.add_metric(key, stats.waiting + stats.reserved)
            kv = stats.kv  # transport counters: the prefill sender's, or the decode coordinator's
            quarantined.add_metric(key, kv.get("quarantined_blocks") or 0)
            failures.add_metric(key, kv.get("transfers_failed", kv.get("kv_transfers_failed")) or 0)
            expiries.add_metric(key, kv.get("reservations_expired") or 0)
        yield from (usage, running, queued, quarantined, failures, expiries)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(PREFIX + name, doc, value=value)


def _labelled_counter(name: str, doc: str, label: str, values: dict) -> CounterMetricFamily:
    family = CounterMetricFamily(PREFIX + name, doc, labels=(label,))
    for key, value in sorted(values.items()):
        family.add_metric((key,), value)
    return family


def _histogram(name: str, doc: str, by_labels: dict, labels: tuple[str, ...] = ()):
    family = HistogramMetricFamily(PREFIX + name, doc, labels=labels)
    for key, hist in by_labels.items():
        family.add_metric(list(key), hist.buckets(), hist.sum)
    return family

