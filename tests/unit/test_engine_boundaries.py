"""The SMTP engine is our own: no project module imports aiosmtpd (it stays a test-only
reference and peer), and every runtime dependency is pinned to a tested range."""

from __future__ import annotations

import re
import tomllib

import pytest

from tests.support.source import ROOT, imported_packages


@pytest.mark.parametrize("package", ["common", "msa", "mta", "mda", "cli"])
def test_no_project_module_imports_aiosmtpd(package: str) -> None:
    bad = [f for f, names in imported_packages(package).items() if "aiosmtpd" in names]
    assert bad == []


def test_every_runtime_dependency_has_a_tested_range() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + project["optional-dependencies"]["postgresql"]
    unbounded = [d for d in deps if not (re.search(r">=\s*[\d.]+", d) and re.search(r"<\s*[\d.]+", d))]
    assert unbounded == []
    assert not [d for d in project["dependencies"] if d.lower().startswith("aiosmtpd")]
