"""Checks that a triomail module is sans-IO: it loads no trio and imports no I/O module.

``import triomail._sink.commands`` would run triomail/__init__.py, which imports the trio
layer. So :func:`probe` registers, in a fresh interpreter, a bare package object with
the same ``__path__`` and imports the modules through it: only their own imports run.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import triomail

PACKAGE_DIR = Path(triomail.__file__).parent

#: Top-level modules a sans-IO module must not import.
IO_MODULES = frozenset({"trio", "anyio", "asyncio", "socket", "ssl", "select"})

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


def probe(modules: list[str]) -> str:
    """Import ``triomail.<module>`` for each name alone; return the trio modules loaded."""
    code = _PROBE.format(path=str(PACKAGE_DIR), modules=modules)
    done = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def absolute_imports(module: str) -> set[str]:
    """The top-level names ``triomail.<module>`` imports absolutely (any scope)."""
    path = PACKAGE_DIR / f"{module.replace('.', '/')}.py"
    imported: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module.split(".")[0])
    return imported
