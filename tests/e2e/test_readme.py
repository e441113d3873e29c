"""The README works as written: its commands exist, and its first message arrives.

The snippets of "A first message" are read from README.md and run as they are
(bash for the shell blocks, Python for the Python ones) against a running
suite made the way the README's install steps make one (`mailroom init`, no
users yet).  Only the ports change: the README shows the development ports,
and tests take free ones.  The install block itself (a venv, `pip install .`)
is what tests/e2e/test_installed_package.py does with a wheel.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.main import build_parser
from tests.support import peers
from tests.support.suite import Installation, maildir_messages, mbox_messages, running

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
EXAMPLE_ID = "019A3F2C4B1D2E3F4A"


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end != -1 else None]


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```$", text, re.M | re.S)


def test_the_readme_opens_with_make_run_and_make_test() -> None:
    first = blocks(README, "sh")[0].splitlines()
    assert first[0].startswith("make run ") and first[1].startswith("make test ")
    assert README.index("```sh\nmake run") < README.index("\n## ")


def test_the_command_list_names_every_command_there_is() -> None:
    listed = re.search(r"^`mailroom ([a-z| \[\]-]+)`$", section("The operator's command"), re.M)
    assert listed, section("The operator's command")
    named = {part.split()[0] for part in listed.group(1).split("|")}
    commands = {a.dest for a in build_parser()._subparsers._group_actions}  # type: ignore[union-attr]
    assert commands == {"command"}
    choices = set(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    assert named == choices, f"README lists {sorted(named - choices)} that do not exist, " \
                             f"leaves out {sorted(choices - named)}"
    assert {"dkim", "dns"} <= named


def test_the_install_steps_parse_as_commands_of_the_installed_mailroom() -> None:
    steps = [line.split("#")[0].strip() for line in blocks(section("Installed with pip"), "sh")[0].splitlines()]
    commands = [line for line in steps if line.startswith("mailroom ")]
    assert [c.split()[1] for c in commands] == ["init", "run"]
    for command in commands:
        build_parser().parse_args(command.split()[1:])  # exits (fails the test) on an unknown option
    assert "--domain example.org" in commands[0]


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[Installation]:
    """An installation as `mailroom init` leaves it (no users), running."""
    yield from running(Installation(tmp_path / "mailroom"))


def _ports(inst: Installation, text: str) -> str:
    for default, key in (("2587", "submission"), ("2993", "imaps")):
        text = text.replace(f"127.0.0.1:{default}", f"127.0.0.1:{inst.ports[key]}")
        text = re.sub(rf'"127\.0\.0\.1", {default}\b', f'"127.0.0.1", {inst.ports[key]}', text)
    return text


def _bash(inst: Installation, script: str, stdin: str = "") -> str:
    env = {**os.environ, "MAILROOM_CONFIG": str(inst.config_path),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    r = subprocess.run(["bash", "-e", "-c", _ports(inst, script)], input=stdin, capture_output=True, text=True,
                       env=env, cwd=inst.root, timeout=120)
    assert r.returncode == 0, f"{script}\n--- exit {r.returncode} ---\n{r.stdout}\n{r.stderr}"
    return r.stdout


def _python(inst: Installation, code: str) -> str:
    r = subprocess.run([sys.executable, "-c", _ports(inst, code)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"{code}\n--- exit {r.returncode} ---\n{r.stdout}\n{r.stderr}"
    return r.stdout


def test_a_first_message_as_the_readme_sends_it(fresh: Installation) -> None:
    peers.require("swaks")
    inst = fresh
    first = section("A first message")
    setup, swaks, find = blocks(first, "sh")
    smtplib_snippet, imap_snippet = blocks(first, "python")
    password = re.search(r"printf '%s\\n' '([^']+)' \| mailroom user add bob", setup)
    assert password, setup

    # The users: alice's password piped into the command that would ask for it, bob's with --password-stdin.
    out = _bash(inst, setup, stdin=password.group(1) + "\n")
    assert "added alice@example.org (maildir" in out and "added bob@example.org (mbox" in out, out
    for program in ("msa", "mta", "qmgr", "mda", "web"):
        assert re.search(rf"^{program}\s+RUNNING", out, re.M), out

    assert "queued as" in _bash(inst, swaks)
    printed = _python(inst, smtplib_snippet)
    queued = re.fullmatch(r"250 2\.0\.0 Ok: queued as ([0-9A-F]{18})\n", printed)
    assert queued, printed  # the line the README promises, not smtplib's {}
    trace = queued.group(1)

    alice = inst.config.mail_root / "example.org" / "alice"
    bob = inst.config.mail_root / "example.org" / "bob.mbox"
    inst.wait_for(lambda: len(maildir_messages(alice)) == 2 and len(mbox_messages(bob)) == 2,
                  what="both messages in both mailboxes")
    inst.wait_for(lambda: trace in inst.log("qmgr"), timeout=10, what="the queue manager's lines")

    out = _bash(inst, find.replace(EXAMPLE_ID, trace))
    assert "Hello Bob" in out and "This is a test mailing" in out  # bob's mbox: smtplib's and swaks's
    assert all(p.name in out for p in maildir_messages(alice))  # alice's new/ is listed
    assert f"trace {trace}" in out and '"hop": "mda"' in out
    assert re.search(rf"log/mta\.log:.* mta\[\d+\] {trace}: queued from=<alice@example.org>", out), out

    if "imaps" in inst.ports and (inst.config.run_dir / "dovecot.conf").exists():
        fetched = _python(inst, imap_snippet)
        assert fetched.startswith("Return-Path: <alice@example.org>\n"), fetched
        assert "Delivered-To: bob@example.org" in fetched and "This is a test mailing" in fetched  # swaks's, first
