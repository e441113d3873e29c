"""Property tests: the envelope address parser and mboxrd quoting, under hypothesis."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.address import MAX_DOMAIN, MAX_LOCAL, parse_path
from common.reply import SMTPError
from mda.mbox import quote, unquote

pytestmark = pytest.mark.timeout(120)

ATEXT = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+/=?^_`{|}~-"
atom = st.text(ATEXT, min_size=1, max_size=20)
local_part = st.lists(atom, min_size=1, max_size=4).map(".".join)
label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
domain = st.lists(label, min_size=1, max_size=4).map(".".join)


@given(st.text(max_size=300), st.booleans(), st.booleans())
@settings(max_examples=500)
def test_parse_path_either_parses_or_says_501(arg: str, sender: bool, utf8: bool) -> None:
    try:
        address, params = parse_path(arg, sender=sender, utf8=utf8)
    except SMTPError as exc:
        assert exc.reply.code == 501
        assert exc.reply.status == ("5.1.7" if sender else "5.1.3")
        return
    assert not any(c in address for c in "\x00\r\n<>")
    if address and "@" in address:
        local, _, dom = address.rpartition("@")
        assert len(local.encode()) <= MAX_LOCAL and len(dom.encode()) <= MAX_DOMAIN
    elif not sender:
        assert address.lower() == "postmaster"
    assert all(p and not any(c.isspace() for c in p) for p in params)


@given(local_part, domain, st.sampled_from(["", " SIZE=100", " BODY=8BITMIME"]))
def test_valid_addresses_round_trip(local: str, dom: str, param: str) -> None:
    if len(local) > MAX_LOCAL or len(dom) > MAX_DOMAIN:
        return
    address, params = parse_path(f"<{local}@{dom}>{param}", sender=True)
    assert address == f"{local}@{dom.lower()}"
    assert params == param.split()


@given(st.text(min_size=MAX_LOCAL + 1, max_size=100, alphabet="abc"), domain)
def test_local_parts_over_64_octets_are_refused(local: str, dom: str) -> None:
    with pytest.raises(SMTPError) as info:
        parse_path(f"<{local}@{dom}>", sender=False)
    assert (info.value.reply.code, info.value.reply.status) == (501, "5.1.3")


@given(local_part, st.sampled_from(["\x00", "\r", "\n"]), st.integers(0, 5))
def test_control_characters_are_refused(local: str, bad: str, where: int) -> None:
    text = f"<{local}@example.org>"
    text = text[:where] + bad + text[where:]
    with pytest.raises(SMTPError):
        parse_path(text, sender=False)


mbox_lines = st.lists(
    st.one_of(
        st.builds(lambda n, rest: b">" * n + b"From " + rest, st.integers(0, 3), st.binary(max_size=20)),
        st.binary(max_size=30).filter(lambda b: b"\n" not in b),
    ),
    max_size=20,
)


@given(mbox_lines)
@settings(max_examples=300)
def test_mboxrd_quote_then_unquote_is_identity(lines: list[bytes]) -> None:
    body = b"\n".join(line.replace(b"\n", b"") for line in lines)
    quoted = quote(body)
    assert unquote(quoted) == body
    # After quoting, no line starts with "From " any more: a reader cannot split the message.
    assert not any(line.startswith(b"From ") for line in quoted.split(b"\n"))


@given(st.binary(max_size=500))
def test_mboxrd_identity_on_any_bytes(body: bytes) -> None:
    assert unquote(quote(body)) == body
