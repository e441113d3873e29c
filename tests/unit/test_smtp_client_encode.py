"""Our client never emits a stray CR or LF, and dot-stuffs every line (RFC 5321 4.5.2)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.smtp_client import encode_body

pytestmark = pytest.mark.timeout(60)


def test_every_line_ending_becomes_crlf() -> None:
    assert encode_body(b"a\nb\rc\r\nd") == b"a\r\nb\r\nc\r\nd\r\n.\r\n"


def test_smuggling_endings_are_turned_into_plain_lines() -> None:
    out = encode_body(b"hello\n.\nMAIL FROM:<x@y>\r\n")
    assert out == b"hello\r\n..\r\nMAIL FROM:<x@y>\r\n.\r\n"


def test_dots_are_stuffed_and_the_end_is_marked_once() -> None:
    assert encode_body(b".\r\n..x\r\n") == b"..\r\n...x\r\n.\r\n"
    assert encode_body(b"") == b".\r\n"


@given(st.binary(max_size=2000))
def test_output_is_clean_for_any_body(body: bytes) -> None:
    out = encode_body(body)
    assert out.endswith(b"\r\n.\r\n") or out == b".\r\n"
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", out) is None  # no bare CR, no bare LF
    lines = out[:-2].split(b"\r\n")
    assert lines[-1] == b"."
    assert all(not ln.startswith(b".") or ln.startswith(b"..") for ln in lines[:-1])  # stuffed
    # Undoing the stuffing gives back the body with CRLF line endings.
    unstuffed = b"".join(ln[1:] + b"\r\n" if ln.startswith(b".") else ln + b"\r\n" for ln in lines[:-1])
    expected = re.sub(rb"\r\n|\r|\n", b"\r\n", body)
    if expected and not expected.endswith(b"\r\n"):
        expected += b"\r\n"
    assert unstuffed == expected
