"""Failed IMAP and POP3 logins reach /metrics: Dovecot (the real one `mailroom run` starts)
counts them in its statistics, and the web program of the same suite reads them from Dovecot's
stats-reader socket, beside the MSA's failures."""

from __future__ import annotations

import imaplib
import poplib
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness.client import auth_plain, submission
from tests.support.dovecot import imaps, pop3s, reading_installation
from tests.support.suite import PASSWORD
from web import dovecot_stats

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]


def _failures(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        body = r.read().decode()
    return {s.labels["listener"]: s.value for f in text_string_to_metric_families(body)
            for s in f.samples if s.name == "mailroom_login_failures_total"}


def test_failed_imap_and_pop3_logins_are_counted_on_metrics(tmp_path: Path) -> None:
    inst = reading_installation(tmp_path / "m", users=[("alice@example.org", "maildir", 0)])
    inst.start()
    try:
        web = inst.ports["listen"]
        assert "imap" not in _failures(web) and "pop3" not in _failures(web)
        # Each login from an address of its own: Dovecot holds back the logins of an
        # address that has failed one (its auth penalty), which is not what is tested here.
        for source, password in (("127.0.0.5", "wrong"), ("127.0.0.6", "also wrong")):
            with imaps(inst.ports["imaps"], source) as client, pytest.raises(imaplib.IMAP4.error):
                client.login("alice@example.org", password)
        with imaps(inst.ports["imaps"], "127.0.0.7") as client:  # a success is not a failure
            client.login("alice@example.org", PASSWORD)
        pop = pop3s(inst.ports["pop3s"], "127.0.0.8")
        try:
            pop.user("nobody@example.org")
            with pytest.raises(poplib.error_proto):
                pop.pass_("guess")
        finally:
            pop.close()
        c = submission(inst, source="127.0.0.9")  # and one at the MSA, beside them
        assert auth_plain(c, "alice@example.org", "wrong")[0] == 535
        c.close()

        deadline = time.monotonic() + 20  # the MSA saves its counters every few seconds
        while (got := _failures(web)) != {"imap": 2, "pop3": 1, "msa.submission": 1} and time.monotonic() < deadline:
            time.sleep(0.5)
        assert got == {"imap": 2, "pop3": 1, "msa.submission": 1}, got
    finally:
        inst.stop()
    # With Dovecot gone, /metrics has no Dovecot rows, and says nothing wrong (asked again below).
    assert dovecot_stats.auth_failures(tmp_path / "no-such-socket") == {}


def test_the_stats_dump_is_read_row_by_row() -> None:
    answer = ("VERSION\tstats-reader-server\t2\t0\nauth_failures\t3\nauth_failures_imap\t2\n"
              "auth_failures_pop3\t1\nother_metric\t9\n\n")
    assert dovecot_stats.parse(answer) == {"imap": 2.0, "pop3": 1.0}
    assert dovecot_stats.parse("VERSION\tsomething-else\t1\t0\nauth_failures_imap\t2\n\n") == {}
    assert dovecot_stats.parse("") == {}
