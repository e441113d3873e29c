"""Shared fixtures: a fresh installation per test, and the same installation running."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.suite import Installation, running


@pytest.fixture
def installation(tmp_path: Path) -> Installation:
    """Initialised (config, database, certificate, alice=Maildir, bob=mbox); not running."""
    inst = Installation(tmp_path / "mailroom")
    inst.add_user("alice@example.org", "maildir")
    inst.add_user("bob@example.org", "mbox")
    return inst


@pytest.fixture
def suite(installation: Installation) -> Iterator[Installation]:
    """The installation with all four daemons running under supervisord."""
    yield from running(installation)
