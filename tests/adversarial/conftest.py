"""Fixtures for the adversarial tests: the listeners of one installation, in-process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.adversarial.stack import Stack, running


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """MSA, MTA (public and internal) and MDA with the default limits; no queue manager."""
    yield from running(tmp_path / "mailroom")
