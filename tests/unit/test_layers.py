"""The architecture's one hard rule: the processes meet only on the wire and in the database.

common/ never imports a daemon, and no daemon imports another.  (The `mailroom`
command may use any of them.)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DAEMONS = ("msa", "mta", "mda", "web", "lab")


def imported_packages(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


def test_common_imports_no_daemon() -> None:
    bad = {f: n & set(DAEMONS) for f, n in imported_packages("common").items() if n & set(DAEMONS)}
    assert bad == {}


@pytest.mark.parametrize("daemon", DAEMONS)
def test_daemons_do_not_import_each_other(daemon: str) -> None:
    others = set(DAEMONS) - {daemon}
    bad = {f: n & others for f, n in imported_packages(daemon).items() if n & others}
    assert bad == {}


def _module_imports(package: str) -> dict[str, set[str]]:
    """Each module of `package` ("web.live") and the modules of the package it imports,
    at the top or inside a function alike."""
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts): p for p in (ROOT / package).rglob("*.py")}
    found: dict[str, set[str]] = {}
    for name, path in modules.items():
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
                names.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
        found[name] = {n for n in names if n in modules and n != name}
    return found


# The packages whose modules import one another in one direction only, so each
# can be read after the ones it uses.
@pytest.mark.parametrize("package", ["msa", "mda", "web", "lab"])
def test_no_two_modules_import_each_other(package: str) -> None:
    graph = _module_imports(package)
    circles = []
    for start in graph:  # a walk from each module back to itself
        stack, seen = [(start, (start,))], set()
        while stack:
            name, path = stack.pop()
            for nxt in graph[name]:
                if nxt == start:
                    circles.append(" -> ".join((*path, start)))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, (*path, nxt)))
    assert circles == []
