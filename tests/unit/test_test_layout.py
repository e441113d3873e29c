"""The tests' own layers: shared test code lives in tests/harness and tests/support, never in a test module.

A test module that imports another drags the other's fixtures and tests into
its own and hides what is shared.  tests/support (installations, real peers,
ports) is the ground the harness stands on, so it never imports the harness.
"""

from __future__ import annotations

from tests.support.source import ROOT, imported_modules

TESTS = ROOT / "tests"


def _module(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


def test_no_test_module_imports_another() -> None:
    test_modules = {_module(str(p.relative_to(ROOT))) for p in TESTS.rglob("test_*.py")}
    bad = {
        str(p.relative_to(ROOT)): sorted(imported_modules(p) & test_modules)
        for p in TESTS.rglob("test_*.py") if imported_modules(p) & test_modules
    }
    assert bad == {}



def test_support_does_not_import_the_harness() -> None:
    bad = {
        str(p.relative_to(ROOT)): sorted(n for n in imported_modules(p) if n.split(".")[:2] == ["tests", "harness"])
        for p in (TESTS / "support").rglob("*.py")
    }
    assert {f: names for f, names in bad.items() if names} == {}
