"""common/headers.py: the limits a header must keep before anything parses it, and reading it in linear time."""

from __future__ import annotations

import time

import pytest

from common import headers
from msa import submission

pytestmark = pytest.mark.timeout(30)


def field(name: str, value: str) -> bytes:
    return f"{name}: {value}\r\nSubject: x\r\n".encode()


def test_a_header_at_the_limits_passes_and_one_octet_more_does_not() -> None:
    at = field("From", "a" * (headers.MAX_ADDRESS_FIELD - 10) + " <a@b.c>"[: 10])
    assert headers.check(at) is None
    over = field("From", "a" * (headers.MAX_ADDRESS_FIELD + 1))
    assert str(headers.check(over)) == "552 5.3.4 From: field too long (over 16384 octets)"
    words = " ".join(["=?utf-8?q?a?="] * headers.MAX_ENCODED_WORDS)
    assert headers.check(field("From", words + " <a@b.c>")) is None
    assert str(headers.check(field("Sender", words + " =?utf-8?q?a?= <a@b.c>"))) == (
        "552 5.3.4 Sender: too many encoded words (over 128)"
    )
    big = b"X-Filler: " + b"y" * 900 + b"\r\n"
    header = big * (headers.MAX_HEADER // len(big) + 1) + field("From", "a@b.c")
    assert len(header) > headers.MAX_HEADER
    assert str(headers.check(header)) == "552 5.3.4 Message header too big (over 262144 octets)"


def test_a_header_of_too_many_fields_is_refused_before_any_pass_over_them() -> None:
    fields = b"".join(b"X-%d: v\r\n" % i for i in range(headers.MAX_FIELDS))
    assert headers.check(fields) is None
    refused = headers.check(fields + b"X-One-More: v\r\n")
    assert str(refused) == "552 5.3.4 Message header has too many fields (over 1000)"
    # Folded lines are part of their field, not fields of their own.
    assert headers.check(b"X-Folded: " + b"\r\n v" * 5000 + b"\r\n") is None


def test_comments_are_removed_in_linear_time_and_deep_nesting_is_not_read() -> None:
    assert headers.without_comments(b" (a comment) mail.test (x (nested) y); spf=pass") == b"  mail.test ; spf=pass"
    assert headers.without_comments(b"(" * 100_000 + b"mail.test;") == b"(" * 100_000 + b"mail.test;"
    assert headers.without_comments(b"(" * 50_000 + b")" * 50_000 + b" mail.test;") is None
    assert headers.without_comments(b"((((((((x)))))))) mail.test;") == b" mail.test;"  # 8 deep: read


def test_folded_and_obsolete_forms_are_counted_as_the_reader_sees_them() -> None:
    # Folding joins the lines (RFC 5322 2.2.3); "Resent-From :" is the obsolete form (4.5).
    folded = "\r\n ".join(["a" * 900] * 19)
    assert headers.check(field("Resent-From ", folded)) is not None
    assert headers.check(field("resent-sender", folded)) is not None
    # Other fields are not parsed here, and only the whole header bounds them.
    assert headers.check(field("To", folded)) is None


def test_values_unfold_and_find_every_field_of_that_name() -> None:
    header = b"From: Alice\r\n <alice@example.org>\r\nfrom : second@example.org\r\nSubject: From: not this\r\n"
    assert headers.values(header, "From") == ["Alice <alice@example.org>", "second@example.org"]
    assert headers.values(header, "Sender") == []


def test_addresses_refuses_what_the_parser_cannot_take() -> None:
    assert headers.addresses("Alice <alice@example.org>, bob@example.org") == [
        "alice@example.org", "bob@example.org",
    ]
    assert headers.addresses("(" * 3000 + "a@b.c") is None  # RecursionError in email.utils
    assert headers.addresses("x" * (headers.MAX_ADDRESS_FIELD + 1)) is None


def test_finding_address_look_alikes_is_linear() -> None:
    # A long word with no "@" made the look-alike search start again at each of its
    # characters: 200,000 of them took minutes.  A DoS check with a wide margin, not a benchmark.
    start = time.monotonic()
    assert submission._ADDRESS_LIKE.findall("a" * 200_000) == []
    word = "x" * 100_000 + "@" + "y" * 100_000
    assert submission._ADDRESS_LIKE.findall(word + " " + "z" * 100_000) == [word]
    assert time.monotonic() - start < 5.0
