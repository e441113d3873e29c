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
