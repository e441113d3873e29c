"""The queue manager's wiring of `[outbound_tls]`: what the settings turn into, and reports DKIM-signed."""

from __future__ import annotations

import asyncio
import datetime as dt
import gzip
import json
import logging
from pathlib import Path

import pytest

from mta import tlsrpt
from mta.auth.mailauth import Current
from mta.qmgr import _outbound_tls
from mta.tlspolicy import Level
from tests.support.suite import Installation

pytestmark = pytest.mark.timeout(60)


def test_the_settings_reach_the_policy_and_the_reporter(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    inst = Installation(tmp_path / "inst")
    inst.set("outbound_tls.policy", '"partner.test"', '"verify"')
    inst.set("outbound_tls", "dnssec_resolvers", '["127.0.0.1:5353"]')
    inst.set("outbound_tls", "mta_sts_timeout", '"7s"')
    inst.set("outbound_tls", "tlsrpt_organization", '"Example Org"')

    async def go() -> None:
        ctx = inst.context()
        planner, reporter = _outbound_tls(ctx, Current(lambda: ctx.config, ctx.resolver()))
        assert planner.table.lookup("partner.test") is Level.VERIFY
        assert planner.use_dane and planner.resolver is not None and planner.resolver.trusted
        assert planner.policies is not None and planner.policies.timeout == 7.0
        assert planner.policies.cache_file == inst.config.resolve("mta-sts-cache.json")
        assert reporter is not None and reporter.sender == "postmaster@example.org"
        assert reporter.organization == "Example Org"
        # The report leaves DKIM-signed for our domain, as RFC 8460 5.3 asks.
        report = tlsrpt.report_json([], day="2030-01-01", organization="Example Org",
                                    contact="postmaster@example.org", report_id="r1@mail.test")
        content = tlsrpt.report_message(report, gzip.compress(json.dumps(report).encode()), domain="partner.test",
                                        submitter="mail.test", sender=reporter.sender, to="tls@partner.test",
                                        now=dt.datetime(2030, 1, 2))
        assert reporter.sign is not None
        signature = await reporter.sign(content, ["tls@partner.test"])
        assert signature.startswith(b"DKIM-Signature:") and b"d=example.org" in signature
        ctx.db.close()

    caplog.set_level(logging.INFO, logger="qmgr")
    asyncio.run(go())
    assert any("DANE on: the AD bit of 127.0.0.1 is believed" in r.getMessage() for r in caplog.records)


def test_a_resolver_elsewhere_turns_dane_off_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    inst = Installation(tmp_path / "inst")
    inst.set("dns", "nameservers", '["192.0.2.53:53"]')
    inst.set("outbound_tls", "tlsrpt", "false")

    async def go() -> None:
        ctx = inst.context()
        planner, reporter = _outbound_tls(ctx, Current(lambda: ctx.config, ctx.resolver()))
        assert planner.resolver is not None and not planner.resolver.trusted
        assert reporter is None and planner.recorder is None
        ctx.db.close()

    caplog.set_level(logging.INFO, logger="qmgr")
    asyncio.run(go())
    assert any("DANE off: no validating resolver on this host" in r.getMessage() for r in caplog.records)
