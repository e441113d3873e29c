"""The two couriers behind one interface: LMTP to our MDA, SMTP to a remote host.

Each test hands an `Attempt` to LocalDelivery, whose next hop is our real MDA
(its LMTP handler on a loopback port, with a real SQLite file and mail root),
and to RemoteDelivery, whose next hop is an aiosmtpd server on a loopback port
reached through the transport map (tests/harness/peers.py), and compares the `Delivered` values the
two give back.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import select

from common.dns import Wire
from common.log import new_trace_id
from common.models import Event
from common.smtp import Limits
from mta import options, queue
from mta.courier import Attempt, Courier, Delivered
from mta.delivery import LocalDelivery, RemoteDelivery
from tests.harness.peers import MX, mx_server
from tests.harness.services import Stack
from tests.support.ports import free_port
from tests.support.suite import Installation, maildir_messages

pytestmark = pytest.mark.timeout(30)

SENDER = "carol@example.net"
BODY = b"From: Carol <carol@example.net>\r\nSubject: both ways\r\n\r\nOne message, two hops.\r\n"


@contextlib.asynccontextmanager
async def next_hops(inst: Installation) -> AsyncIterator[tuple[LocalDelivery, RemoteDelivery, MX]]:
    """Our MDA (on the harness's loop) and a remote SMTP peer (on this one) listening on loopback,
    and a courier for each."""
    stack = Stack(inst)
    _, mda_port = stack.listen_mda(limits=Limits(), hostname="mda.test")
    local = LocalDelivery(f"127.0.0.1:{mda_port}", hostname="mail.test", sessions=1, timeout=5)
    try:
        async with mx_server("127.0.0.1", 0, MX()) as peer:
            remote = RemoteDelivery(
                hostname="mail.test", resolver=Wire(["127.0.0.1"], 1.0), relayhost="", relayhost_auth=None,
                transport={"remote.test": f"127.0.0.1:{peer.port}"}, remote_port=25,
                per_destination=2, connect_timeout=2.0, timeout=5.0,
            )
            try:
                yield local, remote, peer
            finally:
                await remote.close()
    finally:
        await local.close()
        stack.close()


def attempt(trace: str, recipients: list[str], *, sender: str = SENDER, body: bytes = BODY,
            asked: options.Asked | None = None) -> Attempt:
    claimed = [queue.Claimed(n, a, a, 0) for n, a in enumerate(recipients, 1)]
    return Attempt(trace, sender, recipients, body, options.Outbound(asked or options.Asked(), claimed))


def test_both_couriers_take_one_attempt_and_answer_with_one_delivered(installation: Installation) -> None:
    async def go() -> tuple[Delivered, Delivered, str, str, MX]:
        async with next_hops(installation) as (local, remote, peer):
            trace = new_trace_id()
            couriers: list[Courier] = [local, remote]
            got = [
                await courier.deliver(attempt(trace, [rcpt]))
                for courier, rcpt in zip(couriers, ["alice@example.org", "dave@remote.test"], strict=True)
            ]
            return got[0], got[1], trace, str(local.lmtp), peer

    by_lmtp, by_smtp, trace, mda, peer = asyncio.run(go())
    [stored] = maildir_messages(installation.mailbox("alice@example.org"))
    assert b"One message, two hops." in stored.read_bytes()
    assert [(g.sender, g.recipients, g.content.replace(b"\r\n", b"\n").endswith(b"One message, two hops.\n"))
            for g in peer.received] == [(SENDER, ["dave@remote.test"], True)]
    # The same result type from both hops, one reply per recipient.
    assert isinstance(by_lmtp, Delivered) and isinstance(by_smtp, Delivered)
    assert [r.code for r in by_lmtp.replies] == [250] and [r.code for r in by_smtp.replies] == [250]
    # Who answered: the MDA's endpoint, the remote host's address.
    assert by_lmtp.host == mda and by_smtp.host == "127.0.0.1"
    # Our MDA offers XRECORD: it wrote no event and its 250 names the mailbox file, for
    # the queue manager to record.  A remote host records nothing of ours.
    assert by_lmtp.ours_to_record and not by_smtp.ours_to_record
    assert by_lmtp.paths == [str(stored)] and "path=" not in by_lmtp.replies[0].text
    db = installation.db()
    with db.read() as s:
        assert s.scalars(select(Event).where(Event.trace_id == trace)).all() == []
    db.close()
    # aiosmtpd offers no DSN: success is still ours to report.
    assert not by_lmtp.dsn_passed and not by_smtp.dsn_passed


def test_an_unreachable_hop_is_a_temporary_failure_with_no_host_from_either_courier() -> None:
    async def go() -> list[Delivered]:
        closed = free_port()  # nothing listens there
        local = LocalDelivery(f"127.0.0.1:{closed}", hostname="mail.test", sessions=1, timeout=2)
        remote = RemoteDelivery(
            hostname="mail.test", resolver=Wire(["127.0.0.1"], 1.0), relayhost="", relayhost_auth=None,
            transport={"remote.test": f"127.0.0.1:{closed}"}, remote_port=25, per_destination=1,
            connect_timeout=2.0, timeout=2.0,
        )
        couriers: list[Courier] = [local, remote]
        trace = new_trace_id()
        got = [
            await local.deliver(attempt(trace, ["alice@example.org", "bob@example.org"])),
            await remote.deliver(attempt(trace, ["dave@remote.test", "erin@remote.test"])),
        ]
        for courier in couriers:
            await courier.close()
        return got

    for got in asyncio.run(go()):
        assert len(got.replies) == 2 and all(r.is_temporary for r in got.replies), got
        assert got.host == "" and not got.ours_to_record and not got.dsn_passed


def test_each_courier_declares_what_its_hop_can_take(installation: Installation) -> None:
    # One message that needs SMTPUTF8 (RFC 6531): our MDA takes it (the courier says
    # SMTPUTF8); a remote host that does not offer the extension gets nothing, and
    # each recipient a permanent reply naming why.
    utf8_body = "From: Jörg <jörg@example.net>\r\nSubject: grüße\r\n\r\nhallo\r\n".encode()
    asked = options.Asked(smtputf8=True)

    async def go() -> tuple[Delivered, Delivered, MX]:
        async with next_hops(installation) as (local, remote, peer):
            trace = new_trace_id()
            by_lmtp = await local.deliver(attempt(trace, ["alice@example.org"], body=utf8_body, asked=asked))
            by_smtp = await remote.deliver(attempt(trace, ["dave@remote.test"], body=utf8_body, asked=asked))
            return by_lmtp, by_smtp, peer

    by_lmtp, by_smtp, peer = asyncio.run(go())
    assert [r.code for r in by_lmtp.replies] == [250], by_lmtp
    assert by_smtp.replies == [options.NEEDS_SMTPUTF8] and by_smtp.host == "127.0.0.1"
    assert peer.received == []
    [stored] = maildir_messages(installation.mailbox("alice@example.org"))
    assert "grüße".encode() in stored.read_bytes()


def test_a_retry_is_announced_to_our_mda_so_it_finds_the_copy_a_reader_moved(installation: Installation) -> None:
    # The first 250 was lost (a crash before the settle) and a mail reader has since
    # moved the message to cur/.  The next attempt says XRETRY, so the MDA looks in
    # cur/ too and answers from that copy instead of storing a second one.
    box = installation.mailbox("alice@example.org")

    async def go() -> tuple[Delivered, Delivered]:
        async with next_hops(installation) as (local, _, _):
            trace = new_trace_id()
            first = await local.deliver(attempt(trace, ["alice@example.org"]))
            [stored] = maildir_messages(box)
            stored.rename(box / "cur" / f"{stored.name}:2,S")
            again = await local.deliver(dataclasses.replace(attempt(trace, ["alice@example.org"]), retry=True))
            return first, again

    first, again = asyncio.run(go())
    assert [r.code for r in first.replies] == [250] and [r.code for r in again.replies] == [250]
    [kept] = maildir_messages(box)
    assert kept.parent.name == "cur" and again.paths == [str(kept)]
