"""DSN with Postfix as the next hop: our queue manager passes NOTIFY, ORCPT, RET and ENVID on.

Alice submits to our MSA asking for a success notice; our queue manager
relays the message to Postfix (which offers DSN) with the parameters, so
Postfix, the last hop, sends the notice (RFC 3464, action "delivered") back
to our public listener and it lands in Alice's Maildir.  We send no notice
of our own: the hop that got NOTIFY reports.
"""

from __future__ import annotations

import email
import email.policy
import smtplib
import time
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from tests.support.postfix import PostfixInstance
from tests.support.suite import PASSWORD, Installation, maildir_messages, running, tls_client_context

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]


@pytest.fixture
def both(installation: Installation, tmp_path: Path) -> Iterator[tuple[Installation, PostfixInstance]]:
    postfix = PostfixInstance(
        tmp_path / "postfix", virtual_domains=["postfix.test"], virtual_mailboxes=["carol@postfix.test"],
        relay_to=f"127.0.0.1:{installation.ports['smtp']}", relay_domains=["example.org"],
    )
    installation.set("mta.transport", '"postfix.test"', f'"{postfix.address}"')
    with postfix:
        yield from ((inst, postfix) for inst in running(installation))


def test_postfix_gets_the_dsn_parameters_and_sends_the_success_notice(
    both: tuple[Installation, PostfixInstance],
) -> None:
    inst, postfix = both
    body = b"From: alice@example.org\r\nTo: carol@postfix.test\r\nSubject: did it\r\n\r\nhi carol\r\n"
    with smtplib.SMTP("127.0.0.1", inst.ports["submission"], timeout=30) as c:
        c.starttls(context=tls_client_context())
        c.login("alice@example.org", PASSWORD)
        assert c.mail("alice@example.org", ["RET=HDRS", "ENVID=pf+2Btest"])[0] == 250
        assert c.rcpt("carol@postfix.test", ["NOTIFY=SUCCESS", "ORCPT=rfc822;Carol@postfix.test"])[0] == 250
        assert c.data(body)[0] == 250
    inst.wait_for(lambda: postfix.maildir_count("carol@postfix.test") == 1, timeout=40,
                  what=f"delivery to Postfix\n{postfix.log_text()[-2000:]}")
    box = inst.mailbox("alice@example.org")
    inst.wait_for(lambda: len(maildir_messages(box)) >= 1, timeout=40,
                  what=f"Postfix's success notice\n{postfix.log_text()[-3000:]}")
    time.sleep(1)  # a second notice (ours) would have come by now
    notices = maildir_messages(box)
    assert len(notices) == 1, "one success notice, from the last hop"
    msg = email.message_from_bytes(notices[0].read_bytes(), policy=email.policy.default)
    assert isinstance(msg, EmailMessage) and msg.get_content_type() == "multipart/report"
    per_message, per_rcpt = list(msg.iter_parts())[1].get_payload()
    assert postfix.hostname in per_message["Reporting-MTA"]
    assert per_message["Original-Envelope-Id"] == "pf+test"
    assert per_rcpt["Action"] == "delivered" and per_rcpt["Status"].startswith("2.")
    assert per_rcpt["Original-Recipient"].replace(" ", "") == "rfc822;Carol@postfix.test"
