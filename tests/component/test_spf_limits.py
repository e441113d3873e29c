"""SPF (mta/spf.py) under the limits of RFC 7208 4.6.4 and against bad answers, over a real
DNS server on loopback (tests/support/dns_server.py) and the process resolver's wire layer.

Each limit keeps a message from costing more than a few queries: a record that
would ask more is a permerror, however it is built (a long list, a loop).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from common.dns import Wire
from mta import spf
from tests.support.dns_server import DNSServer

pytestmark = pytest.mark.timeout(60)

CLIENT = "192.0.2.200"


def _spf(text: str) -> dict[str, list[str]]:
    return {"TXT": ['"' + text + '"']}


BIG = "v=spf1 " + " ".join(f"ip4:198.51.100.{i}/32" for i in range(1, 140)) + f" ip4:{CLIENT} -all"
RECORDS = {
    **{f"h{i}.test": {"A": [f"192.0.2.{i}"]} for i in range(1, 12)},
    "ten.test": _spf("v=spf1 " + " ".join(f"a:h{i}.test" for i in range(1, 11)) + " -all"),
    "eleven.test": _spf("v=spf1 " + " ".join(f"a:h{i}.test" for i in range(1, 12)) + " -all"),
    "twovoid.test": _spf("v=spf1 a:void1.test mx:void2.test -all"),
    "threevoid.test": _spf("v=spf1 a:void1.test mx:void2.test exists:void3.test -all"),
    "selfloop.test": _spf("v=spf1 include:selfloop.test -all"),
    "ping.test": _spf("v=spf1 include:pong.test -all"),
    "pong.test": _spf("v=spf1 include:ping.test -all"),
    "r1.test": _spf("v=spf1 redirect=r2.test"),
    "r2.test": _spf("v=spf1 redirect=r1.test"),
    "manymx.test": {"TXT": ['"v=spf1 mx -all"'], "MX": [(i, f"h{i}.test") for i in range(1, 12)]},
    "chain.test": {"CNAME": "chain2.test"},
    "chain2.test": {"CNAME": "chain3.test"},
    "chain3.test": _spf(f"v=spf1 ip4:{CLIENT} -all"),
    "cloop1.test": {"CNAME": "cloop2.test"},
    "cloop2.test": {"CNAME": "cloop1.test"},
    "big.test": {"TXT": [" ".join(f'"{BIG[i:i + 250]}"' for i in range(0, len(BIG), 250))]},
    "asked.test": {"A": ["192.0.2.1"]},
    "other.test": _spf("v=spf1 +all"),
    "plain.test": _spf(f"v=spf1 ip4:{CLIENT} -all"),
}


@pytest.fixture(scope="module")
def server() -> Iterator[DNSServer]:
    with DNSServer(RECORDS, misdirect={"asked.test": "other.test"}) as s:
        yield s


def check(server: DNSServer, domain: str, ip: str = CLIENT) -> str:
    async def go() -> str:
        found = await spf.check(Wire([server.address], 5), client_ip=ip, mail_from=f"x@{domain}", helo="h")
        return found.result

    return asyncio.run(go())


def test_ten_dns_querying_terms_are_allowed_and_the_eleventh_is_a_permerror(server: DNSServer) -> None:
    assert check(server, "ten.test") == "fail"
    assert check(server, "ten.test", ip="192.0.2.10") == "pass"
    server.clear_queries()
    assert check(server, "eleven.test", ip="192.0.2.11") == "permerror"
    # ... found before its eleventh query was sent.
    assert ("h11.test", "A") not in server.queries()


def test_two_void_lookups_are_allowed_and_the_third_is_a_permerror(server: DNSServer) -> None:
    assert check(server, "twovoid.test") == "fail"
    assert check(server, "threevoid.test") == "permerror"


def test_include_loops_are_a_permerror(server: DNSServer) -> None:
    server.clear_queries()
    assert check(server, "selfloop.test") == "permerror"
    assert len(server.queries()) <= 11  # the record itself, then at most ten terms
    assert check(server, "ping.test") == "permerror"


def test_redirect_loops_are_a_permerror(server: DNSServer) -> None:
    server.clear_queries()
    assert check(server, "r1.test") == "permerror"
    assert len(server.queries()) <= 11


def test_more_than_ten_mx_records_are_a_permerror(server: DNSServer) -> None:
    assert check(server, "manymx.test", ip="192.0.2.1") == "permerror"


def test_a_record_behind_a_cname_chain_is_found_and_a_cname_loop_is_a_temperror(server: DNSServer) -> None:
    assert check(server, "chain.test") == "pass"
    assert check(server, "cloop1.test") == "temperror"


def test_a_truncated_answer_is_asked_again_over_tcp(server: DNSServer) -> None:
    server.set_records(RECORDS, udp_truncate=True)
    try:
        server.clear_queries()
        assert check(server, "plain.test") == "pass"
        assert ("tcp", "plain.test") in [(e["proto"], e["name"]) for e in server.query_log()]
    finally:
        server.set_records(RECORDS, udp_truncate=False)


def test_an_oversized_record_is_read_whole(server: DNSServer) -> None:
    # 2,500 octets in ten strings: more than UDP carries, so the answer comes over TCP,
    # and the client's address is the very last term.
    assert len(BIG) > 2000
    server.clear_queries()
    assert check(server, "big.test") == "pass"
    assert check(server, "big.test", ip="203.0.113.1") == "fail"
    assert "tcp" in [e["proto"] for e in server.query_log()]


def test_an_answer_for_another_name_is_ignored(server: DNSServer) -> None:
    # Asked for asked.test, the server answers with other.test's "+all" record.
    assert check(server, "other.test") == "pass"
    assert check(server, "asked.test") == "none"
