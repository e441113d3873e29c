"""TLS-RPT (RFC 8460): every outbound TLS session counted, one report a day to each domain that asks.

Sessions are real (tests/harness/tls_world.py); the reports travel through our
own queue to the reporting domain's MX host (mailto:) and are POSTed to its
HTTPS endpoint (https:), and are read back there.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import gzip
import json
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from common.models import TLSResult
from mta import tlsrpt
from tests.harness.tls_world import REPORT_PATH, Rig, World, build, mx_hosts

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    yield from build(tmp_path_factory.mktemp("world"))


def reporter(rig: Rig, *, https: bool = True) -> tlsrpt.Reporter:
    return tlsrpt.Reporter(
        db=rig.db, clock=rig.clock, recorder=rig.recorder, resolver=rig.resolver, hostname="mail.example.org",
        sender="postmaster@example.org", organization="Example Org", https=https,
        https_context=rig.policies.context,
    )


def rows(rig: Rig) -> int:
    with rig.db.read() as s:
        return int(s.scalar(select(func.count()).select_from(TLSResult)) or 0)


def parsed(content: bytes) -> tuple[EmailMessage, dict[str, Any], str]:
    msg = email.message_from_bytes(content, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    assert msg.get_content_type() == "multipart/report" and msg.get_param("report-type") == "tlsrpt"
    text, attachment = list(msg.iter_parts())
    assert text.get_content_type() == "text/plain"
    assert attachment.get_content_type() == "application/tlsrpt+gzip"
    filename = attachment.get_filename() or ""
    payload = attachment.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return msg, json.loads(gzip.decompress(payload)), filename


def test_a_days_sessions_go_to_each_domain_that_asks_once_by_mail_and_https(world: World, tmp_path: Path) -> None:
    async def go() -> None:
        rig = Rig(world, tmp_path)
        rep = reporter(rig)
        async with mx_hosts(world) as mx:
            for _ in range(2):
                assert (await rig.send("bob@enforce.sts.test")).state == "delivered"
                await rig.remote.close()  # a new session each time: two sessions counted
            assert (await rig.send("bob@wrongcert.sts.test")).state == "queued"
            assert (await rig.send("bob@testing.sts.test")).state == "delivered"
            day = rig.clock.now().date().isoformat()
            # The day is not over: the counts are saved, nothing is sent.
            assert await rep.send_due() == []
            assert rows(rig) == 3 and rig.recorder.pending == {}
            posts_before = len([r for r in world.https.requests if r[0] == "POST"])
            rig.clock.advance(86400)
            queued = await rep.send_due()
            assert len(queued) == 2  # enforce and wrongcert; testing has no rua: its rows are dropped
            await rig.run()  # the reports leave through the queue like any mail (wrongcert is retried too)
            assert await rep.send_due() == []  # nothing twice
            await rig.close()
        got = {parsed(m.content)[0]["TLS-Report-Domain"]: m for m in mx["reports"].received}
        assert set(got) == {"enforce.sts.test", "wrongcert.sts.test"}
        assert got["wrongcert.sts.test"].recipients == ["tls+reports@reports.sts.test"]  # %2B and ?subject decoded
        assert got["enforce.sts.test"].sender == "postmaster@example.org"

        msg, report, filename = parsed(got["enforce.sts.test"].content)
        assert msg["Subject"].startswith("Report Domain: enforce.sts.test Submitter: mail.example.org Report-ID: <")
        assert msg["TLS-Report-Submitter"] == "mail.example.org"
        assert filename.startswith("mail.example.org!enforce.sts.test!") and filename.endswith(".json.gz")
        assert report["organization-name"] == "Example Org" and report["contact-info"] == "postmaster@example.org"
        assert report["date-range"] == {"start-datetime": f"{day}T00:00:00Z", "end-datetime": f"{day}T23:59:59Z"}
        assert report["policies"] == [{
            "policy": {"policy-type": "sts", "policy-domain": "enforce.sts.test",
                       "policy-string": ["version: STSv1", "mode: enforce", "mx: *.sts.test", "max_age: 86400"],
                       "mx-host": ["*.sts.test"]},
            "summary": {"total-successful-session-count": 2, "total-failure-session-count": 0},
        }]

        _, report, _ = parsed(got["wrongcert.sts.test"].content)
        (policy,) = report["policies"]
        assert policy["summary"] == {"total-successful-session-count": 0, "total-failure-session-count": 1}
        (detail,) = policy["failure-details"]
        assert detail["result-type"] == "certificate-host-mismatch"
        assert detail["receiving-mx-hostname"] == "mx-wrong.sts.test" and detail["receiving-ip"] == "127.0.0.62"
        assert detail["failed-session-count"] == 1 and "certificate verify failed" in detail["failure-reason-code"]

        posts = [r for r in world.https.requests if r[0] == "POST"][posts_before:]
        assert [(host, path) for _, host, path, _ in posts] == [("mta-sts.enforce.sts.test", REPORT_PATH)]
        assert json.loads(gzip.decompress(posts[0][3]))["policies"][0]["policy"]["policy-domain"] == "enforce.sts.test"
        assert rep.posted == 1

    asyncio.run(go())


def test_without_https_reporting_switched_on_nothing_is_posted(world: World, tmp_path: Path) -> None:
    async def go() -> None:
        rig = Rig(world, tmp_path)
        rep = reporter(rig, https=False)
        async with mx_hosts(world):
            await rig.send("bob@enforce.sts.test")
            rig.clock.advance(86400)
            assert len(await rep.send_due()) == 1
            await rig.close()
        assert rep.posted == 0

    posts = len([r for r in world.https.requests if r[0] == "POST"])
    asyncio.run(go())
    assert len([r for r in world.https.requests if r[0] == "POST"]) == posts


@pytest.mark.parametrize("records, expected", [
    (["v=TLSRPTv1; rua=mailto:a@example.net"], ["mailto:a@example.net"]),
    (["v=TLSRPTv1;rua=mailto:a@example.net,https://r.example.net/x"], ["mailto:a@example.net",
                                                                       "https://r.example.net/x"]),
    (["v=TLSRPTv1; rua=ftp://x.example.net/"], None),  # no scheme we can use
    (["v=TLSRPTv1; rua=mailto:a@example.net", "v=TLSRPTv1; rua=mailto:b@example.net"], None),  # two: none
    (["v=spf1 -all"], None),
    (["v=TLSRPTv1"], None),
])
def test_the_reporting_policy_record(records: list[str], expected: list[str] | None) -> None:
    assert tlsrpt.reporting_addresses(records) == expected
