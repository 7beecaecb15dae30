"""Modules talk through public names: no module of the package imports another's underscored
names, or reaches into an object's underscored attributes other than its own (``self``, ``cls``).

A private name is free to change with its module; one used from elsewhere is a public interface
that does not say so (the query engine's pipeline was once called piecemeal through five private
methods from another module)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = ("attribdb", "indexer", "query")  # installed as attribdb, attribdb.indexer, attribdb.query
SOURCES = sorted(path for folder in PACKAGE_DIRS for path in (ROOT / folder).rglob("*.py"))


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def crossings(source: str) -> list[str]:
    """Each place ``source`` uses another module's private name: ``line: what``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            found += [f"{node.lineno}: from {node.module} import {a.name}" for a in node.names if _private(a.name)]
            if node.module and any(_private(part) for part in node.module.split(".")):
                found.append(f"{node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Import):
            found += [f"{node.lineno}: import {a.name}" for a in node.names
                      if any(_private(part) for part in a.name.split("."))]
        elif isinstance(node, ast.Attribute) and _private(node.attr):
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_the_check_finds_each_kind_of_crossing():
    assert ROOT / "query" / "engine.py" in SOURCES and ROOT / "attribdb" / "api.py" in SOURCES
    source = ("from attribdb.query.engine import Query, _Clock\nimport attribdb._private\n"
              "from attribdb.query._hidden import x\nengine._rescore(row)\nself._fine()\ncls._also_fine\n"
              "obj.__dict__\n")
    assert crossings(source) == ["1: from attribdb.query.engine import _Clock", "2: import attribdb._private",
                                 "3: from attribdb.query._hidden import ...", "4: engine._rescore"]


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: str(path.relative_to(ROOT)))
def test_no_module_uses_another_modules_private_names(path):
    assert crossings(path.read_text(encoding="utf-8")) == [], f"{path.relative_to(ROOT)} uses private names"
