"""Fixtures for the adversarial tests: the listeners of one installation, in-process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.services import Stack, listeners


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """MSA, MTA (public and internal) and MDA with the default limits; no queue manager."""
    with listeners(tmp_path / "mailroom") as stack:
        yield stack
