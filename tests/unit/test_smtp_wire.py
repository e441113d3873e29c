"""The wire reader of the SMTP engine, fed bytes directly: lines, limits, bare CR/LF, DATA, BDAT."""

from __future__ import annotations

from random import Random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.smtp import wire
from common.smtp.wire import BareLineEnding, Chunk, Command, LineTooLong, Message, Reader

pytestmark = pytest.mark.timeout(60)


def items(reader: Reader, data: bytes = b"") -> list[wire.Item]:
    reader.feed(data)
    out = []
    while (item := reader.next()) is not None:
        out.append(item)
        if isinstance(item, Message | Chunk | BareLineEnding):
            break
    return out


def test_commands_split_on_crlf_and_wait_for_the_rest() -> None:
    r = Reader(max_message_size=1000)
    assert items(r, b"EHLO a\r\nNOOP\r\nQU") == [Command(b"EHLO a"), Command(b"NOOP")]
    assert items(r, b"IT\r") == []
    assert items(r, b"\n") == [Command(b"QUIT")]


@pytest.mark.parametrize("data", [b"NOOP\n", b"NOOP\rRSET\r\n", b"NO\rOP\r\n", b"\n", b"A\r\r\n"])
def test_bare_cr_or_lf_in_a_command(data: bytes) -> None:
    assert items(Reader(max_message_size=1000), data)[-1] == BareLineEnding()


def test_command_line_limit_is_512_octets_with_crlf() -> None:
    r = Reader(max_message_size=1000)
    assert items(r, b"A" * 510 + b"\r\n") == [Command(b"A" * 510)]
    assert items(r, b"A" * 511 + b"\r\n") == [LineTooLong()]


def test_an_endless_command_line_is_not_kept_in_memory() -> None:
    r = Reader(max_message_size=1000)
    for _ in range(100):
        assert items(r, b"A" * 10_000) == []
        assert r.buffered <= wire.COMMAND_LINE_LIMIT
    assert items(r, b"\r\nNOOP\r\n") == [LineTooLong(), Command(b"NOOP")]


def test_data_is_unstuffed_and_ends_at_crlf_dot_crlf() -> None:
    r = Reader(max_message_size=1000)
    r.start_data()
    assert items(r, b"Subject: x\r\n\r\n..dot\r\n.\r\nNOOP\r\n") == [Message(b"Subject: x\r\n\r\n.dot\r\n")]
    assert items(r) == [Command(b"NOOP")]  # back to commands, the pipelined one kept


def test_data_across_many_small_reads() -> None:
    r = Reader(max_message_size=1000)
    r.start_data()
    message = b"a\r\n..b\r\n.\r\n"
    got: list[wire.Item] = []
    for i in range(len(message)):
        got += items(r, message[i : i + 1])
    assert got == [Message(b"a\r\n.b\r\n")]


def test_an_empty_message() -> None:
    r = Reader(max_message_size=1000)
    r.start_data()
    assert items(r, b".\r\n") == [Message(b"")]


ENDINGS = [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r", b"\r.\n", b"\n.\r"]


@pytest.mark.parametrize("ending", ENDINGS)
def test_no_smuggling_ending_ends_a_message(ending: bytes) -> None:
    r = Reader(max_message_size=10_000)
    r.start_data()
    got = items(r, b"hello" + ending + b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nx\r\n.\r\n")
    assert got == [BareLineEnding()]


def test_text_line_limit_is_1000_octets_plus_a_stuffed_dot() -> None:
    r = Reader(max_message_size=100_000)
    r.start_data()
    got = items(r, b"x" * 998 + b"\r\n." + b"y" * 998 + b"\r\n.\r\n")
    assert got == [Message(b"x" * 998 + b"\r\n" + b"y" * 998 + b"\r\n")]
    r.start_data()
    assert items(r, b"x" * 999 + b"\r\n.\r\n") == [Message(b"", line_too_long=True)]


def test_a_long_line_anywhere_among_many_is_found() -> None:
    # The check jumps a window of the limit at a time (wire._has_long_line): it must
    # agree with measuring every line, wherever the long one sits, dot-stuffed or not.
    random = Random(5321)
    sizes = [0, 1, 997, 998, 999, 1000, 1500]
    for _ in range(3000):
        # (A dot alone would end the message: a stuffed dot comes before at least one x.)
        lines = [random.choice([b"", b"."]) + b"x" * random.choice(sizes[1:]) for _ in range(random.randint(1, 9))]
        region = b"\r\n".join(lines) + b"\r\n"
        over = any(len(line) > wire.TEXT_LINE_LIMIT - 2 + line.startswith(b".") for line in lines)
        assert wire._has_long_line(region) is over, [len(line) for line in lines]
        r = Reader(max_message_size=100_000)
        r.start_data()
        [message] = items(r, region + b".\r\n")
        assert isinstance(message, Message) and message.line_too_long is over


def test_an_oversized_message_is_read_to_its_end_but_not_kept() -> None:
    r = Reader(max_message_size=10_000)
    r.start_data()
    for _ in range(1000):
        assert items(r, b"z" * 998 + b"\r\n") == []
        assert sum(map(len, r._parts)) == 0 or r._size <= 10_000
    assert items(r, b".\r\nNOOP\r\n") == [Message(b"", too_big=True)]
    assert items(r) == [Command(b"NOOP")]


def test_a_long_line_without_lf_is_not_kept_in_memory() -> None:
    r = Reader(max_message_size=10_000_000)
    r.start_data()
    for _ in range(100):
        assert items(r, b"q" * 10_000) == []
        assert r.buffered <= wire.TEXT_LINE_LIMIT + 1
    assert items(r, b"\r\n.\r\n") == [Message(b"", line_too_long=True)]


def test_bdat_chunks_are_taken_by_count() -> None:
    r = Reader(max_message_size=1000)
    r.start_bdat(5, last=False)
    assert items(r, b"ab\r\n.") == [Chunk(5)]
    r.start_bdat(5, last=True)
    assert items(r, b"\r\nz\r") == []
    assert items(r, b"\nNOOP\r\n") == [Message(b"ab\r\n.\r\nz\r\n")]
    assert items(r) == [Command(b"NOOP")]


def test_bdat_message_with_a_bare_lf_is_refused_but_the_session_stays_in_step() -> None:
    r = Reader(max_message_size=1000)
    r.start_bdat(5, last=True)
    assert items(r, b"a\nb\r\nNOOP\r\n") == [Message(b"", bare_line_ending=True)]
    assert items(r) == [Command(b"NOOP")]


def test_bdat_over_the_size_limit() -> None:
    r = Reader(max_message_size=10)
    r.start_bdat(20, last=True)
    assert items(r, b"x" * 20) == [Message(b"", too_big=True)]


@given(st.lists(st.binary(max_size=300), max_size=20), st.booleans())
@settings(max_examples=300, deadline=None)
def test_any_bytes_give_items_or_wait_and_memory_stays_bounded(chunks: list[bytes], data_mode: bool) -> None:
    r = Reader(max_message_size=2000)
    if data_mode:
        r.start_data()
    for chunk in chunks:
        r.feed(chunk)
        while (item := r.next()) is not None:
            if isinstance(item, Command):
                assert b"\r" not in item.line and b"\n" not in item.line and len(item.line) <= 510
            if isinstance(item, Message):
                assert len(item.content) <= 2000
                # A kept message never holds a bare CR or LF: nothing can be smuggled in it.
                assert item.content.count(b"\r\n") == item.content.count(b"\n") == item.content.count(b"\r")
            if isinstance(item, BareLineEnding):
                return  # the session ends here
        assert r.buffered <= max(wire.TEXT_LINE_LIMIT + 1, len(chunk) + wire.TEXT_LINE_LIMIT)


def test_ipv4_mapped_client_addresses_are_seen_as_ipv4() -> None:
    from common.smtp import in_networks
    from common.smtp.admission import client_address

    assert client_address("::ffff:192.0.2.7") == "192.0.2.7"
    assert client_address("2001:db8::1") == "2001:db8::1" and client_address("192.0.2.7") == "192.0.2.7"
    assert in_networks("::ffff:10.1.2.3", ["10.0.0.0/8"]) and not in_networks("::ffff:11.1.2.3", ["10.0.0.0/8"])
    assert in_networks("2001:db8::5", ["2001:db8::/32"]) and not in_networks("local", ["10.0.0.0/8"])
