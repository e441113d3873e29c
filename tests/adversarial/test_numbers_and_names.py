"""Numbers in ASCII digits only, sizes checked before the octets, and HELO/EHLO names that are names.

`int()` reads any Unicode digit: `BDAT ٥ LAST` was taken for 5, `BDAT ² LAST`
raised (a 421 and a traceback), and `BDAT 100000000000000000000000` was
accepted and waited for its data.  An EHLO name of raw `\\xff\\xfe` octets was
welcomed.  Each refusal is checked, and then what the session does after it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from common import config
from common.endpoint import Endpoint
from common.smtp import params
from common.smtp_client import Client as NextHop
from common.smtp_client import NextHopError
from tests.harness.client import CLOSED, Client, line, play, run
from tests.harness.openings import LISTENERS, smtp_hello
from tests.harness.services import Stack, listeners

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One installation's listeners for the module: starting them cost more than each of
    these sessions, which change nothing a later one sees (what a BDAT test stores, it
    counts from where the queue and the mailbox were when it began)."""
    with listeners(tmp_path_factory.mktemp("numbers") / "mailroom") as stack:
        yield stack


@pytest.mark.parametrize("size", ["\u0665", "\u00b2", "\uff15", "5\u0660", "+5", "0x5", "5.0"])
@pytest.mark.parametrize("listener", ["msa", "mta", "mda"])
def test_a_bdat_size_not_in_ascii_digits_is_501_and_the_session_ends(stack: Stack, listener: str, size: str) -> None:
    key, hello, sender, rcpt = LISTENERS[listener]
    before = (stack.queued(), stack.mailbox(rcpt))
    run(stack.ports[key], [
        *hello(), (line(f"MAIL FROM:<{sender}>"), "250 2.1.0"), (line(f"RCPT TO:<{rcpt}>"), "250 2.1.5"),
        (line(f"BDAT {size} LAST") + b"hello", "501 5.5.4"),
        (None, CLOSED),  # what follows cannot be framed: "hello" is never read as a command
    ]).close()
    assert (stack.queued(), stack.mailbox(rcpt)) == before  # nothing stored


def test_a_huge_bdat_size_is_552_at_once_without_waiting_for_data(stack: Stack) -> None:
    s = run(stack.ports["smtp"], [
        *smtp_hello(), (line("MAIL FROM:<a@remote.example>"), "250 2.1.0"),
        (line("RCPT TO:<alice@example.org>"), "250 2.1.5"),
    ], timeout=5)
    try:
        # No data follows: the reply must come without it (it used to wait for 10^23 octets).
        play(s, [(line("BDAT 100000000000000000000000 LAST"), "552 5.3.4"), (None, CLOSED)])
    finally:
        s.close()
    # Another client is served as before.
    run(stack.ports["smtp"], [*smtp_hello(), (line("NOOP"), "250 2.0.0")]).close()


BAD_NAMES = [
    b"\xff\xfe", b"caf\xe9.example", b"a b", b"-dash.example", b"dash-.example", b"a..example",
    b"trailing.example.", b"x" * 64 + b".example", b"[300.1.1.1]", b"[1.2.3.4", b"[IPv6:::1%lo]",
    b"[IPv6:1.2.3.4]", b"\xef\xbc\xa1.example",  # a full-width A: not in NFC
]
GOOD_NAMES = [
    b"client.example", b"localhost", b"DESKTOP-7QX2J", b"my_pc.example", b"192.0.2.1", b"[192.0.2.1]",
    b"[IPv6:2001:db8::1]", b"[::1]", b"xn--bcher-kva.example", "b\u00fccher.example".encode(),
]


@pytest.mark.parametrize("name", BAD_NAMES, ids=[repr(n)[2:-1][:24] for n in BAD_NAMES])
def test_a_hello_name_that_is_no_domain_nor_address_literal_is_501(stack: Stack, name: bytes) -> None:
    s = run(stack.ports["smtp"], [(None, "220 ")])
    try:
        for verb in (b"HELO", b"EHLO"):
            play(s, [(verb + b" " + name + b"\r\n", "501 5.5.4")])
        play(s, [(line("MAIL FROM:<a@remote.example>"), "503 5.5.1")])  # nothing was taken for a name
        play(s, [(line("EHLO client.example"), "250 "), (line("MAIL FROM:<a@remote.example>"), "250 2.1.0")])
    finally:
        s.close()


@pytest.mark.parametrize("name", GOOD_NAMES, ids=[n.decode("utf-8")[:24] for n in GOOD_NAMES])
def test_a_domain_or_address_literal_is_a_good_hello_name(stack: Stack, name: bytes) -> None:
    run(stack.ports["smtp"], [(None, "220 "), (b"EHLO " + name + b"\r\n", "250 "), (line("NOOP"), "250 2.0.0")]).close()


def test_a_u_label_is_a_name_only_where_smtputf8_is_offered() -> None:
    assert params.is_domain("b\u00fccher.example", utf8=True)
    assert not params.is_domain("b\u00fccher.example", utf8=False)
    assert not params.is_domain("\udcff\udcfe", utf8=True)  # raw octets, as the session decodes them


@pytest.mark.parametrize(
    "text", ["127.0.0.1:\u0662\u0665", "127.0.0.1:\u00b2\u2075", "[::1]:\uff12\uff15"], ids=["arabic", "super", "wide"]
)
def test_ports_in_other_digits_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="bad port"):
        Endpoint.parse(text)
    with pytest.raises(ValueError, match="bad port"):
        config.parse_hostport(text)


@pytest.mark.parametrize("text", ["\u0661\u0660MiB", "\u0665m", "\u00b2s"])
def test_sizes_and_durations_in_other_digits_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        config.parse_size(text)
    with pytest.raises(ValueError):
        config.parse_duration(text)


def test_a_reply_code_in_other_digits_is_garbage_not_a_crash(stack: Stack) -> None:
    """What our client reads from a next hop: a code of superscript digits was an uncaught ValueError."""
    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write("\u00b2\u00b2\u2070 mx.example ready\r\n".encode())
        await writer.drain()
        await reader.read(100)
        writer.close()

    async def attempt() -> str:
        server = await asyncio.start_server(greet, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            await NextHop.connect("127.0.0.1", port, timeout=5, connect_timeout=5)
        except NextHopError as exc:
            return str(exc.reply)
        finally:
            server.close()
        return "connected"

    assert stack.run(attempt()).startswith("451 4.5.0 127.0.0.1:")


def test_an_enhanced_code_in_other_digits_is_not_taken_for_one() -> None:
    from common.reply import parse_reply

    assert parse_reply(550, ["\u0665.1.1 no such user"]).status == "5.0.0"
    assert parse_reply(550, ["5.1.1 no such user"]).status == "5.1.1"


def test_raw_octets_as_a_name_are_refused_by_the_mda_and_mta_too(stack: Stack) -> None:
    for listener in ("mta", "mda"):
        key, _hello, _sender, _rcpt = LISTENERS[listener]
        verb = "LHLO" if listener == "mda" else "EHLO"
        c = Client.session(stack.ports[key])
        try:
            c.send(verb.encode() + b" \xff\xfe\r\n")
            assert c.reply().text.startswith("501 5.5.4")
            assert c.cmd(f"{verb} client.example").code == 250
        finally:
            c.quit()
