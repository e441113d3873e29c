"""Shared fixtures: a fresh installation per test, and the same installation running."""

from __future__ import annotations

import asyncio
import logging
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


@pytest.fixture
def log_setup_undone() -> Iterator[None]:
    """For a test that calls common.log.setup: the handler it installs writes to the
    sys.stderr of that moment, pytest's capture of this test, which is closed after
    it; a later test's log line through it would fail.  So it goes at the end."""
    root = logging.getLogger()
    before, level = set(root.handlers), root.level
    yield
    for handler in root.handlers[:]:
        if handler not in before:
            root.removeHandler(handler)
            handler.close()  # a log file's; a stream handler leaves its stream open
    root.setLevel(level)
