"""Shared fixtures: a fresh installation per test, and the same installation running."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.users import add_user
from tests.support.suite import Installation, running


def pytest_configure(config: pytest.Config) -> None:
    # The daemons' processes run on uvloop unless MAILROOM_EVENT_LOOP=asyncio;
    # MAILROOM_EVENT_LOOP=uvloop puts the in-process tests' loops on it as well.
    if os.environ.get("MAILROOM_EVENT_LOOP") == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


@pytest.fixture
def installation(tmp_path: Path) -> Installation:
    """Initialised (config, database, certificate, alice=Maildir, bob=mbox); not running."""
    inst = Installation(tmp_path / "mailroom")
    add_user(inst, "alice@example.org", "maildir")
    add_user(inst, "bob@example.org", "mbox")
    return inst


@pytest.fixture
def suite(installation: Installation) -> Iterator[Installation]:
    """The installation with all four daemons running under supervisord."""
    yield from running(installation)
