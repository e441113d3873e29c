"""Counters a daemon keeps in memory and saves to a small file for the web program's /metrics.

For what no table records and must not cost a database write: a failed login or
a new connection is an attacker's cheapest move, so counting it is a dict
increment here, and the daemon skeleton (common/daemon.py) writes the whole set
every few seconds and at shutdown to `<run_dir>/metrics/<program>.json`
(a temporary file renamed over the old one, so a reader never sees half a file).
A daemon starts from the values its file holds: the counters carry on across a
restart rather than reset.

Knows nothing about mail: a counter is a name, a few labels and a number.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

log = logging.getLogger("counters")

SAVE_EVERY = 5.0  # seconds between saves while the daemon runs

Labels = tuple[tuple[str, str], ...]

# What the daemons count (the web program names the Prometheus series after them).
LOGIN_FAILURES = "login_failures"  # labels: listener
CONNECTIONS = "connections"  # labels: listener, result (accepted | refused)
TLS_OUT = "tls_out"  # labels: hop, tls (yes | no): messages handed to a remote host
STRESS = "stress"  # labels: listener: times it entered stress mode (common/smtp/admission.py)


class Counters:
    """Named counters with labels; safe to bump from the event loop and from threads."""

    def __init__(self) -> None:
        self._values: dict[tuple[str, Labels], float] = {}
        self._lock = threading.Lock()
        self.changes = 0  # bumped by every count: an idle daemon's file is not rewritten

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount
            self.changes += 1

    def value(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._values.get((name, tuple(sorted(labels.items()))), 0.0)

    def entries(self) -> list[dict[str, Any]]:
        with self._lock:
            items = sorted(self._values.items())
        return [{"name": name, "labels": dict(labels), "value": value} for (name, labels), value in items]

    def clear(self) -> None:
        with self._lock:
            self._values.clear()

    def load(self, path: Path) -> None:
        """Carry on from the values saved in `path` (nothing if there is no such file)."""
        for entry in read(path):
            self.inc(entry["name"], entry["value"], **entry["labels"])

    def save(self, path: Path) -> None:
        """Write every counter to `path` at once: a temporary file, then a rename."""
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "counters": self.entries()}) + "\n")
        os.replace(tmp, path)


# The counters of this process.
COUNTERS = Counters()


def inc(name: str, **labels: str) -> None:
    """Count one `name` in this process (the one call the daemons make)."""
    COUNTERS.inc(name, 1.0, **labels)


def read(path: Path) -> list[dict[str, Any]]:
    """The entries saved in `path` ([] when it is missing or unreadable: metrics never stop a daemon)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        log.warning("cannot read counters from %s: %s", path, exc)
        return []
    found: list[dict[str, Any]] = []
    for entry in data.get("counters", []) if isinstance(data, dict) else []:
        try:
            labels = {str(k): str(v) for k, v in entry["labels"].items()}
            found.append({"name": str(entry["name"]), "labels": labels, "value": float(entry["value"])})
        except (KeyError, TypeError, ValueError, AttributeError):
            continue
    return found


def _save_quietly(counters: Counters, path: Path) -> None:
    try:
        counters.save(path)
    except OSError as exc:
        log.warning("cannot save counters to %s: %s", path, exc)


async def keep_saved(path: Path, every: float = SAVE_EVERY, counters: Counters = COUNTERS) -> None:
    """Save `counters` to `path` every `every` seconds until cancelled, then once more."""
    saved = -1
    try:
        while True:
            await asyncio.sleep(every)
            if counters.changes != saved:
                saved = counters.changes
                _save_quietly(counters, path)
    finally:
        _save_quietly(counters, path)


@contextlib.asynccontextmanager
async def saved(path: Path, every: float = SAVE_EVERY, counters: Counters = COUNTERS) -> AsyncIterator[Counters]:
    """While the block runs, the counters (first loaded from `path`) are saved to it."""
    counters.load(path)
    task = asyncio.create_task(keep_saved(path, every, counters))
    try:
        yield counters
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
