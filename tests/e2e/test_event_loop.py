"""The four daemons on uvloop (the default) and on asyncio's own loop: a message
submitted over STARTTLS and over implicit TLS crosses MSA -> MTA -> qmgr -> MDA,
each daemon's log says which loop it ran on, and each stops on SIGTERM."""

from __future__ import annotations

import re

import pytest

from common.daemon import LOOP_VARIABLE
from tests.support.suite import Installation, maildir_messages, running

pytestmark = pytest.mark.timeout(180)

BODY = b"Subject: loop\r\nFrom: alice@example.org\r\nTo: alice@example.org\r\n\r\nround the loop\r\n"


@pytest.mark.parametrize("choice", ["", "asyncio"], ids=["default", "asyncio"])
def test_the_pipeline_runs_on_the_loop_the_environment_names(
    installation: Installation, monkeypatch: pytest.MonkeyPatch, choice: str
) -> None:
    # supervisord hands its environment to the daemons, as it would from a unit file.
    monkeypatch.setenv(LOOP_VARIABLE, choice)
    expected = choice or "uvloop"
    for inst in running(installation):
        code, _ = inst.submit("alice@example.org", ["alice@example.org"], BODY)
        assert code == 250
        code, _ = inst.submit("alice@example.org", ["alice@example.org"], BODY, implicit_tls=True)
        assert code == 250
        box = inst.mailbox("alice@example.org")
        inst.wait_for(lambda box=box: len(maildir_messages(box)) == 2, what="both deliveries")
    log = installation.log_text()
    for daemon in ("msa", "mta", "qmgr", "mda"):
        started = re.findall(rf"^\S+ \S+ {daemon}\[\d+\] \S+: starting \(event loop: (\w+)\)$", log, re.M)
        assert started == [expected], (daemon, log[-3000:])
        assert re.search(rf"^\S+ \S+ {daemon}\[\d+\] \S+: stopped$", log, re.M), (daemon, log[-3000:])
