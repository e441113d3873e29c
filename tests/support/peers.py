"""Locate the real peer programs (Postfix, Dovecot, swaks, ...) that interop tests use.

The peers come from Debian packages installed by `.ci/install-peers`. A missing peer is
a broken test environment, not an optional feature, so `require` fails the test
instead of skipping it: a skipped interop suite would look green while proving nothing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import stat
import time
from pathlib import Path

import pytest

from .ports import free_port as free_port

# Several peer programs live outside a non-root PATH (sbin) or in a private
# directory of their package, so search those too.
_EXTRA_DIRS = (
    "/usr/local/sbin",
    "/usr/sbin",
    "/sbin",
    "/usr/lib/postfix/sbin",
    "/usr/lib/dovecot",
)

INSTALL_HINT = "run `sudo .ci/install-peers` (from the repository root) to install the test peers"


def find(binary_name: str) -> str | None:
    """Return the absolute path of a peer program, or None when it is not installed."""
    path = os.pathsep.join([os.environ.get("PATH", ""), *_EXTRA_DIRS])
    return shutil.which(binary_name, path=path)


def require(binary_name: str) -> str:
    """Return the path of a peer program; fail the calling test if it is missing."""
    found = find(binary_name)
    if found is None:
        pytest.fail(f"peer program {binary_name!r} not found; {INSTALL_HINT}", pytrace=False)
    return found


def require_root(what: str) -> None:
    """Fail (not skip) when a peer that only runs as root is asked for by a non-root run."""
    if os.geteuid() != 0:
        pytest.fail(f"{what} must run as root (CI runs the interop suite as root)", pytrace=False)


def wait_for_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
    """Block until something accepts TCP connections on host:port, or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s") from None
            time.sleep(0.05)


def make_searchable(path: Path) -> None:
    """Add search permission (x, not read) for others on `path` and all its ancestors.

    Peer daemons drop root for an unprivileged user (postfix, mail) and then open
    their files by absolute path, but pytest's tmp_path sits under root-only 0700
    directories. Search permission lets them open paths they already know without
    listing anything; pytest tightens its base directory again at each session start.
    """
    for p in (path, *path.parents):
        mode = p.stat().st_mode
        if not mode & stat.S_IXOTH:
            p.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def session_members(sid: int) -> list[int]:
    """Pids of live (non-zombie) processes whose session id is `sid`, read from /proc."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command name: state ppid pgrp session ...
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[3]) == sid and fields[0] != "Z":
            members.append(int(entry))
    return members


def reap_session(sid: int, timeout: float) -> None:
    """Wait up to `timeout` for session `sid` to empty, then SIGKILL what is left.

    A daemon that calls setsid() (Postfix master), or one we start with
    start_new_session=True (Dovecot), has its pid as session id, and so do all its
    children: this finds exactly that instance's processes, never another's.
    """
    deadline = time.monotonic() + timeout
    while session_members(sid) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in session_members(sid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
