"""The package picture of docs/ARCHITECTURE.md, asserted from the code.

Layers, bottom up: `formats` (numpy only) and `wire` (what crosses a process boundary) at the bottom,
`kernels` beside them, `engines` (engine processes), `daemon` (the dispatcher) and `oip` (its Open Inference
Protocol front end process, a client of it) above, drivers and
tools (`loadgen_driver`, `prepare`) on top. A package imports only packages below it (and itself);
`daemon` and `engines` never import each other (the daemon starts engines by module name). Checked two
ways: every import statement of every module, function-level ones included (static), and importing
every module in a fresh interpreter in which the forbidden packages cannot be imported (dynamic).
Finally a real dispatcher process, serving, has not loaded torch, Triton or any engine code.
"""
from __future__ import annotations

import ast
import subprocess
import tempfile
import sys
from pathlib import Path

import pytest

from formats.artifact import write_model_description
from formats.model_config import DLRMConfig

REPO = Path(__file__).resolve().parents[1]
PROJECT = ("formats", "wire", "kernels", "engines", "daemon", "oip", "loadgen_driver", "prepare")
# What each package may import of the project (itself always), and third-party packages it must not.
ALLOWED: dict[str, set[str]] = {
    "formats": set(),
    "wire": set(),
    "kernels": set(),
    "engines": {"formats", "wire", "kernels"},
    "daemon": {"formats", "wire"},
    "oip": {"formats", "wire"},  # the Open Inference Protocol front end process: a client of the dispatcher
    "loadgen_driver": {"formats", "wire"},
    "prepare": {"formats", "wire", "kernels", "engines"},
}
HEAVY = {"torch", "triton"}
NO_HEAVY = {"formats", "wire", "daemon", "oip", "loadgen_driver"}


def _imports(path: Path) -> set[str]:
    """Top-level names of every absolute import in a file, wherever it stands."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", PROJECT)
def test_imports_only_go_down(package: str) -> None:
    bad = []
    forbidden = (set(PROJECT) - ALLOWED[package] - {package}) | (HEAVY if package in NO_HEAVY else set())
    for path in sorted((REPO / package).rglob("*.py")):
        for name in sorted(_imports(path) & forbidden):
            bad.append(f"{path.relative_to(REPO)} imports {name}")
    assert not bad, "\n".join(bad)


_BLOCKED_IMPORT = r'''
import importlib, pkgutil, sys
package, blocked = sys.argv[1], set(sys.argv[2].split(",")) - {""}

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ImportError(f"{name} is above {package} (layering)")
        return None

sys.meta_path.insert(0, Blocker())
pkg = importlib.import_module(package)
for info in pkgutil.walk_packages(pkg.__path__, package + "."):
    importlib.import_module(info.name)
print("ok")
'''


@pytest.mark.parametrize("package", PROJECT)
def test_every_module_imports_without_the_layers_above(package: str) -> None:
    blocked = (set(PROJECT) - ALLOWED[package] - {package}) | (HEAVY if package in NO_HEAVY else set())
    proc = subprocess.run([sys.executable, "-c", _BLOCKED_IMPORT, package, ",".join(sorted(blocked))],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


_SERVE_AND_LOOK = r'''
import os, signal, sys, threading, time
from daemon.cli import main

def watch(endpoint):
    from wire.client import wait_until_serving
    wait_until_serving(endpoint, timeout_s=60)
    loaded = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "triton", "engines", "kernels"})
    print("LOADED " + ",".join(loaded), flush=True)
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=watch, args=(sys.argv[2],), daemon=True).start()
sys.exit(main(["--config", sys.argv[1]]))
'''


def test_the_dispatcher_process_never_loads_torch(tmp_path: Path) -> None:
    art = write_model_description(tmp_path / "art", DLRMConfig((50,) * 26))
    rt = Path(tempfile.mkdtemp(prefix="dlrma-", dir="/tmp"))  # short: unix socket paths
    cfg = tmp_path / "d.toml"
    cfg.write_text(f'runtime_dir = "{rt}"\nengines = ["null"]\nmodel = "{art}"\n')
    proc = subprocess.run([sys.executable, "-c", _SERVE_AND_LOOK, str(cfg), f"ipc://{rt}/dlrm.sock"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("LOADED"))
    assert line == "LOADED ", f"the dispatcher loaded {line[7:]}"


def test_clients_use_only_the_contract() -> None:
    """Client programs (the demo, the LoadGen driver) reach the daemon through wire/ and formats/ only."""
    for path in [REPO / "prepare" / "demo.py", *sorted((REPO / "loadgen_driver").rglob("*.py"))]:
        assert _imports(path) & set(PROJECT) <= {"formats", "wire", "loadgen_driver"}, path
