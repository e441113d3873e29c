"""A message's header and body: the one place that splits them, and folds and unfolds fields.

A message is a header, an empty line and a body (RFC 5322 2.1).  Its lines end
in CRLF on the wire and in LF where the MDA stores them, and every reader here
takes both alike, as the readers after us do (Dovecot, mail clients, dkimpy):

- a line ends at LF, with or without a CR before it (a CR alone ends nothing;
  the SMTP engine refuses bare CR and LF in DATA, so only a BINARYMIME message
  or one we wrote ourselves could mix the two);
- the header ends at the first empty line; a message that begins with one has
  no header, and a message without one is all header, with no body;
- a field is a name, a colon and a value, and goes on over the lines after it
  that begin with a space or a tab (folding, RFC 5322 2.2.3).  The obsolete
  `Name :` (4.5.x) is a field too: a reader takes it for one, so a check or a
  removal must see it.  A line in the header that is neither is no field.

So `split(m).header + split(m).blank + split(m).body == m` for every `m`, and
no octet of the body is ever read as a field.  Nothing here parses addresses,
decodes encoded words or knows the config.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

# The empty line that ends the header: at the start, or right after a line end.
_EMPTY_LINE = re.compile(rb"(?:\A|(?<=\n))\r?\n")
# One field: its name (printable, no colon), its first line and its continuation lines.
_FIELD = re.compile(rb"(?m)^([!-9;-~]+)[ \t]*:[^\n]*(?:\n[ \t][^\n]*)*\n?")
_LINE_END = re.compile(rb"\r?\n\Z")
_FOLD = re.compile(rb"\r?\n(?=[ \t])")


class Parts(NamedTuple):
    """A message cut in three; joined again they are the message, octet for octet."""

    header: bytes  # the header's lines, each with its line end (b"" when there is no header)
    blank: bytes  # the empty line that ends it: b"\r\n" or b"\n"; b"" when there is none
    body: bytes  # what follows the empty line (b"" when there is none)


def split(message: bytes) -> Parts:
    """The header, the empty line that ends it, and the body."""
    m = _EMPTY_LINE.search(message)
    if m is None:
        return Parts(message, b"", b"")
    return Parts(message[: m.start()], m.group(), message[m.end() :])


def header_of(message: bytes) -> bytes:
    """The header of `message`, each line with its line end (the whole message when it has no body)."""
    m = _EMPTY_LINE.search(message)
    return message if m is None else message[: m.start()]


@dataclass(frozen=True, slots=True)
class Field:
    """One header field as it was written."""

    name: str  # as written, without the space an obsolete `Name :` puts before the colon
    raw: bytes  # the whole field: name, value, continuation lines, and its last line end
    start: int  # where it begins and ends in the header (or the message) it was found in
    end: int

    @property
    def value(self) -> bytes:
        """What follows the colon, folded as it came, without the field's last line end."""
        return _LINE_END.sub(b"", self.raw.split(b":", 1)[1])

    def text(self) -> str:
        """The value unfolded and trimmed, as text (octets that are not UTF-8 kept as surrogates)."""
        return unfold(self.value).decode("utf-8", "surrogateescape").strip()


def fields(message: bytes) -> list[Field]:
    """Every field of the header of `message` (a whole message, or a header alone), in order."""
    end = len(header_of(message))
    return [
        Field(m.group(1).decode("ascii"), m.group(0), m.start(), m.end())
        for m in _FIELD.finditer(message, 0, end)
    ]


def values(message: bytes, name: str) -> list[str]:
    """The unfolded, trimmed value of every field called `name` (any case), in order."""
    low = name.lower()
    return [f.text() for f in fields(message) if f.name.lower() == low]


def remove(message: bytes, drop: Callable[[Field], bool]) -> bytes:
    """`message` without the header fields `drop` picks, each with its continuation lines;
    everything else, the body above all, stays octet for octet."""
    out, pos = [], 0
    for f in fields(message):
        if drop(f):
            out.append(message[pos : f.start])
            pos = f.end
    if pos == 0:
        return message
    out.append(message[pos:])
    return b"".join(out)


def unfold(value: bytes) -> bytes:
    """A folded value on one line: each line end before a space or tab removed (RFC 5322 2.2.3)."""
    return _FOLD.sub(b"", value)


def fold(name: str, lines: Sequence[str]) -> str:
    """A field we write: `name`, then `lines`, each after the first on a continuation line
    starting with a tab, ending in CRLF."""
    return f"{name}: " + "\r\n\t".join(lines) + "\r\n"
