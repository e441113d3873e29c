"""The filter's actions as replies and headers; DNSBL names and verdicts."""

from __future__ import annotations

import asyncio

from mta.contentfilter import Scan, decide, dnsbl_check, dnsbl_names
from tests.harness.dns import FakeResolver


def test_actions_map_to_replies_and_headers() -> None:
    reply, _ = decide(Scan("reject", 20.0, 15.0), when_down="accept_unscanned")
    assert reply is not None and (reply.code, reply.status) == (550, "5.7.1")
    for action in ("soft reject", "greylist"):
        reply, _ = decide(Scan(action, 5.0, 15.0), when_down="accept_unscanned")
        assert reply is not None and (reply.code, reply.status) == (451, "4.7.1")
    reply, headers = decide(Scan("add header", 7.5, 15.0), when_down="accept_unscanned")
    assert reply is None
    assert headers == b"X-Spam-Flag: YES\r\nX-Spam-Status: Yes, score=7.5 required=15.0 action=add header\r\n"
    reply, headers = decide(Scan("no action", 0.3, 15.0), when_down="accept_unscanned")
    assert reply is None and headers == b"X-Spam-Status: No, score=0.3 required=15.0\r\n"


def test_filter_down_follows_the_setting() -> None:
    reply, headers = decide(Scan("", error="connection refused"), when_down="accept_unscanned")
    assert reply is None and headers == b"X-Mailroom-Filter: unscanned (connection refused)\r\n"
    reply, _ = decide(Scan("", error="timeout"), when_down="defer")
    assert reply is not None and (reply.code, reply.status) == (451, "4.7.1")


def test_dnsbl_names() -> None:
    assert dnsbl_names("192.0.2.1", ["bl.test"]) == ["1.2.0.192.bl.test"]
    [v6] = dnsbl_names("2001:db8::1", ["bl.test."])
    assert v6.startswith("1.0.0.0.") and v6.endswith(".8.b.d.0.1.0.0.2.bl.test")


def test_dnsbl_listed_and_not_and_failing() -> None:
    r = FakeResolver({"1.2.0.192.bl.test": {"A": ["127.0.0.2"]}, "1.2.0.192.down.test": "SERVFAIL"})
    reply = asyncio.run(dnsbl_check("192.0.2.1", ["down.test", "bl.test"], r))
    assert reply is not None and (reply.code, reply.status) == (554, "5.7.1") and "bl.test" in reply.text
    assert asyncio.run(dnsbl_check("192.0.2.2", ["bl.test"], r)) is None
    assert asyncio.run(dnsbl_check("192.0.2.1", ["down.test"], r)) is None
