"""The sans-IO core never imports trio (issue 2: the core is usable from any I/O layer)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import triomail

CORE = sorted(
    f"_core.{p.stem}" for p in (Path(triomail.__file__).parent / "_core").glob("[!_]*.py")
)
PACKAGE_DIR = Path(triomail.__file__).parent

# ``import triomail._core.reply`` would run triomail/__init__.py, which imports the trio layer.
# So the subprocess registers a bare package object with the same __path__ and imports
# the core modules through it: only their own imports run.
_PROBE = """
import importlib, sys, types
package = types.ModuleType("triomail")
package.__path__ = [{path!r}]
sys.modules["triomail"] = package
for name in {modules!r}:
    module = importlib.import_module("triomail." + name)
    assert module.__file__.startswith({path!r}), module.__file__
leaked = sorted(m for m in sys.modules if m == "trio" or m.startswith(("trio.", "_trio")))
print(",".join(leaked))
"""


def _probe(modules: list[str]) -> str:
    code = _PROBE.format(path=str(PACKAGE_DIR), modules=modules)
    done = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_core_modules_do_not_import_trio() -> None:
    assert _probe(CORE) == ""


@pytest.mark.parametrize("module", CORE)
def test_each_core_module_alone_does_not_import_trio(module: str) -> None:
    assert _probe([module]) == ""


def test_probe_detects_trio() -> None:
    """The probe can fail: the trio layer does import trio."""
    assert "trio" in _probe(["_client.transport"]).split(",")


@pytest.mark.parametrize("module", CORE)
def test_core_module_source_has_no_trio_import(module: str) -> None:
    tree = ast.parse((PACKAGE_DIR / f"{module.replace('.', '/')}.py").read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            # A relative import must stay inside the core.
            assert node.level == 1, f"{module} imports {'.' * node.level}{node.module}"
    assert not imported & {"trio", "anyio", "asyncio", "socket", "ssl", "select"}
