"""AUTH's exchange (common/smtp/sasl.py), fed answer lines, no socket: PLAIN and LOGIN.

The sessions over real sockets are tested in tests/component (the MSA's
logins) and tests/adversarial; these pin the exchange itself: which
challenges it asks, what it returns, and each refusal's reply.
"""

from __future__ import annotations

from base64 import b64encode

import pytest

from common import reply as R
from common.reply import Reply, SMTPError
from common.smtp import sasl


def b64(raw: bytes) -> str:
    return b64encode(raw).decode("ascii")


def run(arg: str, *answers: bytes) -> tuple[list[str], tuple[str, str]]:
    """Drive an exchange with `answers`: the challenges it asked, and what it returned."""
    steps = sasl.exchange(arg)
    asked: list[str] = []
    try:
        asked.append(next(steps))
        for a in answers:
            asked.append(steps.send(a))
    except StopIteration as done:
        return asked, done.value
    raise AssertionError(f"the exchange wants more than {answers!r}: it asked {asked!r}")


def refused(arg: str, *answers: bytes) -> Reply:
    with pytest.raises(SMTPError) as err:
        run(arg, *answers)
    return err.value.reply


ALICE = b64(b"\x00alice\x00secret")  # PLAIN's authzid NUL authcid NUL passwd


def test_plain_with_an_initial_response_asks_nothing() -> None:
    assert run(f"PLAIN {ALICE}") == ([], ("alice", "secret"))
    assert run("plain " + b64(b"admin\x00bob\x00pw")) == ([], ("bob", "pw"))  # authzid is not the login


def test_plain_and_login_ask_with_334_challenges() -> None:
    assert run("PLAIN", ALICE.encode()) == ([""], ("alice", "secret"))
    assert run("LOGIN", b"YWxpY2U=", b"c2VjcmV0") == ([sasl.USERNAME, sasl.PASSWORD], ("alice", "secret"))
    assert run("LOGIN YWxpY2U=", b"c2VjcmV0") == ([sasl.PASSWORD], ("alice", "secret"))


def test_bad_exchanges_are_refused_with_their_reply() -> None:
    assert refused("") == R.PARAM_SYNTAX.with_text("Syntax: AUTH mechanism")
    assert refused("CRAM-MD5") == R.AUTH_MECHANISM
    assert refused("PLAIN", b"*") == R.AUTH_CANCELLED
    assert refused("LOGIN", b"YWxpY2U=", b"*") == R.AUTH_CANCELLED
    # Undecodable and unsplittable credentials share one reply, which the MSA counts as a failed login.
    garbled = refused("PLAIN not-base64!")
    assert (garbled.code, garbled.status) == (R.AUTH_SYNTAX.code, R.AUTH_SYNTAX.status)
    garbled = refused(f"PLAIN {b64(b'alice-secret')}")
    assert garbled == R.AUTH_SYNTAX.with_text("Cannot split AUTH PLAIN value")
    assert refused("LOGIN", "YWxp\u00e9".encode()).status == R.AUTH_SYNTAX.status
