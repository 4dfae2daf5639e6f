import subprocess
import sys

ROUTER_MODULES = ["router.server", "router.cli", "router.client", "router.launcher", "router.worker_link",
                  "router.runtime", "router.scheduler", "router.watchdog", "router.admission",
                  "router.status_table"]


def test_router_side_never_imports_torch():
    code = ("import sys\n"
            f"for name in {ROUTER_MODULES!r}: __import__(name)\n"
            "from router.cli import build_parser; build_parser()\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
