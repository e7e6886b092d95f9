"""The sans-IO core never imports trio or any I/O module: it is usable from any I/O layer,
and every rule in it is testable with plain calls. Each module is probed alone, in a fresh
interpreter (``helpers.sans_io``), and its source is read for I/O imports."""

from __future__ import annotations

import ast

import pytest
from helpers.sans_io import IO_MODULES, PACKAGE_DIR, absolute_imports, probe

CORE = sorted(f"_core.{p.stem}" for p in (PACKAGE_DIR / "_core").glob("[!_]*.py"))


def test_core_modules_do_not_import_trio() -> None:
    assert probe(CORE) == ""


@pytest.mark.parametrize("module", CORE)
def test_each_core_module_alone_does_not_import_trio(module: str) -> None:
    assert probe([module]) == ""


def test_probe_detects_trio() -> None:
    """The probe can fail: the trio layer does import trio."""
    assert "trio" in probe(["_client.transport"]).split(",")


@pytest.mark.parametrize("module", CORE)
def test_core_module_source_has_no_io_import(module: str) -> None:
    assert not absolute_imports(module) & IO_MODULES


@pytest.mark.parametrize("module", CORE)
def test_core_imports_stay_inside_the_core(module: str) -> None:
    tree = ast.parse((PACKAGE_DIR / f"{module.replace('.', '/')}.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            assert node.level == 1, f"{module} imports {'.' * node.level}{node.module}"
