"""What a sender asks of delivery, as the MTA's real listeners take it and the queue keeps it.

DSN parameters (RFC 3461: RET, ENVID at MAIL; NOTIFY, ORCPT at RCPT),
BODY=8BITMIME (RFC 6152), SMTPUTF8 (RFC 6531) and REQUIRETLS (RFC 8689) are
checked by the engine (a bad value is 501 5.5.4) and stored with the message
and each recipient; REQUIRETLS is offered only after STARTTLS on the public
listener, and on the internal one, which only our MSA reaches.
"""

from __future__ import annotations

import smtplib
import ssl
from collections.abc import Iterator

import pytest

from tests.harness.mta import MSG, MTA, queued_id
from tests.harness.users import add_user
from tests.support.suite import Installation

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Installation:
    inst = Installation(tmp_path_factory.mktemp("opts") / "m")
    add_user(inst, "alice@example.org", "maildir")
    add_user(inst, "bob@example.org", "maildir")
    inst.set("mta", "resubmission_window", "0")
    return inst


@pytest.fixture
def mta(shared: Installation) -> Iterator[MTA]:
    server = MTA(shared)
    try:
        yield server
    finally:
        server.close()


def _keywords(s: smtplib.SMTP) -> set[str]:
    return {k.upper() for k in s.esmtp_features}


def test_dsn_is_offered_and_requiretls_only_after_starttls(mta: MTA) -> None:
    with mta.client() as s:
        assert "dsn" in s.esmtp_features and "requiretls" not in s.esmtp_features
        code, text = s.mail("a@far.test", ["REQUIRETLS"])
        assert code == 555, (code, text)  # not offered in the clear
        s.rset()
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        s.starttls(context=ctx)
        s.ehlo("client.test")
        assert {"DSN", "REQUIRETLS"} <= _keywords(s)
        assert s.mail("a@far.test", ["REQUIRETLS"])[0] == 250
    with mta.client(internal=True) as s:  # only our MSA, which took the message over TLS
        assert {"DSN", "REQUIRETLS"} <= _keywords(s)


def test_the_options_are_stored_with_the_message_and_each_recipient(mta: MTA) -> None:
    with mta.client(internal=True) as s:
        mail = ["RET=HDRS", "ENVID=QQ+2B1+3D2", "BODY=8BITMIME", "SMTPUTF8", "REQUIRETLS"]
        assert s.mail("a@far.test", mail)[0] == 250
        assert s.rcpt("alice@example.org", ["NOTIFY=success,FAILURE", "ORCPT=rfc822;Alice+2Bx@example.org"])[0] == 250
        assert s.rcpt("bob@example.org", ["NOTIFY=NEVER"])[0] == 250
        assert s.rcpt("carol@far.test")[0] == 250
        code, text = s.data(MSG)
        assert code == 250
    m, rcpts = mta.message(queued_id(text))
    assert (m.ret, m.envid, m.body_type, m.smtputf8, m.requiretls) == ("HDRS", "QQ+1=2", "8BITMIME", True, True)
    got = {r.address: (r.notify, r.orcpt) for r in rcpts}
    assert got == {
        "alice@example.org": ("SUCCESS,FAILURE", "rfc822;Alice+x@example.org"),
        "bob@example.org": ("NEVER", ""),
        "carol@far.test": ("", ""),
    }
    with mta.client() as s:  # and a plain message has none of them
        s.mail("a@far.test")
        s.rcpt("alice@example.org")
        code, text = s.data(MSG)
    m, rcpts = mta.message(queued_id(text))
    assert (m.ret, m.envid, m.body_type, m.smtputf8, m.requiretls) == ("", "", "7BIT", False, False)
    assert [(r.notify, r.orcpt) for r in rcpts] == [("", "")]


@pytest.mark.parametrize(
    ("mail", "rcpt"),
    [
        (["RET=BODY"], []),
        (["RET=FULL", "RET=HDRS"], []),
        (["ENVID=a+zz"], []),  # "+" must be followed by two upper-case hex digits
        (["ENVID=" + "x" * 101], []),
        ([], ["NOTIFY=NEVER,SUCCESS"]),
        ([], ["NOTIFY=SOMETIMES"]),
        ([], ["NOTIFY=SUCCESS,SUCCESS"]),
        ([], ["ORCPT=bob@example.org"]),  # no addr-type
        ([], ["ORCPT=rfc822;bob+4"]),
    ],
)
def test_bad_dsn_values_get_501_5_5_4(mta: MTA, mail: list[str], rcpt: list[str]) -> None:
    with mta.client() as s:
        code, text = s.mail("a@far.test", mail)
        if rcpt:
            assert code == 250
            code, text = s.rcpt("alice@example.org", rcpt)
        assert (code, text[:5]) == (501, b"5.5.4"), (code, text)
