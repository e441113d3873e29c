"""docs/architecture.md's code map names every module, so a newcomer finds each file's purpose there.

A module added without a line in the map fails here; the migrations are listed
by alembic itself and are left out.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("common", "msa", "mta", "mda", "cli", "web", "lab")


def test_the_code_map_names_every_module() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    unnamed = [
        str(path.relative_to(ROOT))
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        if not path.name.startswith("__") and "migrations" not in path.parts and path.name not in text
    ]
    assert unnamed == []
