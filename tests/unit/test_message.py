"""common/message.py: where the header ends, what its fields are, folding and unfolding."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common import message

pytestmark = pytest.mark.timeout(60)


def test_crlf_message() -> None:
    m = b"From: a@example.org\r\nSubject: hi\r\n\r\nbody line\r\n\r\nmore\r\n"
    assert message.split(m) == (b"From: a@example.org\r\nSubject: hi\r\n", b"\r\n", b"body line\r\n\r\nmore\r\n")
    assert message.header_of(m) == b"From: a@example.org\r\nSubject: hi\r\n"


def test_bare_lf_message_as_the_mda_stores_it() -> None:
    m = b"From: a@example.org\nSubject: hi\n\nbody\n\nSubject: not a field\n"
    assert message.split(m) == (b"From: a@example.org\nSubject: hi\n", b"\n", b"body\n\nSubject: not a field\n")
    assert message.values(m, "Subject") == ["hi"]


def test_mixed_line_ends_end_the_header_at_the_first_empty_line() -> None:
    # A CRLF header whose empty line is a bare LF, and the other way round: the first
    # empty line counts, whatever its line end, as it does for Dovecot and dkimpy.
    assert message.split(b"A: 1\r\n\nB: 2\r\n\r\nbody") == (b"A: 1\r\n", b"\n", b"B: 2\r\n\r\nbody")
    assert message.split(b"A: 1\n\r\nbody") == (b"A: 1\n", b"\r\n", b"body")
    # A CR alone ends no line.
    assert message.split(b"A: 1\r\rB: 2\r\n\r\nx") == (b"A: 1\r\rB: 2\r\n", b"\r\n", b"x")


def test_no_body() -> None:
    # The empty line and nothing after it; and no empty line at all: all header.
    assert message.split(b"Subject: x\r\n\r\n") == (b"Subject: x\r\n", b"\r\n", b"")
    assert message.split(b"Subject: x\r\nTo: y\r\n") == (b"Subject: x\r\nTo: y\r\n", b"", b"")
    assert message.split(b"Subject: no line end") == (b"Subject: no line end", b"", b"")


def test_no_header() -> None:
    # A message that begins with the empty line has no header: nothing in its body is a field.
    for blank in (b"\r\n", b"\n"):
        m = blank + b"Subject: in the body\r\n\r\ntext\r\n"
        assert message.split(m) == (b"", blank, b"Subject: in the body\r\n\r\ntext\r\n")
        assert message.fields(m) == [] and message.values(m, "Subject") == []
        assert message.remove(m, lambda f: True) == m


def test_header_only_message() -> None:
    m = b"From: a@example.org\r\nX-Folded: one\r\n two\r\n"
    assert message.split(m) == (m, b"", b"")
    assert [f.name for f in message.fields(m)] == ["From", "X-Folded"]
    assert message.values(m, "x-folded") == ["one two"]
    assert message.remove(m, lambda f: f.name == "X-Folded") == b"From: a@example.org\r\n"
    assert message.split(b"") == (b"", b"", b"")


def test_fields_keep_their_folding_and_line_ends() -> None:
    m = b"Received: from a\r\n\tby b;\r\n\tdate\r\nnot a field\r\nSubject : obsolete form\r\nTo:x\r\n\r\nBody: no\r\n"
    got = message.fields(m)
    assert [(f.name, f.raw) for f in got] == [
        ("Received", b"Received: from a\r\n\tby b;\r\n\tdate\r\n"),
        ("Subject", b"Subject : obsolete form\r\n"),
        ("To", b"To:x\r\n"),
    ]
    assert all(m[f.start : f.end] == f.raw for f in got)
    assert got[0].value == b" from a\r\n\tby b;\r\n\tdate" and got[0].text() == "from a\tby b;\tdate"
    assert message.values(m, "SUBJECT") == ["obsolete form"]
    # Octets that are not UTF-8 are kept (as surrogates), not replaced.
    assert message.values(b"Subject: \xff\r\n\r\n", "Subject") == ["\udcff"]


def test_remove_takes_a_field_with_its_continuation_lines_and_never_the_body() -> None:
    m = b"A: 1\r\nX-Spam-Flag: YES\r\n  folded\r\n\r\nX-Spam-Flag: YES\r\n"
    assert message.remove(m, lambda f: f.name.lower() == "x-spam-flag") == b"A: 1\r\n\r\nX-Spam-Flag: YES\r\n"
    # The last field before the empty line goes with its whole line end (a CR left
    # behind would make a bare LF, and a second empty line).
    assert message.remove(b"A: 1\r\nB: 2\r\n\r\nbody", lambda f: f.name == "B") == b"A: 1\r\n\r\nbody"
    assert message.remove(b"A: 1\nB: 2\n\nbody", lambda f: f.name == "B") == b"A: 1\n\nbody"
    unchanged = b"A: 1\r\n\r\nbody"
    assert message.remove(unchanged, lambda f: False) is unchanged


def test_fold_and_unfold() -> None:
    written = message.fold("Authentication-Results", ["mail.example.org;", "spf=pass", "dkim=none"])
    assert written == "Authentication-Results: mail.example.org;\r\n\tspf=pass\r\n\tdkim=none\r\n"
    (field,) = message.fields(written.encode())
    assert message.unfold(field.value) == b" mail.example.org;\tspf=pass\tdkim=none"
    assert message.unfold(b"a\n b\r\n\tc\r\nd") == b"a b\tc\r\nd"  # a line end before no space stays


_LINES = st.lists(st.sampled_from([b"A: 1", b" folded", b"", b"Subject: s", b"x", b"\r", b"From: \xff"]), max_size=8)


@given(_LINES, st.lists(st.sampled_from([b"\r\n", b"\n"]), min_size=8, max_size=8))
def test_the_three_parts_are_the_message_and_no_field_comes_from_the_body(
    lines: list[bytes], ends: list[bytes]
) -> None:
    m = b"".join(line + end for line, end in zip(lines, ends, strict=False))
    parts = message.split(m)
    assert parts.header + parts.blank + parts.body == m
    assert parts.blank in (b"", b"\r\n", b"\n")
    assert parts.blank or not parts.body
    for f in message.fields(m):
        assert f.end <= len(parts.header) and m[f.start : f.end] == f.raw
    assert message.remove(m, lambda f: True).endswith(parts.blank + parts.body)
