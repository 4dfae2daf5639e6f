"""Every error case over raw HTTP, against a router with no workers (so nothing ever runs):
vLLM's error shape and status codes, the API key, the body limit, overload and unavailability."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading

import pytest

from router.config import RouterConfig
from router.http.config import HttpConfig
from router.runtime import RouterThread

httpx = pytest.importorskip("httpx2")
KEY = "s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}
BODY_LIMIT = 4096


@pytest.fixture(scope="module")
def plain_model(chat_model, tmp_path_factory):
    """The tiny model without a chat template."""
    path = tmp_path_factory.mktemp("plain") / "plain"
    shutil.copytree(chat_model, path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def bare(plain_model, tmp_path_factory):
    """A router that knows the model but has no worker: requests queue (max 1), then fail."""
    tmp = tmp_path_factory.mktemp("bare")
    config = RouterConfig(frontend=f"ipc://{tmp}/c.ipc", backend=f"ipc://{tmp}/w.ipc",
                          model_dir=str(plain_model), max_queue=1, unavailable_timeout_s=1.0,
                          tick_s=0.05)
    thread = RouterThread(config, http=HttpConfig(port=0, api_key=KEY, max_body_bytes=BODY_LIMIT)).start()
    with httpx.Client(base_url=thread.router.http_url, headers=AUTH, timeout=30) as client:
        yield client
    thread.stop()


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    assert error["message"]
    return error


def test_bad_json_and_wrong_types(bare):
    error_of(bare.post("/v1/completions", content=b"{not json"), 400)
    error_of(bare.post("/v1/completions", content=b"[1, 2]"), 400)
    error_of(bare.post("/v1/completions", json={"max_tokens": 3}), 400)  # no prompt
    for body, field in (({"prompt": "x", "temperature": "hot"}, "temperature"),
                        ({"prompt": "x", "n": "3"}, "n"),
                        ({"prompt": "x", "stream": "yes"}, "stream"),
                        ({"prompt": {"a": 1}}, "prompt"),
                        ({"prompt": "x", "max_tokens": 2.5}, "max_tokens"),
                        ({"prompt": "x", "stop": 7}, "stop"),
                        ({"prompt": "x", "echo": True}, "echo")):
        assert field in error_of(bare.post("/v1/completions", json=body), 400)["message"]
    assert "messages" in error_of(bare.post("/v1/chat/completions", json={"messages": "hi"}), 400)["message"]
    assert "max_tokens" in error_of(bare.post("/v1/completions", json={"prompt": "x", "max_tokens": 0}),
                                    400)["message"]
    assert "chat template" in error_of(bare.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}]}), 400)["message"]


def test_out_of_range_values(bare):
    for body, field in (({"temperature": -1}, "temperature"), ({"top_p": 2}, "top_p"),
                        ({"max_tokens": 0}, "max_tokens"), ({"logprobs": 21}, "logprobs"),
                        ({"n": 0}, "n"), ({"top_k": -2}, "top_k"), ({"seed": -1}, "seed"),
                        ({"prompt": [1, 99999]}, "prompt_token_ids"),
                        ({"prompt": [1] * 600}, "max model length")):
        response = bare.post("/v1/completions", json={"prompt": "x", **body})
        assert field in error_of(response, 400)["message"], body


def test_oversize_body_is_413(bare):
    big = {"prompt": "x" * (2 * BODY_LIMIT)}
    error_of(bare.post("/v1/completions", json=big), 413)

    def chunks():  # no Content-Length: the limit applies while reading
        for _ in range(4):
            yield b" " * BODY_LIMIT

    error_of(bare.post("/v1/completions", content=chunks()), 413)


def test_unknown_model_is_404(bare):
    error = error_of(bare.post("/v1/completions", json={"model": "gpt-9", "prompt": "x"}), 404)
    assert "gpt-9" in error["message"]
    assert bare.get("/v1/models").json()["data"][0]["id"] == "plain"
    error_of(bare.get("/v1/nowhere"), 404)


def test_api_key_is_required_except_health_and_metrics(bare):
    url = str(bare.base_url)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        error_of(httpx.get(url + "/v1/models", headers=headers), 401)
        error_of(httpx.post(url + "/v1/completions", json={"prompt": "x"}, headers=headers), 401)
    assert httpx.get(url + "/metrics").status_code == 200
    assert httpx.get(url + "/health").status_code == 503  # no worker: unhealthy, but no key needed
    with pytest.raises(ValueError, match="api-key"):
        HttpConfig(host="0.0.0.0")


def test_overload_429_then_unavailable_503(bare):
    """Queue bound 1, no worker: the first request waits, the second is refused with 429; the
    first fails with 503 after the unavailable timeout, as an SSE error event since it streams."""
    events = []
    entered = threading.Event()

    def first():
        with bare.stream("POST", "/v1/completions", json={"prompt": "x", "stream": True}) as response:
            entered.set()
            events.extend(line for line in response.iter_lines() if line)

    thread = threading.Thread(target=first)
    thread.start()
    assert entered.wait(30)
    error = error_of(bare.post("/v1/completions", json={"prompt": "y"}), 429)
    assert "waiting" in error["message"]
    thread.join(30)
    assert events[-1] == "data: [DONE]"
    streamed = json.loads(events[-2][len("data: "):])["error"]
    assert streamed["code"] == 503 and "worker" in streamed["message"]
    error_of(bare.post("/v1/completions", json={"prompt": "z"}), 503)
    assert "no prefill or decode worker" in error_of(bare.get("/health"), 503)["message"]


def test_tokenize_and_detokenize(bare):
    tokens = bare.post("/tokenize", json={"prompt": "Hi"}).json()
    assert tokens == {"count": 3, "max_model_len": 512, "tokens": [256, ord("H"), ord("i")]}
    assert bare.post("/detokenize", json={"tokens": [ord("H"), ord("i")]}).json() == {"prompt": "Hi"}
    error_of(bare.post("/detokenize", json={"tokens": [1, 9999]}), 400)
    assert bare.get("/version").json()["version"]


def test_router_command_reports_its_http_port(plain_model, tmp_path):
    """``pdserve router --port 0``: the ready line names the port it got, and it serves there."""
    proc = subprocess.Popen([sys.executable, "-m", "router.cli", "router", "--listen",
                             f"ipc://{tmp_path}/c.ipc", "--backend", f"ipc://{tmp_path}/w.ipc",
                             "--model", str(plain_model), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        assert "ready" in line and "http http://127.0.0.1:" in line, line
        url = line.split("http ")[1].split(",")[0]
        assert not url.endswith(":0")
        assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "plain"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_chat_template_override(plain_model, tmp_path):
    """--chat-template FILE gives a model without a template one (seen through /tokenize)."""
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}>")
    config = RouterConfig(frontend=f"ipc://{tmp_path}/c.ipc", backend=f"ipc://{tmp_path}/w.ipc",
                          model_dir=str(plain_model))
    thread = RouterThread(config, http=HttpConfig(port=0, chat_template=str(template))).start()
    try:
        tokens = httpx.post(thread.router.http_url + "/tokenize", json={
            "messages": [{"role": "user", "content": "hi"}]}).json()["tokens"]
        assert bytes(tokens).decode() == "[user]hi>"  # byte-level tokenizer, no bos added
    finally:
        thread.stop()
    with pytest.raises(ValueError, match="chat-template"):
        HttpConfig(chat_template=str(tmp_path / "missing.jinja"))
