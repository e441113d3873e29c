"""The queue manager in process, driven by a FakeClock, delivering to real sockets.

Remote MX hosts are scripted aiosmtpd servers on 127.0.0.x loopback addresses
(all on one port, `[mta] remote_port`), found through a real DNS server on a
loopback port (the rig and its peers: tests/harness/qmgr.py, peers.py).  They answer 250, 4xx or 5xx,
drop the connection after DATA, or stall.  The local hop is an LMTP server on
a socket.  Bounces travel back over SMTP to the sender's own scripted MX and
are parsed with Python's `email` package.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from sqlalchemy import update

from common.models import Message, Recipient
from common.reply import Reply
from common.smtp import Limits, MailEnvelope, MailSession
from common.tls import make_self_signed
from mta import queue, wakeup
from mta.courier import Attempt, Delivered
from mta.delivery import LocalDelivery
from mta.qmgr import Policy
from tests.harness.peers import MX, LMTPScript, lmtp_server, mx_server
from tests.harness.qmgr import BODY, IPS, SENDER, Rig, dns_server, port, rig_args
from tests.support.ports import free_port

__all__ = ["dns_server", "port", "rig_args"]  # the harness's fixtures, used here

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("tls")
    make_self_signed(d / "cert.pem", d / "key.pem", "mx.test")
    return d / "cert.pem", d / "key.pem"


# --- the MDA's part, as it answers XRECORD ----------------------------------------------


class RecordingMDA(LMTPScript):
    """Like our MDA when asked XRECORD: writes nothing, and its 250 names the path."""

    ehlo_keywords = ("XTRACE", "XRECORD")

    async def data(self, session: MailSession, envelope: MailEnvelope) -> list[Reply]:
        assert "XRECORD" in envelope.params
        self.transactions.append(list(envelope.rcpt_tos))
        return [self.outcomes.get(r, Reply(250, "2.0.0", f"Ok: delivered to maildir path=/mail/{r}"))
                for r in envelope.rcpt_tos]


def _status_blocks(msg: EmailMessage) -> list[Any]:
    assert msg.get_content_type() == "multipart/report" and msg.get_param("report-type") == "delivery-status"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "message/delivery-status", "text/rfc822-headers"]
    return list(parts[1].get_payload())


# --- the tests ---------------------------------------------------------------------------------


def test_remote_delivery_by_mx_with_starttls(rig_args: Any, tls_files: tuple[Path, Path]) -> None:
    async def go() -> None:
        rig = Rig(*rig_args)
        async with mx_server(IPS["ok"], rig_args[2], MX(), tls=tls_files) as mx:
            trace = rig.enqueue(["bob@ok.test", "carol@ok.test"])
            assert await rig.run() == 1
            await rig.close()
        assert len(mx.received) == 1  # one transaction for both recipients of the domain
        got = mx.received[0]
        assert got.tls  # opportunistic STARTTLS was used
        assert got.sender == SENDER and got.recipients == ["bob@ok.test", "carol@ok.test"]
        assert got.content.replace(b"\r\n", b"\n") == BODY.replace(b"\r\n", b"\n")
        rcpts = rig.recipients(trace)
        assert {r.state for r in rcpts.values()} == {"delivered"}
        assert rcpts["bob@ok.test"].last_reply == "250 2.0.0 Accepted"
        delivered = [e for e in rig.events(trace) if e.event == "delivered"]
        assert len(delivered) == 2 and all(IPS["ok"] in e.detail for e in delivered)

    asyncio.run(go())


def test_one_connection_carries_several_messages_to_one_destination(rig_args: Any) -> None:
    async def go() -> None:
        rig = Rig(*rig_args, per_destination=1)
        async with mx_server(IPS["ok"], rig_args[2], MX()) as mx:
            traces = [rig.enqueue([f"u{i}@ok.test"]) for i in range(4)]
            await rig.run()
            assert len(mx.received) == 4
            assert mx.connections == 1, mx.connections
            assert rig.remote.connections == 1
            # A cached session the server has since dropped is replaced, not a failure.
            for cached in rig.remote.idle["ok.test"]:
                cached.client.writer.transport.abort()
            trace = rig.enqueue(["late@ok.test"])
            await rig.run()
            assert len(mx.received) == 5 and mx.connections == 2
            await rig.close()
        for t in [*traces, trace]:
            assert {r.state for r in rig.recipients(t).values()} == {"delivered"}

    asyncio.run(go())


def test_concurrency_per_destination_is_limited(rig_args: Any) -> None:
    async def go() -> None:
        rig = Rig(*rig_args, per_destination=2)
        async with mx_server(IPS["ok"], rig_args[2], MX(delay=0.3)) as mx:
            for i in range(6):
                rig.enqueue([f"u{i}@ok.test"])
            await rig.run()
            await rig.close()
        assert len(mx.received) == 6
        assert mx.most_in_data == 2  # parallel, but never more than the limit
        assert mx.connections == 2

    asyncio.run(go())


def test_local_recipients_in_one_lmtp_transaction_with_one_outcome_each(rig_args: Any) -> None:
    async def go() -> None:
        script = LMTPScript({
            "bob@example.org": Reply(452, "4.2.2", "Mailbox full, try later"),
            "carol@example.org": Reply(550, "5.1.1", "No such mailbox"),
        })
        async with lmtp_server(script) as lmtp:
            rig = Rig(*rig_args, lmtp=lmtp)
            async with mx_server(IPS["sender"], rig_args[2], MX()) as sender_mx:
                trace = rig.enqueue(["alice@example.org", "bob@example.org", "carol@example.org"])
                await rig.run()
                assert script.transactions == [["alice@example.org", "bob@example.org", "carol@example.org"]]
                rcpts = rig.recipients(trace)
                assert rcpts["alice@example.org"].state == "delivered"
                assert rcpts["bob@example.org"].state == "queued"
                assert rcpts["bob@example.org"].next_attempt == rig.clock.now() + dt.timedelta(seconds=300)
                assert rcpts["bob@example.org"].last_reply == "452 4.2.2 Mailbox full, try later"
                assert rcpts["carol@example.org"].state == "bounced"
                await rig.run()  # the bounce for carol goes out
                assert len(sender_mx.received) == 1
                blocks = _status_blocks(sender_mx.received[0].parsed())
                assert [b["Final-Recipient"] for b in blocks[1:]] == ["rfc822; carol@example.org"]
                rig.clock.advance(300)
                script.outcomes.clear()
                await rig.run()  # bob's retry, alone
                assert script.transactions[-1] == ["bob@example.org"]
                assert rig.recipients(trace)["bob@example.org"].state == "delivered"
                await rig.close()

    asyncio.run(go())


def test_permanent_failures_make_one_bounce_to_the_sender(rig_args: Any) -> None:
    async def go() -> None:
        rig = Rig(*rig_args)
        hard = MX(refuse={"gone@ok.test": "550 5.1.1 <gone@ok.test>: no such user"})
        async with mx_server(IPS["ok"], rig_args[2], hard), \
                mx_server(IPS["hard"], rig_args[2], MX(mode="hard")), \
                mx_server(IPS["sender"], rig_args[2], MX()) as sender_mx:
            trace = rig.enqueue(["gone@ok.test", "here@ok.test", "x@hard.test"])
            await rig.run()
            rcpts = rig.recipients(trace)
            assert [rcpts[a].state for a in ("gone@ok.test", "here@ok.test", "x@hard.test")] == [
                "bounced", "delivered", "bounced"]
            await rig.run()  # the DSN is an ordinary queued message
            await rig.run()
            assert len(sender_mx.received) == 1  # one bounce for the message, not one per recipient
            got = sender_mx.received[0]
            await rig.close()
        assert got.sender == "<>" and got.recipients == [SENDER]  # null sender, to the envelope sender
        msg = got.parsed()
        assert msg["To"].addresses[0].addr_spec == SENDER
        assert "Undelivered" in msg["Subject"]
        per_message, *per_rcpt = _status_blocks(msg)
        assert per_message["Reporting-MTA"] == "dns; mail.test"
        by = {b["Final-Recipient"]: b for b in per_rcpt}
        assert set(by) == {"rfc822; gone@ok.test", "rfc822; x@hard.test"}
        gone = by["rfc822; gone@ok.test"]
        assert (gone["Action"], gone["Status"]) == ("failed", "5.1.1")
        assert gone["Diagnostic-Code"] == "smtp; 550 5.1.1 <gone@ok.test>: no such user"
        assert gone["Remote-MTA"] == f"dns; {IPS['ok']}"
        assert by["rfc822; x@hard.test"]["Status"] == "5.6.0"
        headers = list(msg.iter_parts())[2].get_content()
        assert "Subject: the plan" in headers and "Message-ID: <p@sender.test>" in headers
        assert "hello" not in headers
        with rig.db.read() as s:  # the original's body is gone from the queue once all is final
            m = s.get(Message, trace)
            assert m is not None and m.body is None

    asyncio.run(go())


def test_a_message_from_the_null_sender_is_never_bounced(rig_args: Any) -> None:
    async def go() -> None:
        rig = Rig(*rig_args)
        async with mx_server(IPS["hard"], rig_args[2], MX(mode="hard")):
            trace = rig.enqueue(["x@hard.test"], sender="")
            await rig.run()
            await rig.close()
        assert rig.recipients(trace)["x@hard.test"].state == "bounced"
        assert rig.dsns() == []

    asyncio.run(go())


def test_retry_schedule_delay_warning_once_and_expiry(rig_args: Any) -> None:
    async def go() -> None:
        policy = Policy([300.0, 600.0, 1200.0], max_queue_lifetime=3600.0, delay_warning=1000.0)
        rig = Rig(*rig_args, policy=policy)
        soft = MX(mode="soft")
        async with mx_server(IPS["soft"], rig_args[2], soft), \
                mx_server(IPS["sender"], rig_args[2], MX()) as sender_mx:
            start = rig.clock.now()
            trace = rig.enqueue(["bob@soft.test"])
            attempts_at: list[float] = []
            for _ in range(20):
                assert await rig.run() == 1  # due now: tried
                attempts_at.append((rig.clock.now() - start).total_seconds())
                r = rig.recipients(trace)["bob@soft.test"]
                if r.state != "queued":
                    break
                await rig.run()  # the delay warning, when one was queued
                # One second before the next attempt nothing is tried; at it, it is.
                rig.clock.advance((r.next_attempt - rig.clock.now()).total_seconds() - 1)
                assert await rig.run() == 0
                assert [e.event for e in rig.events(trace)].count("deferred") == len(attempts_at)
                rig.clock.advance(1)
            r = rig.recipients(trace)["bob@soft.test"]
            assert r.state == "expired"
            assert r.last_reply == "451 4.3.0 Try again later"
            await rig.run()  # deliver whatever DSNs are due
            rig.clock.advance(1)
            await rig.run()
            await rig.close()
        # Tries at 0, +5m, +10m later, then at the delay warning's time (1000 s: the
        # warning goes with that attempt, when it is due, not 20 minutes later), then
        # every 20m (the last wait repeats) until the message is older than max_queue_lifetime.
        assert attempts_at == [0, 300, 900, 1000, 2200, 3400, 4600], attempts_at
        assert r.attempts == 7
        assert len(rig.dsns()) == 2  # exactly one delay warning and one final bounce
        msgs = [x.parsed() for x in sender_mx.received]
        assert len(msgs) == 2
        warning, final = msgs
        assert "Delayed" in warning["Subject"]
        wblock = _status_blocks(warning)[1]
        assert (wblock["Action"], wblock["Status"]) == ("delayed", "4.3.0")
        fblock = _status_blocks(final)[1]
        assert (fblock["Action"], fblock["Status"]) == ("failed", "4.3.0")
        assert fblock["Diagnostic-Code"] == "smtp; 451 4.3.0 Try again later"
        events = [e.event for e in rig.events(trace)]
        assert events.count("dsn") == 2 and events[-2:] == ["expired", "dsn"]

    asyncio.run(go())


def test_dropped_after_data_and_stalled_servers_defer(rig_args: Any) -> None:
    async def go() -> None:
        rig = Rig(*rig_args, timeout=1.0)
        async with mx_server(IPS["drop"], rig_args[2], MX(mode="drop")), \
                mx_server(IPS["stall"], rig_args[2], MX(mode="stall")):
            t1 = rig.enqueue(["x@drop.test"])
            t2 = rig.enqueue(["x@stall.test"])
            t3 = rig.enqueue(["x@down.test"])  # nothing listens there
            await rig.run()
            await rig.close()
        for t, text in ((t1, "closed the connection"), (t2, "Timeout"), (t3, "Cannot connect")):
            r = next(iter(rig.recipients(t).values()))
            assert r.state == "queued" and r.last_reply.startswith("451 4.4."), r.last_reply
            assert text in r.last_reply
        assert rig.dsns() == []

    asyncio.run(go())


@pytest.mark.parametrize(("domain", "state", "reply"), [
    ("nullmx.test", "bounced", "556 5.1.10"),
    ("no-such-domain.test", "bounced", "550 5.1.2"),
    ("servfail.test", "queued", "451 4.4.3"),
    ("loop.test", "bounced", "554 5.4.6"),
])
def test_dns_outcomes(rig_args: Any, domain: str, state: str, reply: str) -> None:
    async def go() -> None:
        rig = Rig(*rig_args)
        trace = rig.enqueue([f"x@{domain}"], sender="")
        await rig.run()
        await rig.close()
        r = rig.recipients(trace)[f"x@{domain}"]
        assert r.state == state and r.last_reply.startswith(reply), r.last_reply

    asyncio.run(go())


def test_next_mx_and_a_record_fallback(rig_args: Any) -> None:
    async def go() -> None:
        rig = Rig(*rig_args)
        async with mx_server(IPS["backup"], rig_args[2], MX()) as backup, \
                mx_server(IPS["ok"], rig_args[2], MX()) as ok:
            t1 = rig.enqueue(["x@twomx.test"])  # preference 10 is down, 20 answers
            t2 = rig.enqueue(["x@nomx.test"])  # no MX: the domain's own A record
            await rig.run()
            await rig.close()
        assert [m.recipients for m in backup.received] == [["x@twomx.test"]]
        assert [m.recipients for m in ok.received] == [["x@nomx.test"]]
        assert rig.recipients(t1)["x@twomx.test"].state == "delivered"
        assert rig.recipients(t2)["x@nomx.test"].state == "delivered"

    asyncio.run(go())


def test_transport_map_overrides_mx(rig_args: Any) -> None:
    async def go() -> None:
        tmp, dns, port = rig_args
        rig = Rig(tmp, dns, port, transport={"ok.test": f"{IPS['transport']}:{port}"})
        async with mx_server(IPS["transport"], port, MX()) as chosen, mx_server(IPS["ok"], port, MX()) as mx:
            rig.enqueue(["x@ok.test"])
            dns.clear_queries()
            await rig.run()
            await rig.close()
        assert len(chosen.received) == 1 and mx.received == []
        assert ("ok.test", "MX") not in dns.queries()

    asyncio.run(go())


def test_relayhost_with_auth_over_verified_tls(rig_args: Any, tls_files: tuple[Path, Path]) -> None:
    async def go() -> None:
        tmp, dns, port = rig_args
        # The relay's certificate names 127.0.0.1; the CA file is that self-signed certificate.
        relay_port = free_port()
        relay = f"127.0.0.1:{relay_port}"
        ca = str(tls_files[0])
        rig = Rig(tmp, dns, port, relayhost=relay, relayhost_auth=("relayuser", "s3cret"), relayhost_ca_file=ca)
        async with mx_server("127.0.0.1", relay_port, MX(), tls=tls_files, auth=True) as smart:
            trace = rig.enqueue(["x@nullmx.test", "y@ok.test"])  # MX records do not matter
            await rig.run()
            await rig.close()
            assert len(smart.received) == 2
            assert all(m.tls and m.login == "relayuser" for m in smart.received)
            assert {r.state for r in rig.recipients(trace).values()} == {"delivered"}
            # A wrong password keeps the mail (our misconfiguration), it does not bounce it.
            rig = Rig(tmp, dns, port, relayhost=relay, relayhost_auth=("relayuser", "wrong"), relayhost_ca_file=ca)
            trace = rig.enqueue(["z@ok.test"])
            await rig.run()
            await rig.close()
        r = rig.recipients(trace)["z@ok.test"]
        assert r.state == "queued" and r.last_reply.startswith("451 4.7.0"), r.last_reply
        assert len(smart.received) == 2

    asyncio.run(go())


def test_relayhost_certificate_is_verified_by_default(rig_args: Any, tls_files: tuple[Path, Path]) -> None:
    """A relay whose certificate no known CA signed (anyone in the middle) gets neither mail nor password."""
    async def go() -> None:
        tmp, dns, port = rig_args
        relay_port = free_port()
        rig = Rig(tmp, dns, port, relayhost=f"127.0.0.1:{relay_port}", relayhost_auth=("relayuser", "s3cret"))
        async with mx_server("127.0.0.1", relay_port, MX(), tls=tls_files, auth=True) as smart:
            trace = rig.enqueue(["x@ok.test"])
            await rig.run()
            await rig.close()
        assert smart.logins == [] and smart.received == []
        r = rig.recipients(trace)["x@ok.test"]
        assert r.state == "queued", r.state  # deferred, kept for when the operator fixes it
        assert r.last_reply.startswith("451 4.7.5") and "certificate verify failed" in r.last_reply, r.last_reply

    asyncio.run(go())


def test_relayhost_without_starttls_never_gets_the_password(rig_args: Any) -> None:
    async def go() -> None:
        tmp, dns, port = rig_args
        relay_port = free_port()
        rig = Rig(tmp, dns, port, relayhost=f"127.0.0.1:{relay_port}", relayhost_auth=("relayuser", "s3cret"))
        async with mx_server("127.0.0.1", relay_port, MX(), auth=True) as smart:
            trace = rig.enqueue(["x@ok.test"])
            await rig.run()
            await rig.close()
        assert smart.logins == [] and smart.received == []
        r = rig.recipients(trace)["x@ok.test"]
        assert r.state == "queued" and r.last_reply.startswith("451 4.7."), r.last_reply

    asyncio.run(go())


def test_relayhost_verification_is_off_only_when_the_operator_says_so(
    rig_args: Any, tls_files: tuple[Path, Path]
) -> None:
    async def go() -> None:
        tmp, dns, port = rig_args
        relay_port = free_port()
        rig = Rig(tmp, dns, port, relayhost=f"127.0.0.1:{relay_port}", relayhost_auth=("relayuser", "s3cret"),
                  relayhost_tls_verify=False)
        async with mx_server("127.0.0.1", relay_port, MX(), tls=tls_files, auth=True) as smart:
            trace = rig.enqueue(["x@ok.test"])
            await rig.run()
            await rig.close()
        assert [m.login for m in smart.received] == ["relayuser"] and smart.received[0].tls
        assert rig.recipients(trace)["x@ok.test"].state == "delivered"

    asyncio.run(go())


def test_a_pooled_lmtp_session_the_mda_closed_when_idle_does_not_delay_mail(rig_args: Any) -> None:
    """After a quiet spell longer than the MDA's idle timeout, the next message goes at once."""
    async def go() -> None:
        script = LMTPScript({})
        async with lmtp_server(script, limits=Limits(idle_timeout=0.3)) as lmtp:
            rig = Rig(*rig_args, lmtp=lmtp)
            first = rig.enqueue(["alice@example.org"])
            await rig.run()
            assert rig.recipients(first)["alice@example.org"].state == "delivered"
            assert len(rig.local.idle) == 1  # the session is pooled...
            await asyncio.sleep(1.0)  # ...and the MDA closes it (421 4.4.2 idle timeout)
            second = rig.enqueue(["bob@example.org"])
            await rig.run()  # the clock has not moved: a deferral would wait for the next retry
            r = rig.recipients(second)["bob@example.org"]
            assert (r.state, r.last_reply) == ("delivered", "250 2.0.0 Saved"), r.last_reply
            assert script.transactions == [["alice@example.org"], ["bob@example.org"]]
            assert not any(e.event == "deferred" for e in rig.events(second))
            await rig.close()

    asyncio.run(go())


def test_a_pooled_smtp_session_the_remote_host_closed_does_not_delay_mail(rig_args: Any) -> None:
    async def go() -> None:
        rig = Rig(*rig_args)
        async with mx_server(IPS["ok"], rig_args[2], MX(), idle_timeout=0.3) as mx:
            first = rig.enqueue(["a@ok.test"])
            await rig.run()
            assert len(rig.remote.idle["ok.test"]) == 1
            await asyncio.sleep(1.0)  # the remote host's idle timeout closes the cached session
            second = rig.enqueue(["b@ok.test"])
            await rig.run()
            await rig.close()
        assert [m.recipients for m in mx.received] == [["a@ok.test"], ["b@ok.test"]]
        assert mx.connections == 2
        for t in (first, second):
            assert {r.state for r in rig.recipients(t).values()} == {"delivered"}

    asyncio.run(go())


@dataclass
class ClosingAfterProbe(MX):
    """Answers the reuse probe (RSET), then closes with 421 at the next MAIL: a host shutting down."""

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if getattr(session, "probed", False):
            assert server.transport is not None
            server.transport.close()
            return "421 4.3.2 Shutting down"
        envelope.mail_from = address
        return "250 OK"

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        session.probed = True  # type: ignore[attr-defined]
        return "250 OK"


def test_a_pooled_smtp_session_that_fails_before_mail_is_accepted_is_replaced_at_once(rig_args: Any) -> None:
    async def go() -> None:
        rig = Rig(*rig_args)
        async with mx_server(IPS["ok"], rig_args[2], ClosingAfterProbe()) as mx:
            first = rig.enqueue(["a@ok.test"])
            await rig.run()
            second = rig.enqueue(["b@ok.test"])
            await rig.run()
            await rig.close()
        assert [m.recipients for m in mx.received] == [["a@ok.test"], ["b@ok.test"]]
        assert mx.connections == 2
        for t in (first, second):
            assert {r.state for r in rig.recipients(t).values()} == {"delivered"}

    asyncio.run(go())


@pytest.mark.parametrize("records", [True, False])
def test_the_mdas_outcomes_are_recorded_with_the_settle_when_it_leaves_them_to_us(
    rig_args: Any, records: bool
) -> None:
    async def go() -> None:
        outcomes = {"bob@example.org": Reply(552, "5.2.2", "Mailbox full")}
        script = RecordingMDA(outcomes) if records else LMTPScript(outcomes)
        async with lmtp_server(script) as lmtp:
            rig = Rig(*rig_args, lmtp=lmtp)
            trace = rig.enqueue(["alice@example.org", "bob@example.org"], sender="")
            await rig.run()
            got = [(e.hop, e.event, e.recipient, e.path, e.detail) for e in rig.events(trace) if e.hop != "mta"]
            await rig.close()
        if records:
            assert got == [
                ("mda", "delivered", "alice@example.org", "/mail/alice@example.org",
                 "250 2.0.0 Ok: delivered to maildir"),
                ("qmgr", "delivered", "alice@example.org", "", "250 2.0.0 Ok: delivered to maildir"),
                ("mda", "refused", "bob@example.org", "", "552 5.2.2 Mailbox full"),
                ("qmgr", "bounced", "bob@example.org", "", "552 5.2.2 Mailbox full"),
            ]
        else:  # an MDA that records its own events: nothing of its hop from us
            assert [(hop, event) for hop, event, *_ in got] == [("qmgr", "delivered"), ("qmgr", "bounced")]

    asyncio.run(go())


def test_a_success_notice_for_a_local_delivery_names_no_mailbox_path(rig_args: Any) -> None:
    # The MDA's 250 names the file it stored the copy in (XRECORD, common/lmtp_ext.py),
    # for our trace alone: the sender's notice quotes the reply without it.
    async def go() -> None:
        from common.log import new_trace_id

        script = RecordingMDA({})
        async with lmtp_server(script) as lmtp:
            rig = Rig(*rig_args, lmtp=lmtp)
            trace = new_trace_id()
            with rig.db.write() as s:
                queue.enqueue(s, trace=trace, sender=SENDER, body=BODY, now=rig.clock.now(), recipients=[
                    queue.QueuedRecipient("alice@example.org", "alice@example.org", notify="SUCCESS")])
                s.commit()
            await rig.run()
            [notice] = rig.dsns()
            stored = [e.path for e in rig.events(trace) if e.hop == "mda"]
            await rig.close()
        assert stored == ["/mail/alice@example.org"]  # the trace has it
        assert notice.body is not None and b"Diagnostic-Code: smtp; 250 2.0.0 Ok: delivered to maildir\n" in (
            notice.body.replace(b"\r\n", b"\n"))
        assert b"path=" not in notice.body and b"/mail/" not in notice.body

    asyncio.run(go())


class _BrokenLocal(LocalDelivery):
    async def deliver(self, attempt: Attempt) -> Delivered:
        raise RuntimeError("a bug in the hand-off")


def test_an_unexpected_error_in_a_hand_off_defers_the_recipients_instead_of_leaving_them_active(
    rig_args: Any,
) -> None:
    # Left "active", a recipient would wait for the queue manager's next restart.
    async def go() -> None:
        rig = Rig(*rig_args)
        rig.qm.local = _BrokenLocal("127.0.0.1:9", hostname="mail.test", sessions=1, timeout=1)
        trace = rig.enqueue(["alice@example.org"])
        await rig.run()
        r = rig.recipients(trace)["alice@example.org"]
        assert (r.state, r.owner) == ("queued", ""), (r.state, r.owner)
        assert r.last_reply.startswith("451 4.3.0") and "RuntimeError" in r.last_reply
        assert r.next_attempt == rig.clock.now() + dt.timedelta(seconds=1)  # the short local schedule
        await rig.close()

    asyncio.run(go())


def test_a_local_error_of_our_own_mda_is_retried_on_the_short_local_schedule(rig_args: Any) -> None:
    # A busy database or a failed session at the MDA is over in seconds; a 4.2.x
    # (a full or busy mailbox) waits like any other temporary refusal.
    async def go() -> None:
        script = LMTPScript({
            "alice@example.org": Reply(451, "4.3.0", "Local error in processing, try again later"),
            "bob@example.org": Reply(452, "4.2.2", "Mailbox full"),
        })
        async with lmtp_server(script) as lmtp:
            rig = Rig(*rig_args, lmtp=lmtp)
            trace = rig.enqueue(["alice@example.org", "bob@example.org"])
            await rig.run()
            got = rig.recipients(trace)
            now = rig.clock.now()
            assert got["alice@example.org"].next_attempt == now + dt.timedelta(seconds=1)
            assert got["bob@example.org"].next_attempt == now + dt.timedelta(seconds=300)
            await rig.close()

    asyncio.run(go())


class _RetryAwareMDA(LMTPScript):
    ehlo_keywords = ("XTRACE", "XRETRY")

    def __init__(self) -> None:
        super().__init__({})
        self.params: list[set[str]] = []

    async def data(self, session: MailSession, envelope: MailEnvelope) -> list[Reply]:
        self.params.append(set(envelope.params))
        return await super().data(session, envelope)


def test_a_hand_off_after_a_crash_cut_an_attempt_short_says_it_is_a_retry(rig_args: Any) -> None:
    # The queue manager died holding the claim (the MDA may have stored the message
    # and its 250 was lost): the next hand-off says XRETRY, so the MDA looks harder.
    async def go() -> None:
        script = _RetryAwareMDA()
        async with lmtp_server(script) as lmtp:
            rig = Rig(*rig_args, lmtp=lmtp)
            first = rig.enqueue(["alice@example.org"])
            with rig.db.write() as s:
                queue.claim(s, "mail.test:999999999.1", rig.clock.now())  # a queue manager since killed
                assert queue.release_stale(s, "mail.test") == 1
            await rig.run()
            second = rig.enqueue(["bob@example.org"])
            await rig.run()
            pairs = ((first, "alice@example.org"), (second, "bob@example.org"))
            assert [rig.recipients(t)[a].state for t, a in pairs] == ["delivered", "delivered"]
            assert ["XRETRY" in p for p in script.params] == [True, False]
            await rig.close()

    asyncio.run(go())


def test_a_message_named_by_the_mtas_wake_up_is_claimed_at_once_without_a_scan(rig_args: Any) -> None:
    # The scan interval is an hour: only the wake-up can bring the message in
    # time, and it claims the message it names, not everything due.
    async def go() -> None:
        script = LMTPScript({})
        async with lmtp_server(script) as lmtp:
            rig = Rig(*rig_args, lmtp=lmtp)
            sock = rig_args[0] / "qmgr.sock"
            transport = await rig.qm.listen(sock)
            stop = asyncio.Event()
            serving = asyncio.create_task(rig.qm.serve(stop, poll_interval=3600.0))
            try:
                await asyncio.sleep(0.3)  # the scan at start has found the queue empty
                unnamed = rig.enqueue(["alice@example.org"])  # queued, but nobody said so
                named = rig.enqueue(["bob@example.org"])
                wakeup.send(sock, named)
                for _ in range(100):
                    if rig.recipients(named)["bob@example.org"].state == "delivered":
                        break
                    await asyncio.sleep(0.05)
                assert rig.recipients(named)["bob@example.org"].state == "delivered"
                assert script.transactions == [["bob@example.org"]]
                assert rig.recipients(unnamed)["alice@example.org"].state == "queued"
                wakeup.send(sock)  # a wake-up naming nothing (`mailroom queue flush`): a scan
                for _ in range(100):
                    if rig.recipients(unnamed)["alice@example.org"].state == "delivered":
                        break
                    await asyncio.sleep(0.05)
                assert rig.recipients(unnamed)["alice@example.org"].state == "delivered"
            finally:
                stop.set()
                await asyncio.wait_for(serving, 10)
                transport.close()
                await rig.close()

    asyncio.run(go())


def test_a_bounce_queued_by_the_settle_goes_out_without_waiting_for_a_scan(rig_args: Any) -> None:
    async def go() -> None:
        script = LMTPScript({"carol@example.org": Reply(550, "5.1.1", "No such mailbox")})
        async with lmtp_server(script) as lmtp:
            rig = Rig(*rig_args, lmtp=lmtp)
            sock = rig_args[0] / "qmgr.sock"
            transport = await rig.qm.listen(sock)
            stop = asyncio.Event()
            async with mx_server(IPS["sender"], rig_args[2], MX()) as sender_mx:
                serving = asyncio.create_task(rig.qm.serve(stop, poll_interval=3600.0))
                try:
                    await asyncio.sleep(0.3)
                    wakeup.send(sock, rig.enqueue(["carol@example.org"]))
                    for _ in range(100):
                        if sender_mx.received:
                            break
                        await asyncio.sleep(0.05)
                    assert len(sender_mx.received) == 1  # the bounce, claimed by its id after the settle
                finally:
                    stop.set()
                    await asyncio.wait_for(serving, 10)
                    transport.close()
                    await rig.close()

    asyncio.run(go())


def test_the_body_stays_while_a_recipient_outside_the_round_is_unfinished(rig_args: Any) -> None:
    # A settle that finishes every recipient the claim found unfinished drops the
    # body without reading the states again; one that does not must leave it.
    async def go() -> None:
        script = LMTPScript({})
        async with lmtp_server(script) as lmtp:
            rig = Rig(*rig_args, lmtp=lmtp)
            trace = rig.enqueue(["alice@example.org", "bob@example.org"])
            with rig.db.write() as s:  # bob is not due yet: this round takes alice alone
                s.execute(update(Recipient).where(Recipient.address == "bob@example.org")
                          .values(next_attempt=rig.clock.now() + dt.timedelta(seconds=60)))
                s.commit()
            await rig.run()
            assert script.transactions == [["alice@example.org"]]
            with rig.db.read() as s:
                assert s.get(Message, trace).body is not None  # type: ignore[union-attr]
            rig.clock.advance(60)
            await rig.run()
            assert script.transactions == [["alice@example.org"], ["bob@example.org"]]
            with rig.db.read() as s:
                assert s.get(Message, trace).body is None  # type: ignore[union-attr]
            await rig.close()

    asyncio.run(go())
