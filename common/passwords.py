"""What a new password must be: long enough, and not one every guesser tries first.

Every way a password is set (`mailroom user add`, `mailroom user passwd`, and
any later setter) calls `check` before hashing, so the rule lives here once.
The rule follows NIST SP 800-63B-4 (3.1.1.2) for passwords that are the only
factor, as a mail password is (IMAP, POP3 and SMTP AUTH ask for nothing else):

- at least MIN_LENGTH (15) characters, counted as Unicode code points, and at
  most MAX_LENGTH (NIST asks that at least 64 be allowed);
- no composition rules (no "one digit and one capital"): length is what
  makes a guess expensive, and a passphrase of a few words is easy to type;
- not on a blocklist: the well-known passwords shipped in
  `common/weak_passwords.txt` (compared without case, spaces or
  punctuation, so "Correct Horse Battery Staple!" is the famous one too), one
  character or a short group repeated ("aaaa...", "abcabc..."), a plain run
  of the keyboard's digits or letters, and words from the context: the
  user's own name (the address's local part), the domain's first label and
  the program's name.
- no control characters: AUTH PLAIN cannot carry a NUL, and a client cannot
  type the others.

What is stored is the password exactly as given (no Unicode normalisation):
the MSA and Dovecot compare what the client sends with the same hash.
Knows nothing about users or the database; `common/users.py` hashes.
"""

from __future__ import annotations

import functools
import unicodedata
from importlib import resources

MIN_LENGTH = 15
MAX_LENGTH = 256
# Context words shorter than this are not looked for inside a password ("al" is in too many).
MIN_CONTEXT = 4
PRODUCT = "mailroom"


class WeakPassword(ValueError):
    """Why a proposed password is refused (the message says it to the operator)."""


@functools.cache
def _blocklist() -> frozenset[str]:
    text = resources.files("common").joinpath("weak_passwords.txt").read_text("utf-8")
    return frozenset(_squash(line) for line in text.splitlines() if line.strip() and not line.startswith("#"))


def _squash(text: str) -> str:
    """Lower-case letters and digits only: how passwords are compared with the list and the context."""
    return "".join(c for c in text.lower() if c.isalnum())


def _repeated(text: str) -> bool:
    """One character, or one group of up to four, over and over ("zzzz...", "abcabcabc...")."""
    return any(len(text) % n == 0 and text == text[:n] * (len(text) // n) for n in range(1, 5) if n < len(text))


_RUNS = ("0123456789" * 3, "abcdefghijklmnopqrstuvwxyz" * 2, "qwertyuiopasdfghjklzxcvbnm" * 2,
         "1qaz2wsx3edc4rfv5tgb6yhn7ujm8ik9ol0p" * 2, "1q2w3e4r5t6y7u8i9o0p" * 2)


def _keyboard_run(text: str) -> bool:
    """A stretch of digits, the alphabet or a keyboard row, forwards or backwards."""
    return any(text in run or text[::-1] in run for run in _RUNS)


def check(password: str, *, address: str = "") -> None:
    """Raise WeakPassword (saying why) unless `password` may be set for `address`."""
    if not password:
        raise WeakPassword("empty password")
    if any(unicodedata.category(c) == "Cc" for c in password):
        raise WeakPassword("the password has a control character (a client cannot send it)")
    if len(password) < MIN_LENGTH:
        raise WeakPassword(f"too short: {len(password)} character{'s' if len(password) > 1 else ''}; "
                           f"at least {MIN_LENGTH} (a few words make a good one)")
    if len(password) > MAX_LENGTH:
        raise WeakPassword(f"too long: at most {MAX_LENGTH} characters")
    squashed = _squash(password)
    if squashed in _blocklist():
        raise WeakPassword("a well-known password (every guesser tries it first)")
    for form in {password.lower(), squashed} - {""}:
        if _repeated(form) or _keyboard_run(form):
            raise WeakPassword("too predictable: a repeated or keyboard sequence")
    local, _, domain = address.lower().partition("@")
    context = [_squash(local), _squash(domain.split(".")[0]), PRODUCT]
    for word in context:
        if len(word) >= MIN_CONTEXT and word in squashed:
            raise WeakPassword(f"it contains {word!r}, which a guesser of this account tries first")
