"""What the sender asked of delivery, honoured by the queue manager against real next hops.

DSN (RFC 3461): NOTIFY decides which notices go out (NEVER, SUCCESS,
FAILURE, DELAY); a success notice says "delivered" when we were the last hop
and "relayed" when the next hop has no DSN; a hop that offers DSN gets
NOTIFY, ORCPT, RET and ENVID and reports success itself.  RET=FULL returns
the whole message, RET=HDRS only its header; ENVID and ORCPT come back in the
report.  8BITMIME and SMTPUTF8 (RFC 6152, RFC 6531) are declared to a hop
that offers them; one that lacks them gets nothing and the recipient
bounces (5.6.3, 5.6.7).  REQUIRETLS (RFC 8689) mail goes only over TLS whose
certificate names the MX, to a hop that offers REQUIRETLS, else it bounces
(5.7.10).

The next hops are real listeners on loopback: our own engine where DSN or
REQUIRETLS must be offered (aiosmtpd refuses their parameters), scripted
aiosmtpd hosts where they must not be (tests/harness/peers.py).
"""

from __future__ import annotations

import asyncio
import email
import email.policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP
from aiosmtpd.smtp import Envelope as AioEnvelope
from aiosmtpd.smtp import Session as AioSession
from sqlalchemy import select

from common.models import Message
from common.reply import Reply
from common.tls import make_self_signed
from mta.qmgr import Policy
from tests.harness.peers import MX, LMTPScript, Peer, lmtp_server, mx_server, peer_server
from tests.harness.qmgr import BODY, IPS, Rig, dns_server, enqueue, port, rig_args, state

__all__ = ["dns_server", "port", "rig_args"]  # the harness's fixtures, used here

pytestmark = pytest.mark.timeout(30)

BODY_8BIT = BODY.replace(b"hello", "h\u00e9llo".encode())
BODY_UTF8 = BODY.replace(b"Subject: the plan", "Subject: le plan \u00e9t\u00e9".encode())


class No8Bit(MX):
    """An aiosmtpd host that does not offer 8BITMIME."""

    async def handle_EHLO(self, server: SMTP, session: AioSession, envelope: AioEnvelope, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        return [r for r in responses if "8BITMIME" not in r]


def notices(rig: Rig) -> list[EmailMessage]:
    with rig.db.read() as s:
        bodies = s.scalars(select(Message.body).where(Message.is_bounce.is_(True)).order_by(Message.received)).all()
    out = []
    for b in bodies:
        assert b is not None
        msg = email.message_from_bytes(b, policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        out.append(msg)
    return out


def blocks(msg: EmailMessage) -> list[Any]:
    parts = list(msg.iter_parts())
    assert parts[1].get_content_type() == "message/delivery-status"
    return list(parts[1].get_payload())


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    d = tmp_path_factory.mktemp("certs")
    out = {}
    for name in ("mx.ok.test", "someone-else.test"):
        make_self_signed(d / f"{name}.pem", d / f"{name}.key", name)
        out[name] = (d / f"{name}.pem", d / f"{name}.key")
    return out


# --- DSN ------------------------------------------------------------------------------------------


def test_notify_never_silences_the_bounce_and_success_is_reported_as_relayed(rig_args: Any) -> None:
    async def go() -> None:
        rig = Rig(*rig_args)
        async with mx_server(IPS["ok"], rig_args[2], MX()) as ok, mx_server(IPS["hard"], rig_args[2], MX(mode="hard")):
            trace = enqueue(rig, {
                "x@hard.test": ("NEVER", ""),
                "y@ok.test": ("SUCCESS", "rfc822;Why@orig.test"),
                "z@ok.test": ("FAILURE", ""),  # delivered, but asked only about failure
            }, envid="ENV-42", ret="FULL")
            await rig.run()
            await rig.close()
        assert state(rig, trace, "x@hard.test")[0] == "bounced"
        assert len(ok.received) == 1
        [notice] = notices(rig)  # no bounce for NOTIFY=NEVER, one success notice
        assert "Successful" in notice["Subject"]
        per_message, *per_rcpt = blocks(notice)
        assert per_message["Original-Envelope-Id"] == "ENV-42"
        assert [(b["Final-Recipient"], b["Action"], b["Original-Recipient"]) for b in per_rcpt] == [
            ("rfc822; y@ok.test", "relayed", "rfc822; Why@orig.test")]  # aiosmtpd offers no DSN
        returned = list(notice.iter_parts())[2]
        assert returned.get_content_type() == "message/rfc822"  # RET=FULL: the whole message
        assert b"hello" in returned.as_bytes()

    asyncio.run(go())


def test_local_delivery_success_notice_and_ret_hdrs_bounce(rig_args: Any) -> None:
    async def go() -> None:
        script = LMTPScript({"gone@example.org": Reply(550, "5.1.1", "No such mailbox"),
                             "quiet@example.org": Reply(550, "5.1.1", "No such mailbox")})
        async with lmtp_server(script) as lmtp:
            rig = Rig(*rig_args, lmtp=lmtp)
            trace = enqueue(rig, {
                "here@example.org": ("SUCCESS,FAILURE", ""),
                "gone@example.org": ("FAILURE", "rfc822;old-gone@example.org"),
                "quiet@example.org": ("NEVER", ""),
            }, ret="HDRS", envid="E 7")
            await rig.run()
            await rig.close()
        assert state(rig, trace, "here@example.org")[0] == "delivered"
        bounce, success = sorted(notices(rig), key=lambda m: str(m["Subject"]))[::-1]
        assert "Undelivered" in bounce["Subject"] and "Successful" in success["Subject"]
        per_message, *per_rcpt = blocks(bounce)
        assert per_message["Original-Envelope-Id"] == "E 7"
        assert [(b["Final-Recipient"], b["Original-Recipient"]) for b in per_rcpt] == [
            ("rfc822; gone@example.org", "rfc822; old-gone@example.org")]  # not quiet@ (NEVER)
        returned = list(bounce.iter_parts())[2]
        assert returned.get_content_type() == "text/rfc822-headers"  # RET=HDRS
        assert "Subject: the plan" in returned.get_content() and "hello" not in returned.get_content()
        [ok] = blocks(success)[1:]
        assert (ok["Final-Recipient"], ok["Action"], ok["Status"]) == ("rfc822; here@example.org", "delivered", "2.0.0")

    asyncio.run(go())


def test_a_hop_that_offers_dsn_gets_the_parameters_and_reports_success_itself(rig_args: Any) -> None:
    async def go() -> None:
        rig = Rig(*rig_args)
        async with peer_server(IPS["ok"], rig_args[2], Peer(dsn=True)) as peer:
            enqueue(rig, {"y@ok.test": ("SUCCESS,DELAY", "rfc822;Y+Z=@orig.test"), "w@ok.test": ("", "")},
                    envid="id=1+2", ret="HDRS")
            await rig.run()
            await rig.close()
        [got] = peer.got
        assert got.params["RET"] == "HDRS" and got.params["ENVID"] == "id=1+2"  # xtext on the wire, decoded there
        assert got.rcpt_params == {
            "y@ok.test": {"NOTIFY": "SUCCESS,DELAY", "ORCPT": "rfc822;Y+Z=@orig.test"}, "w@ok.test": {}}
        assert notices(rig) == []  # the next hop reports success, not us

    asyncio.run(go())


def test_notify_decides_the_delay_warning(rig_args: Any) -> None:
    async def go() -> None:
        policy = Policy([300.0], max_queue_lifetime=86400.0, delay_warning=600.0)
        rig = Rig(*rig_args, policy=policy)
        async with mx_server(IPS["soft"], rig_args[2], MX(mode="soft")):
            enqueue(rig, {"a@soft.test": ("FAILURE", "")})
            enqueue(rig, {"b@soft.test": ("DELAY", "")})
            enqueue(rig, {"c@soft.test": ("", "")})  # the default includes delays
            for _ in range(4):
                await rig.run()
                rig.clock.advance(300)
            await rig.close()
        warned = sorted(b["Final-Recipient"] for m in notices(rig) for b in blocks(m)[1:])
        assert warned == ["rfc822; b@soft.test", "rfc822; c@soft.test"]

    asyncio.run(go())


# --- 8BITMIME and SMTPUTF8 -------------------------------------------------------------------------


def test_8bit_body_is_declared_or_bounced_with_5_6_3(rig_args: Any) -> None:
    async def go() -> None:
        rig = Rig(*rig_args)
        async with peer_server(IPS["ok"], rig_args[2], Peer()) as peer, \
                mx_server(IPS["backup"], rig_args[2], No8Bit()) as old:
            t1 = enqueue(rig, {"a@ok.test": ("", "")}, body=BODY_8BIT, body_type="8BITMIME")
            t2 = enqueue(rig, {"b@backup.test": ("", "")}, body=BODY_8BIT, body_type="8BITMIME")
            t3 = enqueue(rig, {"c@backup.test": ("", "")}, body=BODY, body_type="8BITMIME")  # 7-bit after all
            await rig.run()
            await rig.close()
        assert state(rig, t1, "a@ok.test")[0] == "delivered"
        assert peer.got[0].params.get("BODY") == "8BITMIME" and "h\u00e9llo".encode() in peer.got[0].content
        s, reply = state(rig, t2, "b@backup.test")
        assert s == "bounced" and reply.startswith("554 5.6.3"), reply
        assert state(rig, t3, "c@backup.test")[0] == "delivered"
        assert len(old.received) == 1

    asyncio.run(go())


def test_utf8_mail_is_declared_or_bounced_with_5_6_7(rig_args: Any) -> None:
    async def go() -> None:
        rig = Rig(*rig_args)
        async with peer_server(IPS["ok"], rig_args[2], Peer()) as peer, \
                peer_server(IPS["backup"], rig_args[2], Peer(), utf8=False) as ascii_only:
            t1 = enqueue(rig, {"a@ok.test": ("", "")}, body=BODY_UTF8, smtputf8=True)
            t2 = enqueue(rig, {"b@backup.test": ("", "")}, body=BODY_UTF8, smtputf8=True)
            t3 = enqueue(rig, {"j\u00f6rg@backup.test": ("", "")}, body=BODY, smtputf8=True)
            t4 = enqueue(rig, {"c@backup.test": ("", "")}, body=BODY, smtputf8=True)  # all ASCII after all
            await rig.run()
            await rig.close()
        assert state(rig, t1, "a@ok.test")[0] == "delivered" and "SMTPUTF8" in peer.got[0].params
        for trace, rcpt in ((t2, "b@backup.test"), (t3, "j\u00f6rg@backup.test")):
            s, reply = state(rig, trace, rcpt)
            assert s == "bounced" and reply.startswith("553 5.6.7"), reply
        assert state(rig, t4, "c@backup.test")[0] == "delivered"
        assert [set(g.params) - {"SIZE"} for g in ascii_only.got] == [set()]

    asyncio.run(go())


# --- REQUIRETLS -------------------------------------------------------------------------------------


def test_requiretls_goes_only_over_verified_tls_to_a_hop_that_offers_it(
    rig_args: Any, certs: dict[str, tuple[Path, Path]]
) -> None:
    async def go() -> None:
        tmp, dns, port = rig_args
        good, wrong = certs["mx.ok.test"], certs["someone-else.test"]

        async def attempt(peer: Peer, tls: tuple[Path, Path] | None, ca: Path) -> tuple[str, str]:
            rig = Rig(tmp, dns, port, remote_ca_file=str(ca))
            async with peer_server(IPS["ok"], port, peer, tls=tls):
                trace = enqueue(rig, {"a@ok.test": ("", "")}, requiretls=True)
                await rig.run()
                await rig.close()
            return state(rig, trace, "a@ok.test")

        ok = Peer(requiretls=True)
        assert (await attempt(ok, good, good[0]))[0] == "delivered"
        assert ok.got[0].tls and "REQUIRETLS" in ok.got[0].params
        for peer, tls, ca in (
            (Peer(requiretls=True), None, good[0]),  # no STARTTLS at all
            (Peer(requiretls=True), wrong, wrong[0]),  # a valid certificate for another name
            (Peer(requiretls=True), good, wrong[0]),  # a certificate no trusted CA signed
            (Peer(requiretls=False), good, good[0]),  # verified, but the hop would not keep the promise
        ):
            s, reply = await attempt(peer, tls, ca)
            assert s == "bounced" and reply.startswith("550 5.7.10"), reply
            assert peer.got == []

    asyncio.run(go())


def test_plain_mail_still_goes_over_opportunistic_tls(rig_args: Any, certs: dict[str, tuple[Path, Path]]) -> None:
    async def go() -> None:
        rig = Rig(*rig_args)
        async with peer_server(IPS["ok"], rig_args[2], Peer(), tls=certs["someone-else.test"]) as peer:
            trace = enqueue(rig, {"a@ok.test": ("", "")})
            await rig.run()
            await rig.close()
        assert state(rig, trace, "a@ok.test")[0] == "delivered" and peer.got[0].tls
        assert "REQUIRETLS" not in peer.got[0].params

    asyncio.run(go())
