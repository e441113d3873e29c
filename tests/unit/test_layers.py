"""The architecture's one hard rule: the processes meet only on the wire and in the database.

common/ never imports a daemon, and no daemon imports another.  (The `mailroom`
command may use any of them.)
"""

from __future__ import annotations

import pytest

from tests.support.source import ROOT, imported_modules, imported_packages

DAEMONS = ("msa", "mta", "mda", "web", "lab")


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
    return {name: {n for n in imported_modules(path) if n in modules and n != name} for name, path in modules.items()}


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
