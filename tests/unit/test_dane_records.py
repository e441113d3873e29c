"""DANE (RFC 7672) records and certificates: which TLSA records are usable, and what matches them.

Certificates come from a CA the test makes (tests/support/pki.py); the
chains are what a server would send, DER, its own certificate first.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from mta import dane
from tests.support.pki import Issued, TestCA, self_signed, tlsa_text

NOW = dt.datetime.now(dt.UTC).replace(tzinfo=None)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def mx(ca: TestCA) -> Issued:
    return ca.issue("mx.dane.test")


def chain(ca: TestCA, leaf: Issued, *, root: bool = True) -> list[bytes]:
    return [leaf.der, ca.inter_der, *([ca.root_der] if root else [])]


def records(*texts: str) -> list[dane.TLSA]:
    usable, bad = dane.split_records(texts)
    assert bad == []
    return usable


@pytest.mark.parametrize("selector", [0, 1])
@pytest.mark.parametrize("matching", [0, 1, 2])
def test_dane_ee_matches_the_servers_own_certificate_or_key(
    ca: TestCA, mx: Issued, selector: int, matching: int,
) -> None:
    good = records(mx.tlsa(3, selector, matching))
    assert dane.check_chain(good, chain(ca, mx), ["mx.dane.test"], NOW) == ""
    other = ca.issue("mx.dane.test", label=f"other-{selector}{matching}")
    assert "no certificate" in dane.check_chain(records(other.tlsa(3, selector, matching)), chain(ca, mx),
                                                ["mx.dane.test"], NOW)


def test_dane_ee_ignores_names_and_dates(tmp_path: Path, ca: TestCA) -> None:
    """RFC 7672 3.1.1: with DANE-EE the DNS record is the authority; a self-signed,
    oddly named or expired certificate is fine when it is the one published."""
    odd = self_signed(tmp_path, "something.else.test")
    assert dane.check_chain(records(odd.tlsa(3, 1, 1)), [odd.der], ["mx.dane.test"], NOW) == ""
    expired = ca.issue("mx.dane.test", expired=True, label="expired-ee")
    assert dane.check_chain(records(expired.tlsa(3, 1, 1)), chain(ca, expired), ["mx.dane.test"], NOW) == ""


@pytest.mark.parametrize("selector, matching", [(0, 1), (1, 1), (0, 2), (1, 2), (0, 0)])
def test_dane_ta_accepts_a_chain_to_the_named_anchor_with_the_mx_name(
    ca: TestCA, mx: Issued, selector: int, matching: int,
) -> None:
    root_record = tlsa_text(2, selector, matching, ca.root_der if selector == 0 else ca.root_spki)
    assert dane.check_chain(records(root_record), chain(ca, mx), ["mx.dane.test", "dane.test"], NOW) == ""
    # The intermediate may be the anchor too.
    inter_record = tlsa_text(2, 0, 1, ca.inter_der)
    assert dane.check_chain(records(inter_record), chain(ca, mx, root=False), ["mx.dane.test"], NOW) == ""


def test_dane_ta_needs_the_anchor_in_the_chain_the_right_name_and_valid_dates(ca: TestCA, mx: Issued) -> None:
    root_record = records(tlsa_text(2, 0, 1, ca.root_der))
    # The server did not send the root: nothing to anchor to (RFC 7672 3.2.2: it must).
    assert "no certificate" in dane.check_chain(root_record, chain(ca, mx, root=False), ["mx.dane.test"], NOW)
    # A certificate for another name.
    wrong = ca.issue("www.elsewhere.test", label="wrong-name")
    problem = dane.check_chain(root_record, chain(ca, wrong), ["mx.dane.test", "dane.test"], NOW)
    assert "does not chain" in problem and "subjectAltName" in problem
    # The recipient domain is a reference identifier too (RFC 7672 3.2.3).
    domain_named = ca.issue("dane.test", label="domain-named")
    assert dane.check_chain(root_record, chain(ca, domain_named), ["mx.dane.test", "dane.test"], NOW) == ""
    # Expired: DANE-TA checks dates, as PKIX does.
    expired = ca.issue("mx.dane.test", expired=True, label="expired-ta")
    assert "not valid at validation time" in dane.check_chain(root_record, chain(ca, expired), ["mx.dane.test"], NOW)


def test_a_wildcard_certificate_matches_one_label_under_dane_ta(ca: TestCA) -> None:
    star = ca.issue("*.dane.test", label="star")
    root_record = records(tlsa_text(2, 1, 1, ca.root_spki))
    assert dane.check_chain(root_record, chain(ca, star), ["mx.dane.test"], NOW) == ""
    assert dane.check_chain(root_record, chain(ca, star), ["a.mx.dane.test"], NOW) != ""


@pytest.mark.parametrize("text, why", [
    ("4 1 1 " + "ab" * 32, "usage 4 (unknown)"),
    ("0 1 1 " + "ab" * 32, "usage 0 (PKIX, not for SMTP)"),
    ("1 0 1 " + "ab" * 32, "usage 1 (PKIX, not for SMTP)"),
    ("3 2 1 " + "ab" * 32, "unknown selector 2"),
    ("3 1 3 " + "ab" * 32, "unknown matching type 3"),
    ("3 1 1 " + "ab" * 31, "31 octets where the digest has 32"),
    ("3 1 1 " + "ab" * 33, "33 octets where the digest has 32"),
    ("3 1 2 " + "ab" * 32, "32 octets where the digest has 64"),
    ("3 0 0 " + "ab" * 20, "not a DER certificate"),
    ("3 1 0 " + "ab" * 20, "not a DER public key"),
])
def test_an_unusable_record_says_why(text: str, why: str) -> None:
    usable, bad = dane.split_records([text, "3 1 1 " + "cd" * 32])
    assert len(usable) == 1 and usable[0].data == bytes.fromhex("cd" * 32)
    assert len(bad) == 1 and why in bad[0]


def test_an_unusable_record_never_matches_even_when_its_digest_would(ca: TestCA, mx: Issued) -> None:
    """A PKIX-EE record naming the very certificate is still not DANE."""
    pkix = mx.tlsa(1, 1, 1)
    usable, bad = dane.split_records([pkix])
    assert usable == [] and len(bad) == 1
