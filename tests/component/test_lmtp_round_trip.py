"""LMTP to our MDA in one round trip: MAIL, the RCPTs and `BDAT n LAST` with the message, one write.

The queue manager's client (common/smtp_client.py) pipelines a whole
transaction to an LMTP server that offers PIPELINING and CHUNKING.  These
tests run the real MDA handler on a loopback port and check what that must
never cost: the replies come back in order, one per recipient; a refusal in
the middle (at RCPT, or for one mailbox after the message) takes nothing from
the recipients around it; and a transaction refused as a whole (at MAIL, or
with no recipient left) leaves its octets unexecuted and the session usable.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from common.smtp import Limits
from common.smtp_client import Client
from tests.harness.services import Stack
from tests.harness.users import add_users
from tests.support.suite import Installation, maildir_messages, mbox_messages

pytestmark = pytest.mark.timeout(30)

SENDER = "carol@example.net"
BODY = b"From: carol@example.net\r\nSubject: one trip\r\n\r\nHello.\r\n"
# Lines a server reading the octets as commands would execute: a message of its own to bob.
SMUGGLED = (
    b"Subject: big\r\n\r\n" + b"x" * 2000 + b"\r\n"
    b"MAIL FROM:<evil@example.net>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\nSubject: smuggled\r\n\r\n.\r\n"
)


@asynccontextmanager
async def mda_client(inst: Installation, limits: Limits | None = None) -> AsyncIterator[Client]:
    """Our LMTP client, on the test's loop, connected to the MDA's listener (on the harness's)."""
    stack = Stack(inst)
    try:
        _, port = stack.listen_mda(limits=limits or Limits(), hostname="mda.test")
        client = await Client.connect("127.0.0.1", port, lmtp=True, helo="mail.test", timeout=10)
        try:
            yield client
        finally:
            await client.quit()
    finally:
        stack.close()


def count_writes(client: Client) -> list[bytes]:
    """Every write the client makes from now on."""
    writes: list[bytes] = []
    real: Callable[[Any], None] = client.writer.write

    def write(data: Any) -> None:
        writes.append(bytes(data))
        real(data)

    client.writer.write = write  # type: ignore[method-assign]
    return writes


def test_one_write_per_transaction_and_every_reply_in_rcpt_order(installation: Installation) -> None:
    async def go() -> tuple[list[int], list[str], list[bytes]]:
        async with mda_client(installation) as client:
            assert {"PIPELINING", "CHUNKING"} <= set(client.extensions)
            writes = count_writes(client)
            replies = await client.send(
                SENDER, ["alice@example.org", "nobody@example.org", "bob@example.org"], BODY,
            )
            return [r.code for r in replies], [f"{r.status} {r.text}" for r in replies], list(writes)

    codes, texts, writes = asyncio.run(go())
    assert codes == [250, 550, 250], texts
    assert "maildir" in texts[0] and "5.1.1" in texts[1] and "mbox" in texts[2]  # each its own, in order
    assert len(writes) == 1 and b"BDAT " in writes[0] and b"\r\nDATA\r\n" not in writes[0]
    [stored] = maildir_messages(installation.mailbox("alice@example.org"))
    assert stored.read_bytes().endswith(b"Subject: one trip\n\nHello.\n")
    assert len(mbox_messages(installation.mailbox("bob@example.org"))) == 1


def test_one_mailbox_refused_after_the_message_costs_the_others_nothing(installation: Installation) -> None:
    [full] = add_users(installation, "full@example.org", quota=100)

    async def go() -> list[int]:
        async with mda_client(installation) as client:
            replies = await client.send(SENDER, ["alice@example.org", "full@example.org", "bob@example.org"],
                                        BODY + b"x" * 200 + b"\r\n")
            return [r.code for r in replies]

    assert asyncio.run(go()) == [250, 552, 250]
    assert len(maildir_messages(installation.mailbox("alice@example.org"))) == 1
    assert len(mbox_messages(installation.mailbox("bob@example.org"))) == 1
    assert maildir_messages(full) == []


def test_a_transaction_refused_as_a_whole_leaves_its_octets_unexecuted(installation: Installation) -> None:
    async def go() -> tuple[list[int], list[bytes], list[int], list[int]]:
        async with mda_client(installation, Limits(max_message_size=1000)) as client:
            # Over the SIZE the MDA offers: the envelope goes alone (a chunk over the
            # server's limit would end the session) and is refused at MAIL.
            writes = count_writes(client)
            too_big = await client.send(SENDER, ["alice@example.org", "bob@example.org"], SMUGGLED)
            too_big_writes = list(writes)
            # Nobody known: refused at RCPT, so the BDAT is refused as a whole (one reply).
            nobody = await client.send(SENDER, ["x@example.org", "y@example.org"], SMUGGLED[-200:])
            # The same session carries on.
            after = await client.send(SENDER, ["alice@example.org"], BODY)
            return [r.code for r in too_big], too_big_writes, [r.code for r in nobody], [r.code for r in after]

    too_big, too_big_writes, nobody, after = asyncio.run(go())
    assert too_big == [552, 552] and nobody == [550, 550] and after == [250]
    assert not any(b"BDAT" in w or b"smuggled" in w for w in too_big_writes)  # the octets never left
    assert len(maildir_messages(installation.mailbox("alice@example.org"))) == 1
    assert mbox_messages(installation.mailbox("bob@example.org")) == []  # nothing smuggled in


def test_a_body_with_stray_line_endings_goes_as_crlf_lines(installation: Installation) -> None:
    async def go() -> list[int]:
        async with mda_client(installation) as client:
            replies = await client.send(SENDER, ["alice@example.org"], b"Subject: odd\n\nbare LF\rbare CR")
            return [r.code for r in replies]

    assert asyncio.run(go()) == [250]
    [stored] = maildir_messages(installation.mailbox("alice@example.org"))
    assert stored.read_bytes().endswith(b"Subject: odd\n\nbare LF\nbare CR\n")

