"""Which key set signs, and which mail is ours and leaving (no cryptography here)."""

from __future__ import annotations

from mta.auth.dkim import Key, from_domain, outgoing_domain, signing_keys

KEYS = [
    Key("example.org", "old", "rsa", b"", mtime=1.0), Key("example.org", "old", "ed25519", b"", mtime=1.0),
    Key("example.org", "new", "rsa", b"", mtime=2.0), Key("example.org", "new", "ed25519", b"", mtime=2.0),
    Key("example.com", "a", "rsa", b"", mtime=3.0),
]


def test_newest_set_signs_unless_a_selector_is_pinned() -> None:
    assert {(k.selector, k.algorithm) for k in signing_keys(KEYS, "example.org", {})} == {
        ("new", "rsa"), ("new", "ed25519"),
    }
    pinned = signing_keys(KEYS, "Example.ORG", {"example.org": "old"})
    assert {k.selector for k in pinned} == {"old"} and len(pinned) == 2
    assert signing_keys(KEYS, "example.net", {}) == []
    assert KEYS[0].dns_name == "old-rsa._domainkey.example.org"


def test_from_domain() -> None:
    assert from_domain(b"From: Alice <alice@Example.ORG>\r\n\r\n") == "example.org"
    assert from_domain(b"From: a@x.test\r\nFrom: b@y.test\r\n\r\n") is None  # two From fields
    assert from_domain(b"From: a@x.test, b@y.test\r\n\r\n") is None  # two authors
    assert from_domain(b"Subject: none\r\n\r\n") is None
    assert from_domain(b"From: \"Long name\"\r\n <alice@example.org>\r\n\r\n") == "example.org"


def test_only_our_mail_leaving_our_domains_is_signed() -> None:
    ours = b"From: alice@example.org\r\n\r\nx\r\n"
    local = ["example.org"]
    assert outgoing_domain(ours, trusted=True, recipients=["x@remote.test"], local_domains=local) == "example.org"
    assert outgoing_domain(ours, trusted=True, recipients=["bob@example.org"], local_domains=local) is None
    assert outgoing_domain(ours, trusted=False, recipients=["x@remote.test"], local_domains=local) is None
    theirs = b"From: someone@else.test\r\n\r\nx\r\n"
    assert outgoing_domain(theirs, trusted=True, recipients=["x@remote.test"], local_domains=local) is None
