"""The MSA's abuse limits, set to small values in the installation's config file.

Failed logins per client address (slowed, then 421 4.7.0 and locked out for
auth_lockout), messages and recipients per user per hour (451 4.7.1), and
connections per client address (421 4.7.0).  Loopback has a whole /8, so
different client addresses are 127.0.0.x source addresses.
"""

from __future__ import annotations

import base64
import time
from pathlib import Path

import pytest

from tests.harness.client import Client, auth_plain, logged_in, submission, submissions
from tests.harness.services import installation, running
from tests.support.suite import PASSWORD, Installation

pytestmark = pytest.mark.timeout(60)


def _inst(tmp_path: Path, **msa: str) -> Installation:
    return installation(tmp_path / "mailroom", users=(("alice@example.org", "maildir"), ("bob@example.org", "maildir")),
                        aliases={"sales@example.org": "alice@example.org", "info@example.org": "bob@example.org"},
                        msa=dict(msa))


def test_failed_logins_are_slowed_then_refused_with_421_and_locked_out(tmp_path: Path) -> None:
    inst = _inst(tmp_path, max_auth_failures="3", auth_failure_window='"10m"', auth_lockout='"3s"')
    with running(inst, "mta", "msa"):
        c = submission(inst, source="127.0.0.2")
        took = []
        for _ in range(2):
            start = time.monotonic()
            code, text = auth_plain(c, "alice@example.org", "guess")
            took.append(time.monotonic() - start)
            assert (code, text[:6]) == (535, b"5.7.8 "), text
        assert took[0] >= 0.45 and took[1] >= 0.95, took  # 0.5 s, then 1 s: slower each time
        raw_code, text = auth_plain(c, "alice@example.org", "guess")
        assert (raw_code, text[:6]) == (421, b"4.7.0 "), text
        with pytest.raises(OSError):  # smtplib.SMTPServerDisconnected is an OSError
            c.noop()  # the session is over
        c.close()
        locked_at = time.monotonic()

        # The address is now locked out, even with the right password.
        r = Client.connect(inst.ports["submission"], source="127.0.0.2")
        assert r.reply().text.startswith("421 4.7.0 ")
        assert r.closed()
        r.close()
        r = Client.connect(inst.ports["submissions"], tls=True, source="127.0.0.2")
        assert r.reply().text.startswith("421 4.7.0 ")
        r.close()
        # Other addresses are not.
        other = logged_in(inst, source="127.0.0.3")
        other.quit()

        # After auth_lockout the address may try again, and logs in.
        time.sleep(max(0.0, 3.2 - (time.monotonic() - locked_at)))
        again = logged_in(inst, source="127.0.0.2")
        again.quit()


def test_undecodable_credentials_count_as_failed_logins(tmp_path: Path) -> None:
    """Bad base64, or a PLAIN value that does not split, is a failed login: counted on
    /metrics and toward the lockout, so a guesser gets no free channel."""
    from common import counters

    def failures() -> float:
        return sum(e["value"] for e in counters.COUNTERS.entries() if e["name"] == counters.LOGIN_FAILURES)

    inst = _inst(tmp_path, max_auth_failures="3", auth_failure_window='"10m"', auth_lockout='"1h"')
    with running(inst, "mta", "msa"):
        before = failures()
        c = submission(inst, source="127.0.0.6")
        code, text = c.docmd("AUTH", "PLAIN not*base64!")
        assert (code, text[:6]) == (501, b"5.5.2 "), text
        assert failures() == before + 1
        code, text = c.docmd("AUTH", "PLAIN " + base64.b64encode(b"no separators here").decode())
        assert (code, text[:6]) == (501, b"5.5.2 "), text
        assert failures() == before + 2
        code, text = c.docmd("AUTH", "LOGIN")  # the username's challenge, answered with garbage
        assert code == 334, text
        code, text = c.docmd("%%%")
        assert (code, text[:6]) == (421, b"4.7.0 "), text  # the third failure: locked out
        c.close()
        assert failures() == before + 3
        # Locked out now, even with the right password.
        r = Client.connect(inst.ports["submission"], source="127.0.0.6")
        assert r.reply().text.startswith("421 4.7.0 ")
        r.close()
        # Another address is not, and logs in.
        logged_in(inst, source="127.0.0.7").quit()


def test_a_locked_out_address_cannot_log_in_on_an_open_session(tmp_path: Path) -> None:
    # A client that opened a second session before the lockout gets no use of it.
    inst = _inst(tmp_path, max_auth_failures="2", auth_lockout='"1h"')
    with running(inst, "mta", "msa"):
        spare = submissions(inst, source="127.0.0.4")
        c = submissions(inst, source="127.0.0.4")
        assert auth_plain(c, "alice@example.org", "x")[0] == 535
        assert auth_plain(c, "alice@example.org", "x")[0] == 421
        c.close()
        code, text = auth_plain(spare, "alice@example.org", PASSWORD)
        assert (code, text[:6]) == (421, b"4.7.0 "), text
        spare.close()


def test_failures_outside_the_window_do_not_add_up(tmp_path: Path) -> None:
    # A window of a few seconds: each try costs an argon2 check (most of a second on a
    # busy machine) and the slowing delay, and the second and third must fall in one window.
    inst = _inst(tmp_path, max_auth_failures="2", auth_failure_window='"3s"', auth_lockout='"1h"')
    with running(inst, "mta", "msa"):
        c = submission(inst, source="127.0.0.5")
        try:
            assert auth_plain(c, "alice@example.org", "x")[0] == 535
            time.sleep(3.1)
            assert auth_plain(c, "alice@example.org", "x")[0] == 535  # the first one has expired
            assert auth_plain(c, "alice@example.org", "x")[0] == 421
        finally:
            c.close()


def test_default_is_five_failures(tmp_path: Path) -> None:
    inst = _inst(tmp_path)
    assert (inst.config.msa.max_auth_failures, inst.config.msa.auth_failure_window,
            inst.config.msa.auth_lockout) == (5, 600.0, 600.0)


def test_messages_per_user_per_hour(tmp_path: Path) -> None:
    inst = _inst(tmp_path, max_messages_per_hour="2")
    with running(inst, "mta", "msa"):
        c = logged_in(inst)
        for _ in range(2):
            c.sendmail("alice@example.org", ["bob@example.org"], b"From: alice@example.org\r\n\r\nhi\r\n")
        code, text = c.mail("alice@example.org")
        assert (code, text[:6]) == (451, b"4.7.1 "), text
        c.close()
        # It is per user, not per connection or address...
        again = logged_in(inst)
        assert again.mail("alice@example.org")[0] == 451
        again.close()
        # ...and other users are not affected.
        bob = logged_in(inst, "bob@example.org")
        assert bob.mail("bob@example.org")[0] == 250
        bob.close()


def test_recipients_per_user_per_hour(tmp_path: Path) -> None:
    inst = _inst(tmp_path, max_recipients_per_hour="3")
    with running(inst, "mta", "msa"):
        c = logged_in(inst)
        assert c.mail("alice@example.org")[0] == 250
        for r in ("bob@example.org", "alice@example.org", "sales@example.org"):
            assert c.rcpt(r)[0] == 250
        code, text = c.rcpt("info@example.org")
        assert (code, text[:6]) == (451, b"4.7.1 "), text
        code, reply = c.data(b"From: alice@example.org\r\n\r\nhi\r\n")
        assert code == 250, reply  # the recipients within the limit still get it
        assert c.mail("alice@example.org")[0] == 250
        assert c.rcpt("bob@example.org")[0] == 451
        c.close()


def test_connection_cap_per_client_address(tmp_path: Path) -> None:
    inst = _inst(tmp_path, max_connections_per_client="2")
    with running(inst, "mta", "msa"):
        first, second = Client.connect(inst.ports["submission"]), Client.connect(inst.ports["submission"], timeout=20)
        assert first.reply().text.startswith("220 ") and second.reply().text.startswith("220 ")
        third = Client.connect(inst.ports["submission"])
        assert third.reply().text.startswith("421 4.7.0 ")
        assert third.closed()
        third.close()
        # The cap counts the client's connections on both roles together.
        implicit = Client.connect(inst.ports["submissions"], tls=True)
        assert implicit.reply().text.startswith("421 4.7.0 ")
        implicit.close()
        other = Client.connect(inst.ports["submissions"], tls=True, source="127.0.0.6")  # another address is let in
        assert other.reply().text.startswith("220 ")
        other.close()
        first.cmd("QUIT")
        first.close()
        deadline = time.monotonic() + 5
        while True:  # the slot is freed once the server has seen the close
            again = Client.connect(inst.ports["submission"])
            greeting = again.reply().text
            again.close()
            if greeting.startswith("220 ") or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert greeting.startswith("220 "), greeting
        second.close()
