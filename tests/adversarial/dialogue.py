"""Dialogue scripts live in tests/harness/client.py; this name stays for tests that import them from here."""

from __future__ import annotations

from tests.harness.client import CLOSED, STARTTLS_HANDSHAKE, Expect, Step, line, play, run
from tests.harness.client import Client as Session

__all__ = ["CLOSED", "STARTTLS_HANDSHAKE", "Expect", "Session", "Step", "line", "play", "run"]
