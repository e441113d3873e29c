"""SRS: forward, reverse, SRS1 for a second hop, forged and old addresses refused."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from mta.auth.srs import SRS, SRSError, is_srs, load_secret

DAY = 86400.0


def codec(now: float = 1_800_000_000.0, secret: bytes = b"s3cret", domain: str = "fwd.example") -> SRS:
    return SRS(secret, domain, max_age_days=21, clock=lambda: now)


def test_forward_and_reverse_round_trip() -> None:
    srs = codec()
    a = srs.forward("Alice.Smith@example.net")
    assert a.startswith("SRS0=") and a.endswith("@fwd.example")
    assert "=example.net=Alice.Smith@" in a
    assert srs.reverse(a) == "Alice.Smith@example.net"
    assert srs.reverse(a.upper().replace("@FWD.EXAMPLE", "@fwd.example")).lower() == "alice.smith@example.net"


def test_local_parts_with_equals_signs_survive() -> None:
    srs = codec()
    assert srs.reverse(srs.forward("a=b=c@example.net")) == "a=b=c@example.net"


def test_forged_hash_is_refused() -> None:
    srs = codec()
    a = srs.forward("alice@example.net")
    forged = a.replace("=example.net=alice", "=evil.test=victim")
    with pytest.raises(SRSError):
        srs.reverse(forged)
    with pytest.raises(SRSError):
        codec(secret=b"another").reverse(a)
    with pytest.raises(SRSError):
        srs.reverse("SRS0=xxxx@fwd.example")


def test_old_addresses_expire() -> None:
    a = codec().forward("alice@example.net")
    assert codec(now=1_800_000_000.0 + 20 * DAY).reverse(a) == "alice@example.net"
    with pytest.raises(SRSError, match="expired"):
        codec(now=1_800_000_000.0 + 30 * DAY).reverse(a)


def test_second_forwarder_makes_srs1_back_to_the_first() -> None:
    first = codec(domain="first.example", secret=b"one")
    second = codec(domain="second.example", secret=b"two")
    a1 = first.forward("alice@example.net")
    a2 = second.forward(a1)
    assert a2.startswith("SRS1=") and "=first.example==" in a2 and a2.endswith("@second.example")
    back = second.reverse(a2)
    assert back.endswith("@first.example") and back.startswith("SRS0=")
    assert first.reverse(back) == "alice@example.net"
    # A third hop keeps naming the first forwarder: the address does not grow.
    third = codec(domain="third.example", secret=b"three")
    a3 = third.forward(a2)
    assert "=first.example==" in a3 and len(a3) < len(a2) + 10


def test_our_own_srs_addresses_are_not_rewritten_again() -> None:
    srs = codec()
    a = srs.forward("alice@example.net")
    assert srs.forward(a) == a
    assert is_srs("SRS0=abcd=AB=x=y") and not is_srs("alice")


def test_secret_is_made_once_owner_only(tmp_path: Path) -> None:
    s1 = load_secret(tmp_path / "run")
    s2 = load_secret(tmp_path / "run")
    assert s1 == s2 and len(s1) == 64
    mode = stat.S_IMODE(os.stat(tmp_path / "run" / "srs.secret").st_mode)
    assert mode == 0o600
