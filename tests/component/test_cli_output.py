"""What the operator's command prints: outside text made harmless, secrets hidden, pipes closed early.

A sender, a remote server's reply or a client's HELO name can carry terminal
escape sequences; every command shows them escaped (ESC as `\\x1b`), in text
and in tables, while --json output stays JSON that round-trips the raw value.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import pytest

from cli.show import public_config
from common import config as configmod
from common.models import add_event
from mta import queue
from tests.harness.users import add_user
from tests.support.suite import Installation

pytestmark = pytest.mark.timeout(90)

REPO = Path(__file__).resolve().parents[2]
ESC_TITLE = "\x1b]0;owned\x07"  # sets the terminal's window title
ESC_CLEAR = "\x1b[2J"  # clears the screen
EVIL_SENDER = f"eve{ESC_TITLE}@evil.test"
EVIL_RCPT = f"x{ESC_CLEAR}@remote.test"
EVIL_REPLY = f"451 4.3.0 try later{ESC_CLEAR}\x9b31m"
EVIL_HELO = f"helo=evil{ESC_TITLE}\x00\r\nforged line"


def _enqueue(inst: Installation, sender: str, recipients: list[str], reply: str = "") -> str:
    from common.log import new_trace_id

    trace = new_trace_id()
    db = inst.db()
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    with db.write() as s:
        add_event(s, trace, "mta", "received", detail=f"smtp from 192.0.2.1 {EVIL_HELO}", time=now)
        queue.enqueue(s, trace=trace, sender=sender, body=b"Subject: hi\r\n\r\nhello\r\n", now=now,
                      recipients=[queue.QueuedRecipient(r, r) for r in recipients])
        if reply:
            from sqlalchemy import update

            from common.models import Recipient

            s.execute(update(Recipient).where(Recipient.message_id == trace).values(last_reply=reply))
        s.commit()
    db.close()
    return trace


def _no_raw_controls(text: str) -> None:
    raw = [c for c in text if (ord(c) < 0x20 and c not in "\n") or 0x7F <= ord(c) <= 0x9F]
    assert raw == [], f"raw control characters reached the terminal: {raw!r}\n{text}"


def test_queue_and_trace_show_control_characters_escaped(installation: Installation) -> None:
    trace = _enqueue(installation, EVIL_SENDER, [EVIL_RCPT], EVIL_REPLY)
    for args in (("queue",), ("queue", "show", trace), ("trace", trace)):
        r = installation.cli(*args)
        assert r.returncode == 0, r.stderr
        _no_raw_controls(r.stdout)
        assert "\\x1b" in r.stdout, r.stdout
    listing = installation.cli("queue").stdout
    assert "eve\\x1b]0;owned\\x07@evil.test" in listing
    assert "try later\\x1b[2J\\x9b31m" in listing
    shown = installation.cli("trace", trace).stdout
    assert "helo=evil\\x1b]0;owned\\x07\\x00\\x0d\\x0aforged line" in shown
    # No line of the timeline starts with text the client chose.
    assert not any(line.startswith("forged line") for line in shown.splitlines())


def test_json_output_stays_json_with_the_raw_values(installation: Installation) -> None:
    trace = _enqueue(installation, EVIL_SENDER, [EVIL_RCPT], EVIL_REPLY)
    items = json.loads(installation.cli("queue", "--json").stdout)
    assert items[0]["sender"] == EVIL_SENDER
    assert items[0]["recipients"][0]["last_reply"] == EVIL_REPLY
    found = json.loads(installation.cli("trace", trace, "--json").stdout)
    assert any(EVIL_HELO in e["detail"] for e in found["events"])


def test_user_and_alias_lists_show_control_characters_escaped(installation: Installation) -> None:
    evil_user = "m\x1b[8mallory@example.org"  # \x1b[8m hides what follows
    add_user(installation, evil_user)
    r = installation.cli("alias", "add", "h\x1b[8mr@example.org", "alice@example.org", f"out{ESC_CLEAR}@remote.test")
    assert r.returncode == 0, r.stderr
    _no_raw_controls(r.stdout)
    for args in (("user", "list"), ("alias", "list")):
        r = installation.cli(*args)
        assert r.returncode == 0, r.stderr
        _no_raw_controls(r.stdout)
        assert "\\x1b[8m" in r.stdout
    assert "out\\x1b[2j@remote.test" in installation.cli("alias", "list").stdout  # targets are lowercased
    r = installation.cli("user", "del", evil_user)
    _no_raw_controls(r.stdout + r.stderr)
    r = installation.cli("trace", "NO\x1b[2JSUCH")
    assert r.returncode == 1
    _no_raw_controls(r.stderr)


def test_config_show_hides_secrets(installation: Installation) -> None:
    installation.set("mta", "relayhost", '"127.0.0.1:2626"')
    installation.set("mta", "relayhost_username", '"relayuser"')
    installation.set("mta", "relayhost_password", '"hunter2-very-secret"')
    text = installation.cli("config", "show")
    assert text.returncode == 0, text.stderr
    assert "hunter2" not in text.stdout
    assert 'mta.relayhost_password = "********"' in text.stdout
    assert 'mta.relayhost_username = "relayuser"' in text.stdout
    r = installation.cli("config", "show", "--json")
    assert "hunter2" not in r.stdout
    data = json.loads(r.stdout)
    assert data["mta"]["relayhost_password"] == "********"
    assert data["mta"]["relayhost_tls_verify"] is True


def test_the_password_in_a_database_url_is_hidden(tmp_path: Path) -> None:
    raw = {"mailroom": {"domains": ["example.org"],
                        "database": "postgresql+psycopg://mail:pa55w0rd@db.example.org/mailroom"}}
    cfg = configmod.from_dict(raw, tmp_path / "mailroom.toml")
    shown = public_config(cfg)
    assert shown["mailroom"]["database"] == "postgresql+psycopg://mail:********@db.example.org/mailroom"
    assert cfg.mailroom.database.endswith("pa55w0rd@db.example.org/mailroom")  # the config itself is untouched


def test_every_credential_in_a_database_url_is_hidden(tmp_path: Path) -> None:
    """libpq takes the password as a query parameter too (and sslpassword, the key's passphrase)."""
    url = ("postgresql+psycopg://mail@db.example.org/mailroom?sslmode=verify-full&password=pa55w0rd"
           "&sslpassword=k3yphrase&application_name=mailroom")
    conf = tmp_path / "mailroom.toml"
    conf.write_text(f'[mailroom]\ndomains = ["example.org"]\ndatabase = "{url}"\n')
    for args in (("config", "show"), ("config", "show", "--json")):
        r = subprocess.run([sys.executable, "-m", "cli.main", "--config", str(conf), *args],
                           capture_output=True, text=True, cwd=REPO, timeout=60)
        assert r.returncode == 0, r.stderr
        assert "pa55w0rd" not in r.stdout and "k3yphrase" not in r.stdout, r.stdout
        assert ("postgresql+psycopg://mail@db.example.org/mailroom?sslmode=verify-full&password=********"
                "&sslpassword=********&application_name=mailroom") in r.stdout
    # Both forms at once, and a password holding an @ and a /.
    raw = {"mailroom": {"domains": ["example.org"],
                        "database": "postgresql+psycopg://mail:p@ss/w0rd@db/mr?password=again"}}
    shown = public_config(configmod.from_dict(raw, tmp_path / "other.toml"))
    assert shown["mailroom"]["database"] == "postgresql+psycopg://mail:********@db/mr?password=********"


# --- a reader that goes away -------------------------------------------------------------------------


def _closed_pipe_run(inst: Installation, *args: str) -> subprocess.CompletedProcess[bytes]:
    """Run a command whose stdout is a pipe nobody reads: its read end is closed at once."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "--config", str(inst.config_path), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    with proc.stderr:
        err = proc.stderr.read()
    proc.wait(60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, b"", err)


def test_every_printing_command_ends_quietly_on_a_closed_pipe(installation: Installation) -> None:
    trace = _enqueue(installation, "a@remote.test", ["b@remote.test"])
    installation.cli("alias", "add", "sales@example.org", "alice@example.org")
    commands = [
        ("queue",), ("queue", "--json"), ("queue", "show", trace), ("trace", trace), ("trace", trace, "--json"),
        ("user", "list"), ("alias", "list"), ("config", "show"), ("config", "show", "--json"),
        ("status",),  # supervisorctl's own output (here: that supervisord is not running)
    ]
    for args in commands:
        r = _closed_pipe_run(installation, *args)
        assert b"Traceback" not in r.stderr and b"BrokenPipe" not in r.stderr, (args, r.stderr.decode())
        assert r.stderr == b"", (args, r.stderr.decode())


def test_queue_piped_into_head_ends_quietly(installation: Installation) -> None:
    # Enough queued mail that the listing is far larger than a pipe's buffer.
    _enqueue(installation, "a@remote.test", [f"rcpt{i:05d}@remote.test" for i in range(3000)])
    r = subprocess.run(
        f"{sys.executable} -m cli.main --config {installation.config_path} queue | head -n 2",
        shell=True, capture_output=True, text=True, cwd=REPO, timeout=60,
    )
    assert len(r.stdout.splitlines()) == 2
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr
    assert r.stderr == ""
