"""The rule every password setter applies (common/passwords.py): length, the shipped
list of well-known passwords, predictable runs and the account's own words."""

from __future__ import annotations

import pytest

from common import passwords
from common.passwords import WeakPassword, check


@pytest.mark.parametrize(
    "good",
    [
        "purple otter kettle mirror",
        "fifteen chars!!",  # exactly the minimum
        "zx81-Spectrum-Amstrad",
        "日本語のパスフレーズはこれです",  # 15 code points, however many bytes
        "!@#$%^&*()!@#$%",  # symbols only: no letters to compare, and not a run
        "a" * 3 + "b" * 12 + "c",  # repeated letters inside, not one repeated group
    ],
)
def test_good_passwords_pass(good: str) -> None:
    check(good, address="alice@example.org")


@pytest.mark.parametrize(
    ("weak", "why"),
    [
        ("", "empty"),
        ("short", "too short"),
        ("fourteen chars", "too short"),
        ("x" * (passwords.MAX_LENGTH + 1), "too long"),
        ("correct horse battery staple", "well-known"),
        ("CorrectHorse-BatteryStaple!", "well-known"),  # case, spaces and punctuation do not matter
        ("the quick brown fox jumps over the lazy dog", "well-known"),
        ("qwertyuiop123456", "well-known"),
        ("aaaaaaaaaaaaaaaa", "predictable"),
        ("abcdabcdabcdabcd", "predictable"),
        ("0123456789012345", "predictable"),
        ("9876543210987654", "predictable"),
        ("abcdefghijklmnopq", "predictable"),
        ("lkjhgfdsapoiuytr", "predictable"),
        ("my name is alice, hello!", "'alice'"),
        ("Example Org rules forever", "'example'"),
        ("mailroom is my mail server", "'mailroom'"),
        ("fifteen chars\x00!!", "control character"),
        ("tab\there is not allowed", "control character"),
    ],
)
def test_weak_passwords_are_refused_with_the_reason(weak: str, why: str) -> None:
    with pytest.raises(WeakPassword, match=why):
        check(weak, address="alice@example.org")


def test_short_context_words_are_not_looked_for() -> None:
    """A two-letter local part is in too many words to refuse every password that holds it."""
    check("al fresco dining at noon", address="al@ex.org")


def test_the_shipped_list_is_package_data() -> None:
    from importlib import resources

    text = resources.files("common").joinpath("weak_passwords.txt").read_text("utf-8")
    entries = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert len(entries) >= 100
    # Only entries that pass the length rule need to be there.
    assert all(len(e) >= passwords.MIN_LENGTH for e in entries), [e for e in entries if len(e) < 15]
