"""Options of ``pdserve bench``: configuration parsing and clear errors before anything runs."""
import argparse
import subprocess
import sys

import pytest

from router.bench.main import BenchSettings, add_arguments, run
from router.bench.spawn import ClusterSpec, parse_cluster_spec, parse_cluster_specs


def _args(*argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize("text, spec", [
    ("disagg:1p1d", ClusterSpec("disagg", num_prefill=1, num_decode=1)),
    ("disagg:2p1d", ClusterSpec("disagg", num_prefill=2, num_decode=1)),
    ("colocated:2", ClusterSpec("colocated", num_workers=2)),
])
def test_cluster_specs_parse_and_keep_their_name(text, spec):
    assert parse_cluster_spec(text) == spec and spec.name == text


@pytest.mark.parametrize("text, match", [
    ("disagg", "is not a configuration; write disagg:<P>p<D>d"),
    ("disagg:1p", "is not a configuration"),
    ("disagg:1d1p", "is not a configuration"),
    ("colocated:two", "is not a configuration"),
    ("disagg:0p1d", "needs at least one prefill and one decode worker"),
    ("colocated:0", "needs at least one worker"),
])
def test_bad_cluster_specs_are_refused(text, match):
    with pytest.raises(ValueError, match=match):
        parse_cluster_spec(text)


def test_a_configuration_given_twice_is_refused():
    with pytest.raises(ValueError, match="lists colocated:2 twice"):
        parse_cluster_specs(["colocated:2", "disagg:1p1d", "colocated:2"])


def test_settings_from_defaults_and_sweep_start():
    settings = BenchSettings.from_args(_args("--endpoint", "tcp://127.0.0.1:1", "--sweep-rate",
                                             "--ignore-eos", "--slo-ttft-ms", "500"))
    assert settings.sweep.start_rate == 1.0 and settings.sweep.target == 0.9
    assert settings.sampling == {"temperature": 0.0, "ignore_eos": True}
    assert settings.slo.ttft_ms == 500 and settings.slo.tpot_ms is None
    params = settings.params()
    assert params["request_rate"] == float("inf") and params["ignore_eos"] is True
    assert BenchSettings.from_args(_args("--request-rate", "3", "--sweep-rate")).sweep.start_rate == 3.0


@pytest.mark.parametrize("argv, message", [
    (["--endpoint", "tcp://a", "--spawn", "colocated:1"], "give either --endpoint"),
    (["--spawn", "colocated"], "is not a configuration"),
    (["--endpoint", "tcp://a", "--model", "/m"], "apply to --spawn"),
    (["--tp", "2"], "apply to --spawn"),
    (["--spawn", "colocated:1", "--model", "/nonexistent"],
     "--model '/nonexistent' is neither a known model name"),
    (["--endpoint", "tcp://a", "--num-prompts", "0"], "--num-prompts must be a positive integer"),
    (["--endpoint", "tcp://a", "--request-rate", "-1"], "--request-rate must be a positive"),
    (["--endpoint", "tcp://a", "--range-ratio", "1.5"], "--range-ratio must be in"),
    (["--endpoint", "tcp://a", "--slo-tpot-ms", "-5"], "--slo-tpot-ms must be a positive"),
    (["--endpoint", "tcp://a", "--sweep-rate", "--slo-target", "2"], "--slo-target must be in"),
    (["--endpoint", "tcp://a", "--json", "/nonexistent-dir/x.json"], "--json /nonexistent-dir/x.json"),
    # output paths that cannot be written are refused before the run, not after it
    (["--endpoint", "tcp://a", "--json", ""], "--json needs a file path"),
    (["--endpoint", "tcp://a", "--json", "/"], "--json / is a directory"),
    (["--endpoint", "tcp://a", "--json", "/proc/bench.json"], "--json /proc/bench.json cannot be written"),
    (["--endpoint", "tcp://a", "--plot", "/proc/bench.png"], "--plot /proc/bench.png cannot be written"),
    # sizes that would exhaust the memory or take forever before the first request
    (["--endpoint", "tcp://a", "--num-prompts", "20000000"], "over the 10000000 requests"),
    (["--endpoint", "tcp://a", "--num-prompts", "100000", "--input-len", "100000"],
     "lower --num-prompts, --input-len or --prefix-len"),
    (["--endpoint", "tcp://a", "--request-rate", "1e-300"], "raise the rate or lower --num-prompts"),
    (["--endpoint", "tcp://a", "--timeout", "inf"], "--timeout must be a positive finite number"),
    (["--endpoint", "tcp://a", "--temperature", "inf"], "--temperature must be a finite number >= 0"),
    (["--backend", "openai", "--base-url", "http://[::1"], "--base-url 'http://[::1' is not a usable URL"),
    (["--backend", "openai", "--base-url", "http://"], "is not a usable URL (no host)"),
    (["--backend", "openai", "--base-url", "http://127.0.0.1:99999"], "is not a usable URL (Port out of range"),
    (["--spawn", "colocated:1", "--tp", "0"], "--tp must be a positive integer, got 0"),
    (["--endpoint", "tcp://a", "--vocab-size", str(10**23)], "--vocab-size must be a positive integer up to"),
    (["--endpoint", "tcp://a", "--output-len", str(10**23)], "--output-len must be a positive integer up to"),
])
def test_bad_options_exit_2_with_a_message_before_connecting(argv, message, capsys):
    assert run(_args(*argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("pdserve bench: error: ") and message in err and "Traceback" not in err


def test_module_entry_point_reports_bad_options():
    proc = subprocess.run([sys.executable, "-m", "router.bench", "--spawn", "disagg:1x1d"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--spawn 'disagg:1x1d' is not a configuration" in proc.stderr and "Traceback" not in proc.stderr


def test_a_plot_format_matplotlib_cannot_write_is_refused_before_the_run(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert run(_args("--endpoint", "tcp://a", "--plot", str(tmp_path / "bench.txt"))) == 2
    err = capsys.readouterr().err
    assert "matplotlib cannot write .txt files; end the name in .png" in err


def test_the_output_path_probe_leaves_no_file_behind(tmp_path):
    # the probe creates the file to prove it can; a run refused later must not leave it there
    out = tmp_path / "out.json"
    assert run(_args("--endpoint", "tcp://a", "--json", str(out), "--num-prompts", "0")) == 2
    assert run(_args("--endpoint", "tcp://a", "--json", str(out), "--plot", "/proc/x.png")) == 2
    assert not out.exists()


def test_an_http_address_where_nothing_listens_is_named_once(capsys):
    # nothing listens on port 1; the line used to say "cannot reach URL: cannot reach URL: ..."
    assert run(_args("--backend", "openai", "--base-url", "http://127.0.0.1:1", "--num-prompts", "1")) == 1
    err = capsys.readouterr().err
    assert err.startswith("pdserve bench: error: cannot reach http://127.0.0.1:1: ") and err.count("cannot reach") == 1


def test_an_endpoint_where_nothing_listens_is_one_line_from_the_python_entry_point(capsys):
    # the `pdserve` command caught the client's error, run() itself (python -m router.bench) did not
    assert run(_args("--endpoint", "tcp://127.0.0.1:1", "--num-prompts", "1")) == 1
    err = capsys.readouterr().err
    assert err.startswith("pdserve bench: error: unavailable: no router at tcp://127.0.0.1:1") and "Traceback" not in err
