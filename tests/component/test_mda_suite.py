"""The MDA inside the running suite: the queue manager records the LMTP outcome per recipient."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import update

from common.models import User
from tests.support.suite import Installation, maildir_messages

pytestmark = pytest.mark.timeout(90)


def test_each_recipients_lmtp_reply_is_recorded_by_mda_and_qmgr(suite: Installation) -> None:
    db = suite.db()
    with db.write() as s:
        s.execute(update(User).where(User.address == "bob@example.org").values(quota=10))
        s.commit()
    db.close()
    body = b"Subject: quota\r\nFrom: alice@example.org\r\nTo: bob@example.org\r\n\r\nHi.\r\n"
    code, text = suite.submit("alice@example.org", ["alice@example.org", "bob@example.org"], body)
    assert code == 250
    m = re.search(rb"queued as ([0-9A-F]{18})", text)
    assert m, text
    trace_id = m.group(1).decode()

    def events(hop: str) -> dict[str, tuple[str, str]]:
        return {e["recipient"]: (e["event"], e["detail"]) for e in suite.trace(trace_id)["events"]
                if e["hop"] == hop and e["recipient"]}

    suite.wait_for(lambda: len(events("qmgr")) == 2, what="both LMTP outcomes in qmgr's events")
    mda, qmgr = events("mda"), events("qmgr")
    assert mda["alice@example.org"][0] == "delivered" and mda["alice@example.org"][1].startswith("250 2.0.0")
    assert mda["bob@example.org"][0] == "refused" and mda["bob@example.org"][1].startswith("552 5.2.2")
    assert qmgr["alice@example.org"][0] == "delivered" and "250" in qmgr["alice@example.org"][1]
    assert qmgr["bob@example.org"][0] == "bounced" and "552" in qmgr["bob@example.org"][1]
    assert "5.2.2" in qmgr["bob@example.org"][1]
    # alice got her copy, and then the bounce for bob.
    suite.wait_for(lambda: len(maildir_messages(suite.mailbox("alice@example.org"))) == 2, what="the DSN")
