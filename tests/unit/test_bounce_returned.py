"""What a notice returns of the original (mta/bounce.py `returned`), decided and composed.

RET=FULL returns everything, except a binary message whose notice cannot be
sure to travel as BINARYMIME (header only, and the text says why) and a
REQUIRETLS message (RFC 8689 5: the header to a local sender, the
Message-ID alone to anyone else).
"""

from __future__ import annotations

import datetime as dt

import pytest

from common.reply import Reply
from mta.bounce import Failure, Returned, compose, returned

pytestmark = pytest.mark.timeout(10)

HEADER = b"From: Alice <alice@example.org>\r\nSubject: the plan\r\nMessage-ID:\r\n <folded@example.org>\r\n"
BINARY = HEADER + b"\r\n\x00bare\nLF\rCR\xff\r\n"
WHEN = dt.datetime(2024, 1, 1, 12, 0, 0)


@pytest.mark.parametrize(("ret", "body_type", "requiretls", "local", "expected"), [
    ("FULL", "7BIT", False, False, Returned.FULL),
    ("FULL", "8BITMIME", False, False, Returned.FULL),
    ("", "7BIT", False, False, Returned.HEADERS),
    ("HDRS", "BINARYMIME", False, True, Returned.HEADERS),
    ("FULL", "BINARYMIME", False, True, Returned.FULL),
    ("FULL", "BINARYMIME", False, False, Returned.HEADERS),
    ("FULL", "7BIT", True, False, Returned.REDACTED),  # RFC 8689 5: RET=FULL disregarded
    ("HDRS", "7BIT", True, False, Returned.REDACTED),
    ("FULL", "BINARYMIME", True, True, Returned.HEADERS),  # to a local sender: never leaves this host
])
def test_what_comes_back(ret: str, body_type: str, requiretls: bool, local: bool, expected: Returned) -> None:
    assert returned(ret=ret, body_type=body_type, requiretls=requiretls, local=local) is expected


def _compose(**kw: object) -> bytes:
    return compose(
        hostname="mail.test", sender="alice@example.org", trace="0123456789ABCDEF01", original=BINARY,
        failures=[Failure("bob@far.test", "bob@far.test", Reply(550, "5.1.1", "No such user"))],
        arrival=WHEN, now=WHEN, ret="FULL", body_type="BINARYMIME", **kw,  # type: ignore[arg-type]
    )


def test_a_binary_original_is_returned_octet_for_octet_with_binary_transfer_encoding() -> None:
    raw = _compose(local=True)
    assert b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: binary\r\n\r\n" + BINARY + b"\r\n--" in raw


def test_a_binary_original_the_notice_cannot_carry_comes_back_as_its_header() -> None:
    raw = _compose(local=False)
    assert b"Content-Type: text/rfc822-headers\r\n\r\n" + HEADER + b"\r\n--" in raw
    assert b"\x00" not in raw and b"binary (BINARYMIME)" in raw


def test_a_requiretls_original_leaves_only_its_message_id_folded_lines_and_all() -> None:
    raw = _compose(requiretls=True, local=False)
    assert b"Content-Type: text/rfc822-headers\r\n\r\nMessage-ID:\r\n <folded@example.org>\r\n\r\n--" in raw
    assert b"the plan" not in raw and b"Alice" not in raw and b"REQUIRETLS" in raw


def test_a_requiretls_original_comes_back_as_its_header_to_a_local_sender_and_the_notice_says_why() -> None:
    raw = _compose(requiretls=True, local=True)
    assert b"Content-Type: text/rfc822-headers\r\n\r\n" + HEADER + b"\r\n--" in raw
    assert b"\x00" not in raw and b"sent with REQUIRETLS, so only its header" in raw
