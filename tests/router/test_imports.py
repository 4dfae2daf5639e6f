"""The dependency rules of the layout (docs/architecture.md): which package may import which."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROUTER_MODULES = ["router.server", "router.cli", "router.client", "router.launcher", "router.worker_link",
                  "router.runtime", "router.scheduler", "router.watchdog", "router.admission",
                  "router.status_table", "router.protocol", "router.payloads", "router.validation",
                  "router.worker_args", "router.http.gateway", "router.http.app", "router.metrics",
                  "router.chat_template", "router.ray_launcher", "router.ray_args", "router.scaling"]
WORKER_PACKAGES = ("worker", "prefill", "decode")


def imports(path: Path, *, module_level_only: bool = False) -> list[tuple[int, str]]:
    """(line, imported module) of every import in ``path`` (or only its module-level ones)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if module_level_only else ast.walk(tree)
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def offenders(package: str, forbidden: tuple[str, ...], *, allowed_files=(), module_level_only=False):
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        if path.relative_to(ROOT).as_posix() in allowed_files:
            continue
        for line, name in imports(path, module_level_only=module_level_only):
            if name.split(".")[0] in forbidden:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    return bad


def test_router_side_never_imports_torch():
    code = ("import sys\n"
            f"for name in {ROUTER_MODULES!r}: __import__(name)\n"
            "from router.cli import build_parser; build_parser()\n"
            "print('torch' in sys.modules, 'ray' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False False"  # Ray too loads only under --launcher ray


def test_http_libraries_load_only_when_http_is_on():
    """``pdserve router --no-http`` and the client library never pay for Starlette/uvicorn."""
    code = ("import sys\n"
            "import router.server, router.runtime, router.cli, router.client, router.launcher\n"
            "print(any(m in sys.modules for m in ('starlette', 'uvicorn', 'prometheus_client', 'jinja2')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_router_side_loads_no_worker_package():
    code = ("import sys\n"
            f"for name in {ROUTER_MODULES!r}: __import__(name)\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {WORKER_PACKAGES!r}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("package, forbidden, allowed_files, module_level_only", [
    ("prefill", ("decode",), (), False),
    ("decode", ("prefill",), ("decode/engine.py",), False),       # the colocated engine only
    ("router", WORKER_PACKAGES + ("torch",), (), True),
    ("worker", ("prefill", "decode"), (), False),
    ("models", WORKER_PACKAGES + ("router",), (), False),
    ("kvtransfer", WORKER_PACKAGES + ("router", "models"), (), False),
])
def test_layering(package, forbidden, allowed_files, module_level_only):
    assert offenders(package, forbidden, allowed_files=allowed_files,
                     module_level_only=module_level_only) == []


def test_the_layering_check_sees_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import torch\nfrom decode.engine import X\ndef f():\n    from prefill import y\n")
    assert imports(source) == [(1, "torch"), (2, "decode.engine"), (4, "prefill")]
    assert imports(source, module_level_only=True) == [(1, "torch"), (2, "decode.engine")]
