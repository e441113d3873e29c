"""Envelope addresses: parsing `MAIL FROM:<...>` / `RCPT TO:<...>` and checking them.

RFC 5321 4.1.2 grammar, with the limits of 4.5.3.1 (local part 64 octets,
domain 255).  Relay tricks are not special-cased here: a source route is
dropped (RFC 5321 C: "SHOULD ... ignore"), and `%`, `!` or a quoted `@` stay in
the local part, where they can only ever name a user that does not exist.
"""

from __future__ import annotations

import functools
import re

from common.reply import BAD_RECIPIENT_SYNTAX, BAD_SENDER_SYNTAX, Reply, SMTPError

MAX_LOCAL = 64
MAX_DOMAIN = 255

_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOT_ATOM = re.compile(rf"{_ATOM}(?:\.{_ATOM})*")
_QUOTED = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"')
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_PARAM = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*(?:=[\x21-\x3c\x3e-\x7e]+)?")


def split(address: str) -> tuple[str, str]:
    """'a@b' -> ('a', 'b'); the last '@' separates them (a quoted local part may hold '@')."""
    local, _, domain = address.rpartition("@")
    return local, domain


def domain_of(address: str) -> str:
    return split(address)[1].lower()


# Most mail names a few domains again and again: each is checked once (a bounded cache).
@functools.lru_cache(maxsize=4096)
def _valid_domain(domain: str, utf8: bool) -> bool:
    if domain.startswith("[") and domain.endswith("]"):
        return bool(re.fullmatch(r"\[(?:IPv6:)?[0-9A-Fa-f:.]+\]", domain))
    if utf8:
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            return False
    labels = domain.split(".")
    return all(_LABEL.fullmatch(label) for label in labels)


def _valid_local(local: str, utf8: bool) -> bool:
    if _QUOTED.fullmatch(local):
        return True
    if utf8 and any(ord(c) > 127 for c in local):
        return all(c.isprintable() and c not in ' "(),:;<>@[\\]' for c in local)
    return bool(_DOT_ATOM.fullmatch(local))


def parse_path(arg: str, *, sender: bool, utf8: bool = False) -> tuple[str, list[str]]:
    """Parse the argument after `FROM:` or `TO:`.

    Returns the address ("" for the null sender) and the ESMTP parameters.
    Raises SMTPError with 501 5.1.7 (sender) or 501 5.1.3 (recipient).
    """
    bad: Reply = BAD_SENDER_SYNTAX if sender else BAD_RECIPIENT_SYNTAX
    # Look before stripping: str.strip() would quietly drop a CR or LF at either end.
    if any(c in arg for c in "\x00\r\n"):
        raise SMTPError(bad.with_text("Bad address syntax: control character"))
    text = arg.strip(" \t")
    if text.startswith("<"):
        end = _closing_bracket(text)
        if end < 0:
            raise SMTPError(bad)
        path, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(" "):
            raise SMTPError(bad)
    else:
        # Many clients omit the brackets; Postfix accepts that too.
        path, _, rest = text.partition(" ")
    params = rest.split()
    for p in params:
        if not _PARAM.fullmatch(p):
            raise SMTPError(bad.with_text(f"Bad parameter {p[:40]!r}"))
    if path.startswith("@"):
        # A source route (@relay1,@relay2:user@host): ignored, RFC 5321 C.
        _, colon, path = path.partition(":")
        if not colon:
            raise SMTPError(bad)
    if path == "":
        if sender:
            return "", params
        raise SMTPError(bad)
    local, at, domain = path.rpartition("@")
    if not at or not local or not domain:
        if not sender and path.lower() == "postmaster":
            return path, params  # RFC 5321 4.5.1: <Postmaster> must be accepted
        raise SMTPError(bad.with_text("Bad address syntax: need local@domain"))
    if len(local.encode()) > MAX_LOCAL:
        raise SMTPError(bad.with_text("Local part too long (64 octets at most)"))
    if len(domain.encode()) > MAX_DOMAIN:
        raise SMTPError(bad.with_text("Domain too long (255 octets at most)"))
    if not _valid_local(local, utf8) or not _valid_domain(domain, utf8):
        raise SMTPError(bad)
    return f"{local}@{domain.lower()}", params


def _closing_bracket(text: str) -> int:
    quoted = escaped = False
    for i, c in enumerate(text):
        if escaped:
            escaped = False
        elif c == "\\" and quoted:
            escaped = True
        elif c == '"':
            quoted = not quoted
        elif c == ">" and not quoted:
            return i
    return -1


def lookup_key(address: str, delimiter: str = "") -> str:
    """The form under which a local address is looked up: lower-case, without +tag."""
    local, domain = split(address.lower())
    if delimiter and delimiter in local and not local.startswith('"'):
        local = local.split(delimiter, 1)[0]
    return f"{local}@{domain}"
