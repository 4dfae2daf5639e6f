"""``pdserve bench``: load-test a running server (``--endpoint``) or compare configurations the
load test starts for itself (``--spawn disagg:1p1d colocated:2``) on one workload.

For each configuration: connect, read the model's vocabulary size from the server's status (or
``--vocab-size``), build the prompts, send the warm-up requests, then the measured run (or, with
``--sweep-rate``, a search for the highest rate meeting the SLO attainment target). Finally one
comparison table on stdout, and the ``--json`` / ``--plot`` files.

Exit status: 0 when every configuration completed at least one request, 1 when one did not,
the server could not be reached or started, or it went away mid-run (the run stops within
seconds, see runner.py), 2 for bad options (the output paths included: checked before the run),
130 on Ctrl-C (the requests in flight are cancelled; nothing is written).
"""
from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from router.bench.arrivals import LoadShape
from router.bench.metrics import SLO, error_counts, latency_samples_ms, summarize
from router.bench.report import (ConfigResult, PlotUnavailable, ProgressBar, check_plot_available,
                                 format_table, plot_results, results_json, write_json)
from router.bench.openai_client import BACKENDS, OpenAIClient
from router.bench.runner import ServerGone, reported_vocab_size, run_event_loop, run_load, warm_up
from router.bench.spawn import ClusterSpec, parse_cluster_specs, spawned_cluster
from router.bench.sweep import SweepConfig, find_max_rate
from router.bench.workload import BenchRequest, WorkloadConfig, build_workload, length_range
from router.client import AsyncClient, ServerError
from router.config import KV_TRANSPORTS, default_endpoint

CONNECT_TIMEOUT_S = 30.0
DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT_S = 300.0
# Every prompt is built before the run (workload.py): past these a typo like --num-prompts 1e12
# would exhaust the memory (or a day) before the first request goes out.
MAX_REQUESTS = 10_000_000
MAX_WORKLOAD_TOKENS = 100_000_000
MAX_RUN_S = 86_400.0
MAX_ERROR_LINES = 5
MAX_INT32 = 2**31 - 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the load test's options to ``parser`` (the ``pdserve bench`` sub-command)."""
    target = parser.add_argument_group("target")
    target.add_argument("--backend", choices=BACKENDS, default="zmq",
                        help="zmq: pdserve's client protocol (default); openai / openai-chat: any "
                             "OpenAI-compatible server at --base-url (pdserve, vLLM, ...)")
    target.add_argument("--base-url", help="HTTP server of the openai backends "
                                           f"(default: {DEFAULT_BASE_URL})")
    target.add_argument("--endpoint", help="client endpoint of a running server (default: the one "
                                           "`pdserve serve` listens on by default, or $PDSERVE_ENDPOINT)")
    target.add_argument("--spawn", nargs="+", metavar="CONFIG",
                        help="start a local cluster for each configuration in turn and compare them: "
                             "disagg:<P>p<D>d or colocated:<N> (e.g. disagg:1p1d colocated:2)")
    target.add_argument("--model", help="model for --spawn, anything `pdserve serve --model` takes "
                                        "(default: demo, the built-in tiny model); with an openai "
                                        "backend, the model name to request (default: the first of "
                                        "/v1/models)")
    target.add_argument("--kv-transport", choices=KV_TRANSPORTS, default="auto",
                        help="KV transport of spawned disaggregated clusters (default: auto)")
    target.add_argument("--tp", type=int, default=1,
                        help="tensor-parallel size of each spawned worker (default: 1)")
    target.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="S",
                        help="fail a request when nothing arrives for it for S seconds, so a lost "
                             f"request cannot stall the run (default: {DEFAULT_TIMEOUT_S:g})")
    target.add_argument("--curve-dir", help="CurveZMQ key directory (pdserve keys) of a remote server")

    load = parser.add_argument_group("load")
    load.add_argument("--num-prompts", type=int, default=200, help="measured requests per run (default: 200)")
    load.add_argument("--request-rate", type=float, default=math.inf,
                      help="mean requests/s of the open loop; inf sends all at once (default: inf)")
    load.add_argument("--burstiness", type=float, default=1.0,
                      help="gamma shape of the gaps: 1 = Poisson, <1 burstier, >1 steadier (default: 1)")
    load.add_argument("--max-concurrency", type=int,
                      help="at most this many requests in flight (a closed loop with --request-rate inf)")
    load.add_argument("--num-warmups", type=int, default=2,
                      help="unmeasured requests sent first (default: 2)")
    load.add_argument("--seed", type=int, default=0,
                      help="seed of prompts and arrivals (default: 0); change it between runs against "
                           "one long-running server, whose prefix cache would otherwise hold the prompts")

    work = parser.add_argument_group("workload")
    work.add_argument("--input-len", type=int, default=128,
                      help="random prompt length in tokens (default: 128)")
    work.add_argument("--output-len", type=int, default=32, help="tokens to generate (default: 32)")
    work.add_argument("--range-ratio", type=float, default=0.0,
                      help="lengths uniform in [len*(1-r), len*(1+r)], 0 <= r < 1 (default: 0)")
    work.add_argument("--prefix-len", type=int, default=0,
                      help="shared random prefix prepended to every prompt, in tokens (default: 0)")
    work.add_argument("--dataset", metavar="PATH",
                      help='JSONL prompts: {"prompt": text or "prompt_token_ids": [...], "output_len": n}')
    work.add_argument("--ignore-eos", action="store_true", help="generate exactly the output length")
    work.add_argument("--temperature", type=float, default=0.0,
                      help="sampling temperature (default: 0, greedy)")
    work.add_argument("--vocab-size", type=int,
                      help="token ids of random prompts are below this (default: the server's, else 256)")

    slo = parser.add_argument_group("SLOs and goodput")
    slo.add_argument("--slo-ttft-ms", type=float, help="time-to-first-token objective in ms")
    slo.add_argument("--slo-tpot-ms", type=float, help="time-per-output-token objective in ms")
    slo.add_argument("--slo-target", type=float, default=0.9,
                     help="attainment the rate sweep must keep (default: 0.9)")
    slo.add_argument("--sweep-rate", action="store_true",
                     help="find the highest request rate keeping SLO attainment >= --slo-target, "
                          "starting from --request-rate (1 req/s when inf)")
    slo.add_argument("--sweep-max-runs", type=int, default=8,
                     help="runs per configuration in a sweep (default: 8)")

    out = parser.add_argument_group("output")
    out.add_argument("--json", metavar="PATH", help="write the results as JSON")
    out.add_argument("--plot", metavar="PATH.png",
                     help="draw latency CDFs and goodput vs rate (needs matplotlib)")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")


@dataclass(frozen=True)
class BenchSettings:
    """Validated options; building it raises ValueError saying which option to change."""

    shape: LoadShape
    workload: WorkloadConfig
    slo: SLO
    sweep: SweepConfig | None
    num_prompts: int
    num_warmups: int
    seed: int
    sampling: dict
    vocab_size: int | None
    timeout: float
    curve_dir: str | None
    progress: bool
    backend: str = "zmq"
    served_model: str | None = None  # openai backends: the model name to request

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "BenchSettings":
        for name in ("num_prompts", "vocab_size", "output_len"):
            value = getattr(args, name)
            if value is not None and not 1 <= value <= MAX_INT32:  # numpy draws int64 lengths and ids
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer up to {MAX_INT32}, "
                                 f"got {value}")
        if args.num_warmups < 0 or args.seed < 0:
            raise ValueError("--num-warmups and --seed must be integers >= 0")
        if not (math.isfinite(args.temperature) and args.temperature >= 0):
            raise ValueError(f"--temperature must be a finite number >= 0, got {args.temperature}")
        if not (math.isfinite(args.timeout) and args.timeout > 0):
            raise ValueError(f"--timeout must be a positive finite number of seconds, got {args.timeout}")
        shape = LoadShape(args.request_rate, args.burstiness, args.max_concurrency)
        workload = WorkloadConfig(args.input_len, args.output_len, args.range_ratio, args.prefix_len,
                                  args.dataset)
        _check_size(args.num_prompts, args.num_warmups, workload, shape.request_rate)
        sweep = None
        if args.sweep_rate:
            start = args.request_rate if math.isfinite(args.request_rate) else 1.0
            sweep = SweepConfig(start_rate=start, target=args.slo_target, max_runs=args.sweep_max_runs)
        return cls(shape=shape,
                   workload=workload,
                   slo=SLO(args.slo_ttft_ms, args.slo_tpot_ms), sweep=sweep,
                   num_prompts=args.num_prompts, num_warmups=args.num_warmups, seed=args.seed,
                   sampling={"temperature": args.temperature, "ignore_eos": args.ignore_eos},
                   vocab_size=args.vocab_size, timeout=args.timeout, curve_dir=args.curve_dir,
                   progress=not args.no_progress and sys.stderr.isatty(), backend=args.backend,
                   served_model=args.model if args.backend != "zmq" else None)

    def params(self) -> dict:
        """The run's parameters, as recorded in the JSON."""
        return {"num_prompts": self.num_prompts, "request_rate": self.shape.request_rate,
                "burstiness": self.shape.burstiness, "max_concurrency": self.shape.max_concurrency,
                "input_len": self.workload.input_len, "output_len": self.workload.output_len,
                "range_ratio": self.workload.range_ratio, "prefix_len": self.workload.prefix_len,
                "dataset": self.workload.dataset, **self.sampling, "seed": self.seed,
                "num_warmups": self.num_warmups, "slo_ttft_ms": self.slo.ttft_ms,
                "slo_tpot_ms": self.slo.tpot_ms, "slo_target": self.sweep.target if self.sweep else None}


def _check_size(num_prompts: int, num_warmups: int, workload: WorkloadConfig, rate: float) -> None:
    """Refuse a run too big to prepare or too slow to finish, before anything is built."""
    if num_prompts + num_warmups > MAX_REQUESTS:
        raise ValueError(f"--num-prompts plus --num-warmups is {num_prompts + num_warmups}, over the "
                         f"{MAX_REQUESTS} requests one run can prepare; lower them")
    if workload.dataset is None:
        tokens = (num_prompts + num_warmups) * (workload.prefix_len
                                                + length_range(workload.input_len, workload.range_ratio)[1])
        if tokens > MAX_WORKLOAD_TOKENS:
            raise ValueError(f"the random prompts would hold up to {tokens} tokens, over the "
                             f"{MAX_WORKLOAD_TOKENS} one run can prepare; lower --num-prompts, "
                             f"--input-len or --prefix-len")
    if math.isfinite(rate) and num_prompts / rate > MAX_RUN_S:
        raise ValueError(f"--request-rate {rate:g} would spread {num_prompts} requests over about "
                         f"{num_prompts / rate / 3600:.3g} h (more than {MAX_RUN_S / 3600:g} h); "
                         f"raise the rate or lower --num-prompts")


class BenchError(RuntimeError):
    """The load test could not run (server unreachable, no request completed, ...)."""


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def connect(endpoint: str, settings: BenchSettings):
    """The backend's client: ``endpoint`` is a ZMQ endpoint, or the openai backends' base URL."""
    if settings.backend == "zmq":
        return AsyncClient(endpoint, timeout=settings.timeout, curve=settings.curve_dir)
    return OpenAIClient(endpoint, chat=settings.backend == "openai-chat", model=settings.served_model,
                        timeout=settings.timeout)


async def bench_endpoint(endpoint: str, name: str, settings: BenchSettings) -> ConfigResult:
    """Warm up and measure one server (one run, or a rate sweep). Raises BenchError."""
    async with connect(endpoint, settings) as client:
        try:
            status = await asyncio.wait_for(client.status(), CONNECT_TIMEOUT_S)
        except TimeoutError:  # asyncio's and the client's
            what = ("a pdserve server's client endpoint" if settings.backend == "zmq" else
                    "an OpenAI-compatible HTTP server (pdserve serve prints its HTTP address when ready)")
            raise BenchError(f"no answer from {endpoint} within {CONNECT_TIMEOUT_S:g} s: is it {what}? "
                             f"(start one with `pdserve serve`)") from None
        except ServerError as exc:
            raise BenchError(f"{endpoint} did not answer the status request: {exc}") from None
        except OSError as exc:  # the HTTP backends: nothing listening (the text names the URL)
            raise BenchError(str(exc)) from None
        reported = reported_vocab_size(status)
        vocab_size = settings.vocab_size or reported
        if settings.vocab_size and reported and settings.vocab_size > reported:
            raise ValueError(f"--vocab-size {settings.vocab_size} exceeds the served model's "
                             f"vocabulary of {reported}; leave it out or lower it")
        model = status.get("router", {}).get("model")
        n, num_warmups = settings.num_prompts, settings.num_warmups
        requests = build_workload(settings.workload, n + num_warmups, vocab_size, settings.seed)
        warmups = await warm_up(client, requests[n:], settings.shape, settings.sampling)
        if warmups and all(not record.ok for record in warmups):
            _log(f"[{name}] warning: every warm-up request failed: {next(iter(error_counts(warmups)))}")

        async def measure(rate: float, prompts: list[BenchRequest]) -> tuple[dict, dict]:
            shape = settings.shape.with_rate(rate)
            bar = ProgressBar(len(prompts), f"[{name} {shape.describe()}] ", enabled=settings.progress)
            try:
                result = await run_load(client, prompts, shape, settings.seed, settings.sampling,
                                        on_done=lambda record: bar.update(not record.ok))
            finally:  # an error line after a cut-short run starts on a line of its own
                bar.close()
            summary = summarize(result.records, result.duration_s, settings.slo)
            summary.update(request_rate=rate, model=model, vocab_size=vocab_size,
                           errors=error_counts(result.records))
            if settings.sweep is not None and all(record.invalid for record in result.records):
                # the server refuses these prompts at any rate: halving it would only lengthen the run
                raise BenchError(f"[{name}] the server refused every request of the run at {rate:g} req/s "
                                 f"({next(iter(summary['errors']))}); no rate can pass, so the sweep "
                                 f"stops: change the workload or the server and run again")
            return summary, latency_samples_ms(result.records)

        if settings.sweep is None:
            summary, samples = await measure(settings.shape.request_rate, requests[:n])
            return ConfigResult(name, summary, samples)

        runs: dict[float, tuple[dict, dict]] = {}

        async def attainment(rate: float) -> float:
            # fresh random prompts for every run, so no run finds the previous one's in a prefix cache
            prompts = build_workload(settings.workload, n, vocab_size, settings.seed + 1 + len(runs))
            runs[rate] = await measure(rate, prompts)
            summary = runs[rate][0]
            _log(f"[{name}] {rate:.3g} req/s: SLO attainment {summary['slo_attainment']:.1%}, "
                 f"goodput {summary['goodput']:.2f} req/s")
            return summary["slo_attainment"]

        outcome = await find_max_rate(attainment, settings.sweep)
        headline = outcome.best_rate if outcome.best_rate is not None else min(runs)
        return ConfigResult(name, *runs[headline], sweep=[runs[rate][0] for rate in sorted(runs)],
                            max_rate_at_slo=outcome.best_rate)


def _bench_all(args: argparse.Namespace, settings: BenchSettings, specs: list[ClusterSpec],
               endpoint: str | None) -> list[ConfigResult]:
    if endpoint is not None:
        return [run_event_loop(bench_endpoint(endpoint, endpoint, settings))]
    results = []
    options = {"model": args.model or "demo", "kv_transport": args.kv_transport, "tp": args.tp}
    for spec in specs:
        _log(f"[{spec.name}] starting the cluster ...")
        with spawned_cluster(spec, **options) as spawned_endpoint:
            results.append(run_event_loop(bench_endpoint(spawned_endpoint, spec.name, settings)))
    return results


def _target_params(args: argparse.Namespace, specs: list[ClusterSpec], endpoint: str | None) -> dict:
    if endpoint is not None:
        return {"endpoint": endpoint}
    return {"spawn": [spec.name for spec in specs], "model_dir": args.model, "tp": args.tp,
            "kv_transport": args.kv_transport}


def _check_output_path(option: str, path: str | None) -> None:
    """Refuse an output file that could not be written, before minutes of load are spent: the
    file is created (and removed again when it was not there)."""
    if path is None:
        return
    if not path.strip():
        raise ValueError(f"{option} needs a file path, got {path!r}")
    target = Path(path)
    if not target.resolve().parent.is_dir():
        raise ValueError(f"{option} {path}: the directory {target.resolve().parent} does not exist")
    if target.is_dir():
        raise ValueError(f"{option} {path} is a directory; give a file path")
    existed = target.exists()
    try:
        with open(target, "a"):
            pass
    except OSError as exc:
        raise ValueError(f"{option} {path} cannot be written ({exc.strerror}); choose another path") from None
    if not existed:
        target.unlink(missing_ok=True)


def _log_errors(name: str, errors: dict[str, int], keep: bool) -> None:
    """One line per error message, the most frequent first, at most MAX_ERROR_LINES: messages
    that name a token id or a length differ per request, and would flood the terminal."""
    messages = list(errors.items())
    for message, count in messages[:MAX_ERROR_LINES]:
        _log(f"[{name}] {count} request(s) failed: {message}")
    if len(messages) > MAX_ERROR_LINES:
        rest = messages[MAX_ERROR_LINES:]
        _log(f"[{name}] {sum(count for _, count in rest)} more request(s) failed with {len(rest)} other "
             f"message(s); {'the --json file lists' if keep else '--json PATH keeps'} them all")


def run(args: argparse.Namespace) -> int:
    """Run the load test described by ``args`` (from ``add_arguments``); returns the exit status."""
    try:
        settings = BenchSettings.from_args(args)
        specs = parse_cluster_specs(args.spawn) if args.spawn else []
        if specs and args.endpoint:
            raise ValueError("give either --endpoint (a running server) or --spawn CONFIG... (start "
                             "local clusters), not both")
        if args.backend != "zmq":
            if specs or args.endpoint:
                raise ValueError(f"--backend {args.backend} load-tests the server at --base-url; "
                                 "--spawn and --endpoint are for the zmq backend")
            endpoint = args.base_url or DEFAULT_BASE_URL
        elif args.base_url:
            raise ValueError("--base-url is for --backend openai or openai-chat")
        else:
            endpoint = None if specs else args.endpoint or default_endpoint("client")
        if args.tp < 1:  # else every spawned worker would fail on it, one usage text each
            raise ValueError(f"--tp must be a positive integer, got {args.tp}")
        if not specs and (args.tp != 1 or args.kv_transport != "auto"
                          or (args.model and args.backend == "zmq")):
            raise ValueError("--model, --tp and --kv-transport apply to --spawn; a running server "
                             "already has its own")
        if args.model and args.backend == "zmq":  # a bad --model fails here, before anything starts
            from models.registry import resolve_model
            resolve_model(args.model)
        _check_output_path("--json", args.json)
        _check_output_path("--plot", args.plot)
        if args.plot:
            check_plot_available(args.plot)
    except (ValueError, PlotUnavailable) as exc:
        _log(f"pdserve bench: error: {exc}")
        return 2
    started = time.time()
    try:
        results = _bench_all(args, settings, specs, endpoint)
    except ServerGone as exc:
        completed = sum(record.ok for record in exc.records)
        _log(f"pdserve bench: error: {exc} mid-run; {completed} of {exc.total} requests had completed. "
             f"No results written: check the server (pdserve status) and run again")
        return 1
    except (ValueError, BenchError, OSError, RuntimeError, ServerError) as exc:
        # ValueError here: a bad dataset or --vocab-size, found once the server answered;
        # ServerError: nothing listens at the endpoint
        _log(f"pdserve bench: error: {exc}")
        return 2 if isinstance(exc, ValueError) else 1
    except KeyboardInterrupt:
        _log("pdserve bench: interrupted; the requests in flight were cancelled, no results written")
        return 130

    print(format_table(results))
    for result in results:
        _log_errors(result.name, result.summary["errors"], keep=bool(args.json))
    if args.json:
        params = {"date": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
                  **_target_params(args, specs, endpoint), **settings.params()}
        write_json(args.json, results_json(params, results, compare=bool(specs)))
    if args.plot:
        plot_results(args.plot, results, settings.sweep.target if settings.sweep else None)
    failed = [result.name for result in results if result.summary["completed"] == 0]
    if failed:
        _log(f"pdserve bench: error: no request completed in {', '.join(failed)}")
        return 1
    return 0
