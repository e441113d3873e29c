"""`mailroom user add|passwd|del|list`, run as the real command, checked against the running MSA."""

from __future__ import annotations

import fcntl
import os
import select
import sqlite3
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from common.models import User
from tests.harness.client import auth_plain, submission
from tests.harness.services import Stack, running
from tests.support.suite import PASSWORD, Installation

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def inst(tmp_path: Path) -> Installation:
    return Installation(tmp_path / "mailroom")


@pytest.fixture
def stack(inst: Installation) -> Iterator[Stack]:
    with running(inst, "msa") as s:
        yield s


def can_login(inst: Installation, user: str, password: str, source: str) -> bool:
    c = submission(inst, source=source)
    try:
        code, text = auth_plain(c, user, password)
    finally:
        c.close()
    assert code in (235, 535), text
    return code == 235


def stored_hash(inst: Installation, address: str) -> str:
    db = inst.db()
    try:
        with db.read() as s:
            user = s.query(User).filter_by(address=address).one()
            return user.password_hash
    finally:
        db.close()


def test_add_passwd_del_list(stack: Stack, inst: Installation) -> None:
    r = inst.cli("user", "add", "carol@example.org", "--password-stdin", stdin="first long secret phrase\n")
    assert r.returncode == 0, r.stderr
    assert stored_hash(inst, "carol@example.org").startswith("$argon2id$")
    # Not in any file of the installation (database, WAL, logs).  grep runs in its own
    # process: closing a descriptor of the database here would drop this process's
    # SQLite locks (POSIX lock semantics) under the MSA that runs in it.
    found = subprocess.run(["grep", "-rlF", "first long secret phrase", str(inst.root)], capture_output=True, text=True)
    assert found.returncode == 1, found.stdout
    assert can_login(inst, "carol@example.org", "first long secret phrase", "127.0.0.2")

    listed = inst.cli("user", "list")
    assert listed.returncode == 0 and listed.stdout.split()[0] == "carol@example.org"
    assert "argon2" not in listed.stdout

    r = inst.cli("user", "passwd", "carol@example.org", "--password-stdin", stdin="second long secret phrase\n")
    assert r.returncode == 0, r.stderr
    # The old one stops working.
    assert not can_login(inst, "carol@example.org", "first long secret phrase", "127.0.0.3")
    assert can_login(inst, "carol@example.org", "second long secret phrase", "127.0.0.4")

    r = inst.cli("user", "del", "carol@example.org")
    assert r.returncode == 0, r.stderr
    assert not can_login(inst, "carol@example.org", "second long secret phrase", "127.0.0.5")
    assert "carol@example.org" not in inst.cli("user", "list").stdout


def test_mistakes_are_refused_with_a_message(inst: Installation) -> None:
    assert inst.cli("user", "add", "dave@example.org", "--password-stdin", stdin=PASSWORD + "\n").returncode == 0
    cases = [
        (("user", "add", "dave@example.org", "--password-stdin"), "pw\n", "exists"),
        (("user", "add", "eve@elsewhere.test", "--password-stdin"), "pw\n", "not in a local domain"),
        (("user", "passwd", "nobody@example.org", "--password-stdin"), "pw\n", "no such user"),
        (("user", "del", "nobody@example.org"), None, "no such user"),
        (("user", "add", "erin@example.org", "--password-stdin"), "\n", "empty password"),
    ]
    for args, stdin, message in cases:
        r = inst.cli(*args, stdin=stdin)
        assert r.returncode != 0 and message in r.stderr, (args, r.stderr)
    assert "erin@" not in inst.cli("user", "list").stdout


@pytest.mark.parametrize(
    ("weak", "why"),
    [
        ("x", "too short: 1 character; at least 15"),
        ("fourteen chars", "too short: 14 characters"),
        ("Correct Horse Battery Staple", "a well-known password"),
        ("password1234567", "a well-known password"),
        ("123456789012345", "too predictable"),
        ("abcabcabcabcabcabc", "too predictable"),
        ("gina's long mail password", "it contains 'gina'"),
        ("a passphrase with example in it", "it contains 'example'"),
    ],
)
def test_a_weak_password_is_refused_by_add_and_passwd(stack: Stack, inst: Installation, weak: str, why: str) -> None:
    r = inst.cli("user", "add", "gina@example.org", "--password-stdin", stdin=weak + "\n")
    assert r.returncode == 1 and f"gina@example.org: password refused: {why}" in r.stderr, r.stderr
    assert "gina@" not in inst.cli("user", "list").stdout  # nothing was added
    r = inst.cli("user", "add", "gina@example.org", "--password-stdin", stdin=PASSWORD + "\n")
    assert r.returncode == 0, r.stderr
    before = stored_hash(inst, "gina@example.org")
    r = inst.cli("user", "passwd", "gina@example.org", "--password-stdin", stdin=weak + "\n")
    assert r.returncode == 1 and f"password refused: {why}" in r.stderr, r.stderr
    assert stored_hash(inst, "gina@example.org") == before  # the old password stays
    assert can_login(inst, "gina@example.org", PASSWORD, "127.0.0.6")
    assert not can_login(inst, "gina@example.org", weak, "127.0.0.7")


@pytest.mark.parametrize("option", ["--password", "-p", "--pass"])
def test_no_password_on_the_command_line(inst: Installation, option: str) -> None:
    r = inst.cli("user", "add", "frank@example.org", option, "secret", stdin="")
    assert r.returncode == 2 and "unrecognized arguments" in r.stderr
    assert "frank@" not in inst.cli("user", "list").stdout


def _set_controlling_tty() -> None:
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _run_on_a_terminal(
    inst: Installation, *args: str, typed: list[str], at_prompt: Callable[[], None] = lambda: None
) -> tuple[int, str]:
    """Run `mailroom ARGS` with a pseudo-terminal as its controlling terminal, typing `typed`.

    `at_prompt` runs while the command waits at its first prompt.
    """
    master, slave = os.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "--config", str(inst.config_path), *args],
        stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, preexec_fn=_set_controlling_tty,  # noqa: PLW1509
    )
    os.close(slave)
    seen = b""

    def wait_for(text: bytes) -> None:
        nonlocal seen
        deadline = time.monotonic() + 20
        while text not in seen and time.monotonic() < deadline:
            if select.select([master], [], [], 0.2)[0]:
                try:
                    seen += os.read(master, 1024)
                except OSError:
                    break
        assert text in seen, seen

    try:
        for prompt, line in zip((b"Password: ", b"Again: "), typed, strict=False):
            wait_for(prompt)
            if prompt == b"Password: ":
                at_prompt()
            seen = seen.replace(prompt, b"", 1)
            os.write(master, line.encode() + b"\n")
        code = proc.wait(30)
        while select.select([master], [], [], 0.1)[0]:
            try:
                chunk = os.read(master, 1024)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return code, seen.decode(errors="replace")


def test_password_from_the_prompt(stack: Stack, inst: Installation) -> None:
    def others_can_write() -> None:
        # While the operator types, the daemons must still be able to write.
        conn = sqlite3.connect(inst.root / "mailroom.db", timeout=1, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("COMMIT")
        finally:
            conn.close()

    typed = ["typed long secret", "typed long secret"]
    code, out = _run_on_a_terminal(inst, "user", "add", "grace@example.org", typed=typed, at_prompt=others_can_write)
    assert code == 0, out
    assert "typed long secret" not in out  # not echoed
    assert can_login(inst, "grace@example.org", "typed long secret", "127.0.0.6")

    code, out = _run_on_a_terminal(inst, "user", "passwd", "grace@example.org", typed=["one", "two"])
    assert code != 0 and "passwords differ" in out
    assert can_login(inst, "grace@example.org", "typed long secret", "127.0.0.7")  # unchanged
