"""MailAuth (mta/auth/mailauth.py): the hooks built from values, no config or daemon needed,
and the daemons' `Current`, which builds them again when a reload brings a new config."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from common import config as configmod
from common.config import Config
from common.db import Database
from common.models import DMARCVerdict
from mta.auth import dkim, srs
from mta.auth.mailauth import AuthPolicy, Current, MailAuth
from tests.harness.dns import FakeResolver

pytestmark = pytest.mark.timeout(30)

SENDER_IP = "192.0.2.10"
OUTSIDE = (
    b"From: Alice <alice@example.net>\r\nTo: bob@example.org\r\nSubject: hello\r\n"
    b"Message-ID: <1@example.net>\r\n\r\nHello Bob.\r\n"
)
OURS = b"From: Bob <bob@example.org>\r\nTo: carol@remote.test\r\nSubject: out\r\n\r\nHi.\r\n"


def policy(**changes: Any) -> AuthPolicy:
    values: dict[str, Any] = dict(
        hostname="mail.example.org", local_domains=("example.org",), forwarder_domain="example.org",
        sign=True, check=True, dmarc_reject=True, defer_on_dns_error=True, quarantine_header="X-Q",
        dns_timeout=5.0, filter_when_down="accept_unscanned", dnsbl_zones=(), dmarc_reports=False,
    )
    values.update(changes)
    return AuthPolicy(**values)


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("keys") / "dkim"
    dkim.generate(folder, "example.org", "s1")
    return folder


def made(
    key_dir: Path, resolver: FakeResolver | None = None, db: Database | None = None, **changes: Any
) -> MailAuth:
    """A MailAuth from values alone: no config file, no context, no module state."""
    return MailAuth(
        policy=policy(**changes), signer=dkim.Signer(key_dir, {}), resolver=resolver or FakeResolver({}),
        srs_codec=srs.SRS(b"a secret of this test", "example.org"), db=db,
    )


def test_srs_both_ways_with_the_codec_it_was_given(key_dir: Path) -> None:
    auth = made(key_dir)
    rewritten = auth.forward_sender("alice@example.net", original="list@example.org", recipient="x@remote.test")
    assert rewritten.startswith("SRS0=") and rewritten.endswith("@example.org")
    assert auth.rewrite_recipient(rewritten) == "alice@example.net"
    # Another installation's secret: its addresses are forgeries here.
    other = srs.SRS(b"another secret", "example.org").forward("alice@example.net")
    assert auth.rewrite_recipient(other) == srs.FORGED
    assert auth.rewrite_recipient("bob@example.org") is None
    # Delivered inside our domains, or sent by us: the sender stays.
    assert auth.forward_sender("alice@example.net", original="list@example.org", recipient="bob@example.org") == (
        "alice@example.net"
    )
    assert auth.forward_sender("bob@example.org", original="list@example.org", recipient="x@remote.test") == (
        "bob@example.org"
    )


def test_signing_follows_the_policy_it_was_given(key_dir: Path) -> None:
    signed = asyncio.run(made(key_dir).sign_outgoing(OURS, trusted=True, recipients=["carol@remote.test"]))
    assert signed.count(b"DKIM-Signature:") == 2 and b"d=example.org" in signed
    unsigned = asyncio.run(made(key_dir, sign=False).sign_outgoing(OURS, trusted=True, recipients=["c@remote.test"]))
    assert unsigned == b""


def test_inbound_checks_use_the_resolver_and_policy_given(key_dir: Path) -> None:
    records = {"example.net": {"TXT": ["v=spf1 -all"]}, "_dmarc.example.net": {"TXT": ["v=DMARC1; p=reject"]}}
    resolver = FakeResolver(records)
    auth = made(key_dir, resolver)
    refused = asyncio.run(auth.check_inbound(
        OUTSIDE, client_ip=SENDER_IP, helo="mx.example.net", mail_from="alice@example.net",
        recipients=["bob@example.org"], trace="T1",
    ))
    assert refused.reply is not None and refused.reply.code == 550
    assert ("example.net", "TXT") in resolver.queries()
    lenient = made(key_dir, resolver, dmarc_reject=False)
    kept = asyncio.run(lenient.check_inbound(
        OUTSIDE, client_ip=SENDER_IP, helo="mx.example.net", mail_from="alice@example.net",
        recipients=["bob@example.org"], trace="T2",
    ))
    assert kept.reply is None
    assert kept.headers.startswith(b"Authentication-Results: mail.example.org;")
    assert b"dmarc=fail (p=reject)" in kept.headers and b"X-Q: dmarc=fail" in kept.headers


def test_dmarc_verdicts_are_kept_in_the_database_it_was_given(key_dir: Path, tmp_path: Path) -> None:
    records = {"example.net": {"TXT": ["v=spf1 -all"]},
               "_dmarc.example.net": {"TXT": ["v=DMARC1; p=reject; rua=mailto:dmarc@example.net"]}}
    db = Database(f"sqlite:///{tmp_path}/m.db", threads=1)
    db.create_schema()

    async def receive(auth: MailAuth, trace: str) -> None:
        inbound = await auth.check_inbound(
            OUTSIDE, client_ip=SENDER_IP, helo="mx.example.net", mail_from="alice@example.net",
            recipients=["bob@example.org"], trace=trace,
        )
        assert inbound.reply is not None and inbound.reply.code == 550
        await auth.kept()  # the verdict is written beside the session, not before its reply

    def kept() -> list[tuple[str, str, str, str]]:
        with db.write() as s:
            rows = s.query(DMARCVerdict).all()
            return [(r.source_ip, r.header_from, r.result, r.disposition) for r in rows]

    try:
        # Reports off, or no database given: nothing is kept.
        asyncio.run(receive(made(key_dir, FakeResolver(records), db), "T1"))
        asyncio.run(receive(made(key_dir, FakeResolver(records), None, dmarc_reports=True), "T2"))
        assert kept() == []
        # Reports on: the refused message's verdict is in the database MailAuth was built with.
        asyncio.run(receive(made(key_dir, FakeResolver(records), db, dmarc_reports=True), "T3"))
        assert kept() == [(SENDER_IP, "example.net", "fail", "reject")]
        # A record that asks for no aggregate reports (no rua=mailto:): nobody to report to, nothing kept.
        records["_dmarc.example.net"] = {"TXT": ["v=DMARC1; p=reject"]}
        asyncio.run(receive(made(key_dir, FakeResolver(records), db, dmarc_reports=True), "T4"))
        assert len(kept()) == 1
    finally:
        db.close()


def test_current_builds_again_only_for_a_new_config(tmp_path: Path) -> None:
    path = tmp_path / "mailroom.toml"
    path.write_text('[mailroom]\nhostname = "mail.example.org"\ndomains = ["example.org"]\n')
    configs: list[Config] = [configmod.load(path)]
    auth = Current(lambda: configs[-1], FakeResolver({}))
    first = auth()
    assert auth() is first  # one per config, not one per call
    assert first.policy.dmarc_reject and first.policy.forwarder_domain == "example.org"
    # A reload: a new config object (common/reload.py), here with a reloadable setting changed.
    configs.append(dataclasses.replace(configs[0], mailauth=dataclasses.replace(
        configs[0].mailauth, dmarc_reject=False)))
    second = auth()
    assert second is not first and second.policy.dmarc_reject is False
    assert second.resolver is first.resolver  # the process's one resolver throughout
