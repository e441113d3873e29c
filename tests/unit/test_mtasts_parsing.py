"""MTA-STS (RFC 8461) as text: the TXT record, the policy file, the mx patterns."""

from __future__ import annotations

import datetime as dt
import logging

import pytest

from mta import mtasts

NOW = dt.datetime(2030, 1, 1)
GOOD = "version: STSv1\r\nmode: enforce\r\nmx: mx1.example.net\r\nmx: *.mail.example.net\r\nmax_age: 86400\r\n"


@pytest.mark.parametrize("records, expected", [
    (["v=STSv1; id=20260101T000000"], "20260101T000000"),
    (["v=STSv1;id=abc123;"], "abc123"),
    (["v=STSv1; id=abc; ext=whatever"], "abc"),  # unknown fields are ignored (RFC 8461 3.1)
    (["v=spf1 -all", "v=STSv1; id=1"], "1"),  # records of other kinds are discarded
    (["v=STSv1; id=1", "v=STSv1; id=2"], None),  # two policies announced: none
    (["v=STSv1; id=toolong01234567890123456789012345"], None),  # id is 1 to 32 letters and digits
    (["v=STSv1; id=a-b"], None),
    (["v=STSv1;"], None),  # no id
    (["v=STSv2; id=1"], None),
    ([], None),
])
def test_the_txt_record_announces_at_most_one_policy(records: list[str], expected: str | None) -> None:
    assert mtasts.txt_id(records) == expected


def test_a_policy_file_is_read_with_crlf_or_lf() -> None:
    for text in (GOOD, GOOD.replace("\r\n", "\n")):
        p = mtasts.parse_policy(text, "1", NOW, "example.net")
        assert (p.mode, p.max_age, p.mx) == ("enforce", 86400, ("mx1.example.net", "*.mail.example.net"))
        assert p.expires == NOW + dt.timedelta(days=1)
        assert p.lines == ("version: STSv1", "mode: enforce", "mx: mx1.example.net", "mx: *.mail.example.net",
                           "max_age: 86400")


@pytest.mark.parametrize("text, why", [
    ("version: STSv2\nmode: enforce\nmx: a.example.net\nmax_age: 60\n", "not STSv1"),
    ("mode: enforce\nmx: a.example.net\nmax_age: 60\n", "not STSv1"),
    ("version: STSv1\nmode: strict\nmx: a.example.net\nmax_age: 60\n", "not enforce, testing or none"),
    ("version: STSv1\nmode: enforce\nmx: a.example.net\nmax_age: soon\n", "not a number"),
    ("version: STSv1\nmode: enforce\nmax_age: 60\n", "no usable mx"),
    ("<html>hello</html>\n", "not a 'key: value' line"),
])
def test_a_bad_policy_is_refused_with_its_reason(text: str, why: str) -> None:
    with pytest.raises(mtasts.PolicyError, match=why) as info:
        mtasts.parse_policy(text, "1", NOW)
    assert info.value.result == mtasts.INVALID


def test_mode_none_needs_no_mx_and_max_age_is_capped_at_a_year() -> None:
    p = mtasts.parse_policy("version: STSv1\nmode: none\nmax_age: 999999999\n", "1", NOW)
    assert p.mode == "none" and p.max_age == mtasts.MAX_AGE_LIMIT


def test_the_first_occurrence_of_a_field_counts_and_unknown_keys_are_ignored() -> None:
    p = mtasts.parse_policy("version: STSv1\nmode: testing\nmode: enforce\nfoo: bar\nmx: a.example.net\n"
                            "max_age: 60\n", "1", NOW)
    assert p.mode == "testing"


@pytest.mark.parametrize("pattern", [
    "mx*.example.net", "*.*.example.net", "a.*.example.net", "*example.net", "*", "*.", "example.net.*",
    "-bad.example.net", "under_score.example.net", "localhost",
])
def test_a_pattern_with_a_wildcard_in_an_odd_place_matches_nothing_and_is_logged(
    pattern: str, caplog: pytest.LogCaptureFixture,
) -> None:
    assert not mtasts.valid_pattern(pattern)
    caplog.set_level(logging.WARNING, logger="mtasts")
    p = mtasts.parse_policy(f"version: STSv1\nmode: enforce\nmx: {pattern}\nmx: mx1.example.net\nmax_age: 60\n",
                            "1", NOW, "example.net")
    assert p.mx == ("mx1.example.net",)  # the odd pattern is dropped; the good one stays
    assert not p.allows("mx.example.net") and not p.allows("mxa.example.net")
    assert any(pattern in r.getMessage() and "ignored" in r.getMessage() for r in caplog.records)


def test_a_policy_whose_every_pattern_is_odd_is_invalid() -> None:
    with pytest.raises(mtasts.PolicyError, match="no usable mx"):
        mtasts.parse_policy("version: STSv1\nmode: enforce\nmx: mx*.example.net\nmax_age: 60\n", "1", NOW)


@pytest.mark.parametrize("pattern, host, expected", [
    ("mx1.example.net", "mx1.example.net", True),
    ("mx1.example.net", "MX1.Example.NET.", True),
    ("mx1.example.net", "mx2.example.net", False),
    ("*.example.net", "mx1.example.net", True),
    ("*.example.net", "example.net", False),  # the wildcard stands for exactly one label
    ("*.example.net", "a.b.example.net", False),
    ("*.example.net", "mx1.example.net.evil.test", False),
    ("*.example.net", "mx1example.net", False),
])
def test_mx_patterns_match_as_rfc_8461_says(pattern: str, host: str, expected: bool) -> None:
    assert mtasts.mx_matches(pattern, host) is expected
