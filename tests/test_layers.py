"""Imports run one way, down the data flow, and the module graph has no cycle.

``_cli → _bulk → triomail (the public API) → _pool → _client → _core``; the capture
server (``_sink``) stands alone so that it can judge the client; ``triomail send --sink``
reaches it through its public face, ``triomail.testing``. Every import counts,
including those under ``TYPE_CHECKING`` and those inside functions: a type-only cycle
is still a cycle for a reader.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

import triomail

PACKAGE = Path(triomail.__file__).parent

#: Which layers each layer may import (its own included).
ALLOWED = {
    "core": {"core"},
    "client": {"client", "core"},
    "pool": {"pool", "client", "core"},
    "api": {"api", "pool", "client", "core", "public"},
    "bulk": {"bulk", "api", "pool", "client", "core", "testing"},
    "cli": {"cli", "bulk", "sink", "web"},
    "sink": {"sink"},
    "testing": {"sink", "public", "web"},
    "web": {"web", "testing"},
    "public": set(),
}


#: Single imports allowed across the rules: ``triomail sink --web`` reaches the web view
#: (which sits above the sink) from the sink's command line, inside functions only.
EXCEPTIONS = {("triomail._sink.cli", "triomail._web.cli")}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "api"
    return {
        "_core": "core",
        "_client": "client",
        "_pool": "pool",
        "_bulk": "bulk",
        "_sink": "sink",
        "_web": "web",
        "_cli": "cli",
        "__main__": "cli",
        "testing": "testing",
        "pytest_plugin": "testing",
        "_public": "public",
    }[parts[1]]


def imports(module: str) -> Iterator[tuple[int, str]]:
    """(line, imported triomail module) for every import in ``module``."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "triomail":
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            elif node.module and node.module.split(".")[0] == "triomail":
                target = node.module
            else:
                continue
            for alias in node.names:
                # ``from . import send`` imports a module; ``from .x import y`` a name.
                candidate = f"{target}.{alias.name}"
                yield node.lineno, candidate if candidate in MODULES else target


def test_the_walk_finds_every_subpackage() -> None:
    layers = {layer(m) for m in MODULES}
    assert layers == set(ALLOWED)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_the_data_flow(module: str) -> None:
    mine = layer(module)
    wrong = [
        f"line {line}: {module} ({mine}) imports {target} ({layer(target)})"
        for line, target in imports(module)
        if layer(target) not in ALLOWED[mine] | {mine} and (module, target) not in EXCEPTIONS
    ]
    assert not wrong, "\n".join(wrong)


def test_the_module_graph_has_no_cycle() -> None:
    graph = {m: {t for _, t in imports(m) if t != m and t in MODULES} for m in MODULES}
    # A package imports its own modules to re-export them; that is not a cycle.
    for m in graph:
        graph[m] = {t for t in graph[m] if not m.startswith(t + ".") or t == "triomail"}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_checks_can_fail() -> None:
    """The walker sees a relative import inside a function, and the rules reject it."""
    found = {t: line for line, t in imports("triomail._cli")}
    assert "triomail._bulk.command" in found
    assert "bulk" not in ALLOWED["client"]
