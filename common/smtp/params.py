"""Command arguments the engine checks itself: the HELO/EHLO/LHLO name, BDAT's size, MAIL and RCPT parameters.

Pure functions over the argument text (as the session decoded it: UTF-8, with
undecodable octets kept as surrogates).  A bad argument raises SMTPError with
the reply; nothing here knows about sessions: what the listener offers (DSN,
REQUIRETLS, BINARYMIME, SMTPUTF8, the handler's own keywords) is passed in.

Numbers are ASCII digits only (common/numbers.py): `int()` took `BDAT ٥ LAST`
for 5.  A name must be what RFC 5321 4.1.1.1 allows after HELO/EHLO: a domain
(letters, digits and hyphens in dot-separated labels, RFC 5321 4.1.2; an
underscore is let through, as Postfix does, for the Windows machines that send
one) or an address literal (`[192.0.2.1]`, `[IPv6:2001:db8::1]`, RFC 5321
4.1.3; `[2001:db8::1]` without its tag too, as Postfix takes it), and, where
SMTPUTF8 is offered, a label may also be a U-label (RFC 6531 3.3: an
internationalized label in NFC that IDNA can encode).  Raw octets that are not
UTF-8, spaces and control characters are never a name.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import unicodedata

from common import reply as R
from common.dsn import parse_envid, parse_notify, parse_orcpt, parse_ret
from common.numbers import decimal, is_decimal
from common.reply import SMTPError

MAX_DOMAIN = 255  # RFC 5321 4.5.3.1.2
MAX_LABEL = 63  # RFC 1035 2.3.4
# Let-dig [Ldh-str] (RFC 5321 4.1.2), with "_" as Postfix's valid_hostname allows.
_LDH_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?", re.ASCII)
_IPV4 = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}", re.ASCII)
# General-address-literal (RFC 5321 4.1.3): Standardized-tag ":" 1*dcontent.
_GENERAL = re.compile(r"[A-Za-z0-9-]*[A-Za-z0-9]:[\x21-\x5a\x5e-\x7e]+", re.ASCII)


def hello_name(verb: str, arg: str, *, utf8: bool) -> str:
    """The client's name after HELO, EHLO or LHLO; SMTPError (501) when it is none."""
    if not arg:
        raise SMTPError(R.PARAM_SYNTAX.with_text(f"Syntax: {verb} hostname"))
    if not (is_address_literal(arg) if arg[:1] == "[" else is_domain(arg, utf8=utf8)):
        raise SMTPError(R.BAD_HELLO)
    return arg


def is_domain(name: str, *, utf8: bool = False) -> bool:
    """A domain as RFC 5321 4.1.2 writes it (no trailing dot); U-labels too when `utf8`."""
    if len(name) > MAX_DOMAIN:
        return False
    for label in name.split("."):
        if label.isascii():
            if len(label) > MAX_LABEL or not _LDH_LABEL.fullmatch(label):
                return False
        elif not (utf8 and is_u_label(label)):
            return False
    return True


def is_u_label(label: str) -> bool:
    """An internationalized label (RFC 5890 2.3.2.1): printable, in NFC, and IDNA can encode it."""
    if not label.isprintable() or any(c.isspace() for c in label):
        return False  # undecodable octets (surrogates), controls and spaces included
    if not unicodedata.is_normalized("NFC", label):
        return False
    try:
        ascii_label = label.encode("idna")
    except UnicodeError:
        return False
    return ascii_label.startswith(b"xn--") and len(ascii_label) <= MAX_LABEL


# A client says the same HELO name in every session: each is parsed once (a bounded cache).
@functools.lru_cache(maxsize=4096)
def is_address_literal(text: str) -> bool:
    """`[IPv4]`, `[IPv6:address]` or a general `[tag:content]` (RFC 5321 4.1.3)."""
    if len(text) < 3 or text[0] != "[" or text[-1] != "]":
        return False
    inner = text[1:-1]
    if _IPV4.fullmatch(inner):
        return _address(inner) is not None
    tag, colon, rest = inner.partition(":")
    if colon and tag.upper() == "IPV6":
        # An IPv6 address, with no zone index (not in the grammar).
        return "%" not in rest and isinstance(_address(rest), ipaddress.IPv6Address)
    if _GENERAL.fullmatch(inner):
        return True
    # `[::1]` without its IPv6: tag, as Postfix takes it too.
    return "%" not in inner and isinstance(_address(inner), ipaddress.IPv6Address)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def bdat_args(arg: str) -> tuple[int, bool] | None:
    """BDAT's chunk size and whether it is the LAST (RFC 3030 2); None when they cannot be read."""
    size_text, _, last_text = arg.partition(" ")
    last = last_text.strip().upper()
    if not is_decimal(size_text) or last not in ("", "LAST"):
        return None
    return int(size_text), last == "LAST"


def size_param(value: str, limit: int) -> int:
    """SIZE= of MAIL FROM (RFC 1870 6): ASCII digits, at most `limit` (else 552 5.3.4)."""
    try:
        size = decimal(value)
    except ValueError:
        raise SMTPError(R.PARAM_SYNTAX.with_text("SIZE needs a number (ASCII digits)")) from None
    if size > limit:
        raise SMTPError(R.MESSAGE_TOO_BIG)
    return size


def mail_params(
    params: list[str], *, max_size: int, utf8: bool, dsn: bool, requiretls: bool, binarymime: bool,
    keywords: tuple[str, ...],
) -> dict[str, str]:
    """MAIL FROM's parameters, checked: each one at most once, with a value it may have.

    What the listener offers decides what is taken: RET and ENVID when `dsn`
    (RFC 3461 4.3, 4.4), REQUIRETLS when `requiretls` (RFC 8689), BODY=BINARYMIME
    when `binarymime` (RFC 3030 3), SMTPUTF8 when `utf8` (RFC 6531), and the
    handler's own `keywords` (XTRACE) as they are; SIZE= and BODY= always.
    """
    out: dict[str, str] = {}
    for p in params:
        key, _, value = p.partition("=")
        key = key.upper()
        if key in out:
            raise SMTPError(R.PARAM_SYNTAX.with_text(f"{key[:30]} given twice"))
        if key in ("RET", "ENVID") and dsn:
            value = parse_ret(value) if key == "RET" else parse_envid(value)
        elif key == "REQUIRETLS" and requiretls:
            if value:
                raise SMTPError(R.PARAM_SYNTAX.with_text("REQUIRETLS takes no value"))
        elif key == "SIZE":
            size_param(value, max_size)
        elif key == "BODY":
            types = body_types(binarymime=binarymime)
            if value.upper() not in types:
                raise SMTPError(R.PARAM_SYNTAX.with_text(f"BODY must be {' or '.join(types)}"))
        elif key == "SMTPUTF8":
            if value or not utf8:
                raise SMTPError(R.PARAM_SYNTAX.with_text("SMTPUTF8 takes no value"))
        elif key not in keywords:
            raise SMTPError(R.PARAM_NOT_RECOGNIZED.with_text(f"Unsupported parameter {key[:30]}"))
        out[key] = value
    return out


def body_types(*, binarymime: bool) -> tuple[str, ...]:
    """What BODY= may say (RFC 6152; BINARYMIME, RFC 3030 3, only where offered)."""
    return ("7BIT", "8BITMIME", "BINARYMIME") if binarymime else ("7BIT", "8BITMIME")


def rcpt_params(params: list[str], *, dsn: bool) -> dict[str, str]:
    """RCPT TO's parameters: NOTIFY and ORCPT (RFC 3461 4.1, 4.2), where DSN is offered; nothing else."""
    out: dict[str, str] = {}
    for p in params:
        key, _, value = p.partition("=")
        key = key.upper()
        if not dsn or key not in ("NOTIFY", "ORCPT"):
            raise SMTPError(R.PARAM_NOT_RECOGNIZED.with_text(f"Unsupported parameter {key[:30]}"))
        if key in out:
            raise SMTPError(R.PARAM_SYNTAX.with_text(f"{key} given twice"))
        out[key] = parse_notify(value) if key == "NOTIFY" else parse_orcpt(value)
    return out
