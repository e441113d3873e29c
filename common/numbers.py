"""Whole numbers read from text someone else wrote: ASCII digits only.

`int()` and `str.isdigit()` take any Unicode digit: `int("٥")` is 5, `"²".isdigit()`
is True and `int("²")` raises.  A protocol number (a BDAT size, SIZE=, a reply
code, a port) is written in ASCII digits (RFC 5234's DIGIT, %x30-39), so
anything else is refused, never guessed at.
"""

from __future__ import annotations


def is_decimal(text: str) -> bool:
    """True when `text` is one or more of the ASCII digits 0-9 and nothing else."""
    return text.isascii() and text.isdigit()


def decimal(text: str) -> int:
    """The number `text` writes in ASCII digits; ValueError for anything else (signs, spaces too)."""
    if not is_decimal(text):
        raise ValueError(f"expected ASCII digits, got {text[:40]!r}")
    return int(text)
