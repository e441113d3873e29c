"""SPF, DKIM, DMARC and ARC verdicts on plain data, with DNS from a dictionary (tests/harness/dns.py)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import dkim as dkimpy
import pytest

from mta import checks, dkim
from tests.harness.dns import FakeResolver

SENDER_IP = "192.0.2.10"
OTHER_IP = "203.0.113.99"
MESSAGE = (
    b"From: Alice <alice@example.net>\r\nTo: bob@example.org\r\nSubject: hello\r\n"
    b"Date: Tue, 01 Dec 2026 10:00:00 +0000\r\nMessage-ID: <1@example.net>\r\n\r\nHello Bob.\r\n"
)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> list[dkim.Key]:
    return dkim.generate(tmp_path_factory.mktemp("k") / "dkim", "example.net", "s1")


def zone(keys: list[dkim.Key], *, dmarc: str = "v=DMARC1; p=reject", **extra: Any) -> dict[str, Any]:
    records: dict[str, Any] = {
        "example.net": {"TXT": [f"v=spf1 ip4:{SENDER_IP} -all"]},
        "_dmarc.example.net": {"TXT": [dmarc]},
    }
    for k in keys:
        records[k.dns_name] = {"TXT": [dkim.public_record(k)]}
    records.update(extra)
    return records


def evaluate(message: bytes, records: dict[str, Any], *, ip: str = SENDER_IP,
             mail_from: str = "alice@example.net", helo: str = "mx.example.net") -> checks.Verdict:
    return asyncio.run(checks.evaluate(
        message, client_ip=ip, helo=helo, mail_from=mail_from, hostname="mail.example.org",
        resolver=FakeResolver(records),
    ))


def decide(verdict: checks.Verdict, **kw: Any) -> checks.Decision:
    opts: dict[str, Any] = {"dmarc_reject": True, "defer_on_dns_error": True, "quarantine_header": "X-Q"}
    opts.update(kw)
    return checks.decide(verdict, **opts)


def test_signed_mail_from_the_right_address_passes_everything(keys: list[dkim.Key]) -> None:
    signed = dkim.sign(MESSAGE, keys) + MESSAGE
    v = evaluate(signed, zone(keys))
    assert v.spf.result == "pass"
    assert [(r.result, r.domain, r.algorithm) for r in v.dkim] == [
        ("pass", "example.net", "rsa-sha256"), ("pass", "example.net", "ed25519-sha256"),
    ]
    assert v.dmarc.result == "pass" and v.dmarc.policy == "reject"
    assert v.arc == "none"
    d = decide(v)
    assert d.reply is None
    text = d.headers.decode()
    assert text.startswith("Authentication-Results: mail.example.org;\r\n\t")
    assert "spf=pass" in text and "smtp.mailfrom=alice@example.net" in text
    assert "dkim=pass header.d=example.net header.s=s1-rsa" in text
    assert "dmarc=pass (p=reject) header.from=example.net" in text
    assert "X-Q" not in text


def test_dmarc_alone_passes_through_dkim_when_spf_fails(keys: list[dkim.Key]) -> None:
    signed = dkim.sign(MESSAGE, keys) + MESSAGE
    v = evaluate(signed, zone(keys), ip=OTHER_IP)  # e.g. a forward
    assert v.spf.result == "fail"
    assert v.dmarc.result == "pass"
    assert decide(v).reply is None


def test_forged_from_with_p_reject_is_refused(keys: list[dkim.Key]) -> None:
    v = evaluate(MESSAGE, zone(keys), ip=OTHER_IP, mail_from="spammer@bad.test")
    assert v.spf.result == "none" and v.dkim == [] and v.dmarc.result == "fail"
    d = decide(v)
    assert d.reply is not None and (d.reply.code, d.reply.status) == (550, "5.7.1")
    assert "example.net" in d.reply.text


def test_p_reject_failure_only_marked_when_refusing_is_off(keys: list[dkim.Key]) -> None:
    v = evaluate(MESSAGE, zone(keys), ip=OTHER_IP)
    d = decide(v, dmarc_reject=False)
    assert d.reply is None
    assert b"X-Q: dmarc=fail policy=reject header.from=example.net\r\n" in d.headers


def test_p_quarantine_failure_is_delivered_with_a_header(keys: list[dkim.Key]) -> None:
    v = evaluate(MESSAGE, zone(keys, dmarc="v=DMARC1; p=quarantine"), ip=OTHER_IP)
    d = decide(v)
    assert d.reply is None
    assert b"dmarc=fail (p=quarantine)" in d.headers
    assert b"X-Q: dmarc=fail policy=quarantine" in d.headers


def test_spf_fail_alone_is_only_recorded(keys: list[dkim.Key]) -> None:
    v = evaluate(MESSAGE, zone(keys, dmarc="v=DMARC1; p=none"), ip=OTHER_IP)
    assert v.spf.result == "fail" and v.dmarc.result == "fail"
    d = decide(v)
    assert d.reply is None and b"spf=fail" in d.headers and b"X-Q" not in d.headers


def test_modified_body_fails_dkim(keys: list[dkim.Key]) -> None:
    signed = dkim.sign(MESSAGE, keys) + MESSAGE
    tampered = signed.replace(b"Hello Bob.", b"Send money.")
    v = evaluate(tampered, zone(keys), ip=OTHER_IP)
    assert [r.result for r in v.dkim] == ["fail", "fail"]
    assert v.dmarc.result == "fail"
    assert decide(v).reply is not None


def test_added_second_from_breaks_the_over_signed_signature(keys: list[dkim.Key]) -> None:
    signed = dkim.sign(MESSAGE, keys) + MESSAGE
    replayed = signed.replace(b"From: Alice", b"From: Mallory <m@bad.test>\r\nFrom: Alice", 1)
    v = evaluate(replayed, zone(keys), ip=OTHER_IP)
    assert all(r.result == "fail" for r in v.dkim)


def test_wrong_key_fails(keys: list[dkim.Key], tmp_path: Path) -> None:
    other = dkim.generate(tmp_path, "example.net", "s1")
    signed = dkim.sign(MESSAGE, other) + MESSAGE
    v = evaluate(signed, zone(keys), ip=OTHER_IP)
    assert [r.result for r in v.dkim] == ["fail", "fail"]


def test_expired_signature_fails(keys: list[dkim.Key], monkeypatch: pytest.MonkeyPatch) -> None:
    gen = dkimpy.DKIM.gen_header

    def with_expiry(self: Any, fields: list[tuple[bytes, bytes]], *a: Any) -> Any:
        # dkimpy cannot set x= itself: add it before the signature is computed.
        fields = [*fields[:-1], (b"x", str(int(time.time()) - 60).encode()), fields[-1]]
        return gen(self, fields, *a)

    monkeypatch.setattr(dkimpy.DKIM, "gen_header", with_expiry)
    signed = dkim.sign(MESSAGE, keys[:1]) + MESSAGE
    monkeypatch.undo()
    assert b"x=" in signed.split(b"\r\n\r\n")[0]
    v = evaluate(signed, zone(keys), ip=OTHER_IP)
    assert [r.result for r in v.dkim] == ["fail"]


def test_dns_failure_is_temperror_and_deferred(keys: list[dkim.Key]) -> None:
    v = evaluate(MESSAGE, zone(keys, **{"example.net": "SERVFAIL"}), ip=OTHER_IP)
    assert v.spf.result == "temperror"
    assert v.dmarc.result == "temperror"
    d = decide(v)
    assert d.reply is not None and d.reply.code == 451 and d.reply.status.startswith("4.7.")
    accepted = decide(v, defer_on_dns_error=False)
    assert accepted.reply is None and b"spf=temperror" in accepted.headers


def test_dkim_key_lookup_failure_is_temperror(keys: list[dkim.Key]) -> None:
    signed = dkim.sign(MESSAGE, keys) + MESSAGE
    records = zone(keys, **{k.dns_name: "SERVFAIL" for k in keys})
    v = evaluate(signed, records, ip=OTHER_IP)
    assert [r.result for r in v.dkim] == ["temperror", "temperror"]
    assert decide(v).reply is not None and decide(v).reply.code == 451  # type: ignore[union-attr]


def test_dns_failure_does_not_matter_when_dmarc_passes(keys: list[dkim.Key]) -> None:
    signed = dkim.sign(MESSAGE, keys) + MESSAGE
    records = zone(keys, **{keys[1].dns_name: "SERVFAIL"})
    v = evaluate(signed, records)
    assert v.dmarc.result == "pass"
    assert decide(v).reply is None


def test_null_sender_checks_the_helo_name(keys: list[dkim.Key]) -> None:
    records = zone(keys, **{"mx.example.net": {"TXT": [f"v=spf1 ip4:{SENDER_IP} -all"]}})
    v = evaluate(MESSAGE, records, mail_from="")
    assert v.spf.identity == "helo" and v.spf.result == "pass"
    assert b"smtp.helo=mx.example.net" in v.header()
    # For <> the HELO identity is the one DMARC aligns (RFC 7208 2.4, RFC 7489 4.1).
    assert v.dmarc.result == "pass"
    other = evaluate(MESSAGE, records, mail_from="", helo="mx.other.test")
    assert other.spf.result == "none" and other.dmarc.result == "fail"


def test_subdomain_uses_the_organizational_record_and_sp(keys: list[dkim.Key]) -> None:
    msg = MESSAGE.replace(b"alice@example.net", b"alice@news.example.net")
    records = zone(keys, dmarc="v=DMARC1; p=reject; sp=quarantine")
    v = evaluate(msg, records, ip=OTHER_IP, mail_from="x@other.test")
    assert v.dmarc.result == "fail" and v.dmarc.policy == "quarantine"
    # Relaxed alignment: a signature by the parent domain aligns with the subdomain.
    signed = dkim.sign(msg, keys) + msg
    assert evaluate(signed, records, ip=OTHER_IP).dmarc.result == "pass"
    strict = zone(keys, dmarc="v=DMARC1; p=reject; adkim=s")
    assert evaluate(signed, strict, ip=OTHER_IP).dmarc.result == "fail"


def test_no_dmarc_record_is_none(keys: list[dkim.Key]) -> None:
    records = zone(keys)
    del records["_dmarc.example.net"]
    v = evaluate(MESSAGE, records, ip=OTHER_IP)
    assert v.dmarc.result == "none" and decide(v).reply is None


def test_our_own_results_are_removed_and_others_kept() -> None:
    msg = (
        b"Authentication-Results: mail.example.org; dkim=pass\r\n header.d=forged.test\r\n"
        b"Authentication-Results: (comment) MAIL.example.org.; spf=pass\r\n"
        b"Authentication-Results: mx.other.test; spf=fail\r\n" + MESSAGE
    )
    out = checks.strip_own_results(msg, "mail.example.org")
    assert out == b"Authentication-Results: mx.other.test; spf=fail\r\n" + MESSAGE
    assert checks.strip_header(b"X-Q: yes\r\n" + MESSAGE, "x-q") == MESSAGE


def test_arc_chain_sealed_by_a_forwarder_verifies(keys: list[dkim.Key]) -> None:
    signed = dkim.sign(MESSAGE, keys) + MESSAGE
    ar = b"Authentication-Results: fwd.example.net; dkim=pass header.d=example.net\r\n"
    sealed = b"".join(
        dkimpy.arc_sign(ar + signed, keys[0].dns_selector.encode(), b"example.net", keys[0].private,
                        b"fwd.example.net")
    ) + ar + signed
    assert asyncio.run(checks.check_arc(sealed, FakeResolver(zone(keys)))) == "pass"
    broken = sealed.replace(b"Hello Bob.", b"Hello Eve.")
    assert asyncio.run(checks.check_arc(broken, FakeResolver(zone(keys)))) == "fail"


def test_at_most_five_signatures_are_verified_the_from_domains_first(keys: list[dkim.Key]) -> None:
    # 200 signatures of other domains above the author's two: verifying each would cost
    # a key lookup apiece (RFC 6376 6.1 lets a verifier stop at a few).
    signed = dkim.sign(MESSAGE, keys) + MESSAGE
    forged = b"".join(
        f"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=spam{i}.test; s=s{i};\r\n"
        f"\th=from; bh=AAAA; b=BBBB{i}\r\n".encode()
        for i in range(200)
    )
    resolver = FakeResolver(zone(keys))
    v = asyncio.run(checks.evaluate(
        forged + signed, client_ip=OTHER_IP, helo="mx.example.net", mail_from="alice@example.net",
        hostname="mail.example.org", resolver=resolver,
    ))
    key_queries = [q for q in resolver.queries() if "._domainkey." in q[0]]
    assert len(key_queries) <= checks.MAX_SIGNATURES
    assert len(v.dkim) == checks.MAX_SIGNATURES
    # The author's signatures were among those verified, so DMARC passes on them.
    assert [(r.result, r.domain) for r in v.dkim if r.domain == "example.net"] == [
        ("pass", "example.net"), ("pass", "example.net"),
    ]
    assert v.dmarc.result == "pass"
    # Without an author's signature the first ones are taken, in order.
    chosen = checks.choose(checks.signatures(forged + MESSAGE), "example.net")
    assert [s.domain for s in chosen] == [f"spam{i}.test" for i in range(5)]
