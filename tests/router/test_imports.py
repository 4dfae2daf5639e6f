import subprocess
import sys

ROUTER_MODULES = ["router.server", "router.cli", "router.client", "router.launcher", "router.worker_link",
                  "router.runtime", "router.scheduler", "router.watchdog", "router.admission",
                  "router.status_table", "router.http.gateway", "router.http.app", "router.metrics",
                  "router.chat_template"]


def test_router_side_never_imports_torch():
    code = ("import sys\n"
            f"for name in {ROUTER_MODULES!r}: __import__(name)\n"
            "from router.cli import build_parser; build_parser()\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_http_libraries_load_only_when_http_is_on():
    """``pdserve router --no-http`` and the client library never pay for Starlette/uvicorn."""
    code = ("import sys\n"
            "import router.server, router.runtime, router.cli, router.client, router.launcher\n"
            "print(any(m in sys.modules for m in ('starlette', 'uvicorn', 'prometheus_client', 'jinja2')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
