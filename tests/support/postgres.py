"""A throwaway PostgreSQL cluster on a loopback port, for the shared-database tests.

`PostgresServer(root)` runs `initdb` into a folder under `root`, starts the
cluster with `pg_ctl` as the `postgres` OS user (PostgreSQL refuses to run as
root), creates a database and a role that may connect without a password from
127.0.0.1 only, and stops the cluster again (`pg_ctl stop -m fast`, then any of
its processes still there is killed by pid).  `.url` is the SQLAlchemy URL
the `[mailroom] database` setting takes.

The binaries come from Debian's postgresql package (`.ci/install-peers`): a
missing one fails the test, it never skips.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

import pytest

from .peers import INSTALL_HINT, free_port, make_searchable, require_root, wait_for_port

OS_USER = "postgres"
ROLE = "mailroom"
DATABASE = "mailroom"


def _bin(name: str) -> str:
    """A server program from /usr/lib/postgresql/VERSION/bin (not on PATH on Debian)."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        pytest.fail(f"PostgreSQL program {name!r} not found; {INSTALL_HINT}", pytrace=False)
    return found[-1]  # the newest version when several are installed


def _as_postgres() -> None:
    """preexec_fn: drop root for the postgres user (initdb and postgres refuse root)."""
    entry = pwd.getpwnam(OS_USER)
    os.setgid(entry.pw_gid)
    os.initgroups(OS_USER, entry.pw_gid)
    os.setuid(entry.pw_uid)


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state is [0]), or None when gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return None if fields[0] == "Z" else fields


def _start_time(pid: int) -> str | None:
    fields = _stat(pid)
    return fields[19] if fields else None


def _children(pid: int) -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit() and (f := _stat(int(e))) and f[1] == str(pid)]


class PostgresServer:
    """A private PostgreSQL cluster under `root` (a context manager)."""

    def __init__(self, root: Path, *, settings: dict[str, str] | None = None) -> None:
        """`settings`: server settings beyond the defaults below (name -> value, as `-c name=value`)."""
        require_root("a throwaway PostgreSQL cluster (started as the postgres user)")
        self.settings = settings or {}
        self.initdb = _bin("initdb")
        self.pg_ctl = _bin("pg_ctl")
        self.psql = _bin("psql")
        self.root = Path(root) / "postgres"
        self.data = self.root / "data"
        self.sockets = self.root / "run"
        self.log = self.root / "server.log"
        self.port = free_port()
        self.url = f"postgresql+psycopg://{ROLE}@127.0.0.1:{self.port}/{DATABASE}"
        self.pid: int | None = None

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(args), capture_output=True, text=True, timeout=timeout, preexec_fn=_as_postgres,
            cwd=self.root, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"},
        )

    def _check(self, r: subprocess.CompletedProcess[str], what: str) -> None:
        if r.returncode != 0:
            log = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise AssertionError(f"{what} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}\n{log}")

    def start(self) -> PostgresServer:
        entry = pwd.getpwnam(OS_USER)
        self.root.mkdir(parents=True)
        self.sockets.mkdir()
        # The postgres user must reach its folder through pytest's 0700 tmp dirs.
        make_searchable(self.root)
        for path in (self.root, self.sockets):
            os.chown(path, entry.pw_uid, entry.pw_gid)
        self._check(self._run(
            self.initdb, "-D", str(self.data), "-U", OS_USER, "-E", "UTF8", "--locale=C.UTF-8",
            "--auth-local=trust", "--auth-host=reject", "--no-sync",
        ), "initdb")
        # Trust on 127.0.0.1 for the test role only; everything else is refused
        # (initdb's host lines above are `reject`, and nothing listens off loopback).
        hba = self.data / "pg_hba.conf"
        hba.write_text(
            "local all all trust\n"
            f"host {DATABASE} {ROLE} 127.0.0.1/32 trust\n"
            "host all all 0.0.0.0/0 reject\n"
            "host all all ::/0 reject\n"
        )
        os.chown(hba, entry.pw_uid, entry.pw_gid)
        options = (f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 -c fsync=on"
                   " -c max_connections=200" + "".join(f" -c {k}={v}" for k, v in self.settings.items()))
        self._check(self._run(
            self.pg_ctl, "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "30", "start",
        ), "pg_ctl start")
        self.pid = int((self.data / "postmaster.pid").read_text().split()[0])
        wait_for_port(self.port, timeout=10)
        psql = [self.psql, "-h", str(self.sockets), "-p", str(self.port), "-U", OS_USER, "-v", "ON_ERROR_STOP=1",
                "-d", "postgres", "-c"]
        self._check(self._run(*psql, f"CREATE ROLE {ROLE} LOGIN"), "CREATE ROLE")
        self._check(self._run(*psql, f"CREATE DATABASE {DATABASE} OWNER {ROLE}"), "CREATE DATABASE")
        return self

    def stop(self) -> None:
        if self.pid is None:
            return
        pid, self.pid = self.pid, None
        # Every server process calls setsid(), so a session does not name the
        # cluster: remember the postmaster and its children (with their start
        # times, against pid reuse) and kill whichever of them outlives the stop.
        ours = {p: t for p in [pid, *_children(pid)] if (t := _start_time(p)) is not None}
        self._run(self.pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "-t", "20", "stop")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_start_time(p) == t for p, t in ours.items()):
            time.sleep(0.05)
        for p, t in ours.items():
            if _start_time(p) == t:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)

    def __enter__(self) -> PostgresServer:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
