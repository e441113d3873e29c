"""The project's own source read as syntax trees: which module imports what.

For the tests of the project's layers (tests/unit/test_layers.py,
test_engine_boundaries.py) and of the tests' own layout (test_test_layout.py).
Nothing is imported to find out: each file is parsed with `ast`.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def imported_modules(path: Path) -> set[str]:
    """The absolute module names a file imports, at the top or inside a function alike
    (`from a.b import c` gives a.b and a.b.c: c may be a module)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def imported_packages(package: str) -> dict[str, set[str]]:
    """Each file of `package` (its path from the root) and the top-level packages it imports."""
    return {
        str(path.relative_to(ROOT)): {name.split(".")[0] for name in imported_modules(path)}
        for path in (ROOT / package).rglob("*.py")
    }
