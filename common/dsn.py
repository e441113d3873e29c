"""Delivery status notification parameters (RFC 3461): read them, check them, write them.

The client asks, per message, for the whole message or only its header back
in a bounce (RET=FULL|HDRS) and names the transaction (ENVID); per
recipient, which notices it wants (NOTIFY=NEVER, or any of SUCCESS, FAILURE,
DELAY) and the address it originally gave (ORCPT).  The listener checks the
syntax here (a bad value is 501 5.5.4), the queue stores what it read, and
the queue manager writes the same parameters on to a next hop that offers
DSN.  ENVID and the address in ORCPT travel as xtext (RFC 3461 4); they are
kept decoded.

Nothing here knows about queues or sessions.
"""

from __future__ import annotations

import re

from common.reply import PARAM_SYNTAX, SMTPError

# RFC 3461 4: xtext is printable ASCII except "+" and "=", which are "+XX".
_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*")
_ADDR_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")  # RFC 3461 4.2: an atom, e.g. rfc822
MAX_ENVID = 100  # RFC 3461 4.4
MAX_ORCPT = 500  # RFC 3461 4.2
NOTIFY_VALUES = frozenset({"SUCCESS", "FAILURE", "DELAY"})


def xtext_decode(text: str, what: str) -> str:
    if not _XTEXT.fullmatch(text):
        raise SMTPError(PARAM_SYNTAX.with_text(f"{what} is not valid xtext"))
    return re.sub(r"\+([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), text)


def xtext_encode(text: str) -> str:
    return "".join(c if 0x21 <= ord(c) <= 0x7E and c not in "+=" else f"+{ord(c):02X}" for c in text)


def parse_ret(value: str) -> str:
    """RET=FULL or RET=HDRS; returns FULL or HDRS."""
    v = value.upper()
    if v not in ("FULL", "HDRS"):
        raise SMTPError(PARAM_SYNTAX.with_text("RET must be FULL or HDRS"))
    return v


def parse_envid(value: str) -> str:
    """ENVID=xtext; returns the decoded envelope id."""
    decoded = xtext_decode(value, "ENVID")
    if not decoded or len(value) > MAX_ENVID or any(not 0x20 <= ord(c) <= 0x7E for c in decoded):
        raise SMTPError(PARAM_SYNTAX.with_text("ENVID must be 1 to 100 printable characters"))
    return decoded


def parse_notify(value: str) -> str:
    """NOTIFY=NEVER or a list of SUCCESS, FAILURE, DELAY; returns it upper-case, in a fixed order."""
    parts = value.upper().split(",")
    if parts == ["NEVER"]:
        return "NEVER"
    if not parts or any(p not in NOTIFY_VALUES for p in parts) or len(set(parts)) != len(parts):
        raise SMTPError(PARAM_SYNTAX.with_text("NOTIFY must be NEVER or SUCCESS, FAILURE, DELAY"))
    return ",".join(p for p in ("SUCCESS", "FAILURE", "DELAY") if p in parts)


def parse_orcpt(value: str) -> str:
    """ORCPT=addr-type;xtext; returns 'addr-type;address' with the address decoded."""
    kind, semi, encoded = value.partition(";")
    if not semi or not _ADDR_TYPE.fullmatch(kind) or not encoded or len(value) > MAX_ORCPT:
        raise SMTPError(PARAM_SYNTAX.with_text("ORCPT must be addr-type;address"))
    address = xtext_decode(encoded, "ORCPT")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in address):
        raise SMTPError(PARAM_SYNTAX.with_text("ORCPT must be printable"))
    return f"{kind.lower()};{address}"


def wants(notify: str, what: str) -> bool:
    """Does a recipient with this NOTIFY value want the notice `what` (SUCCESS, FAILURE, DELAY)?

    Without NOTIFY, failures and delays are reported and success is not
    (RFC 3461 4.1: the default is FAILURE and, at the MTA's choice, DELAY).
    """
    if not notify:
        return what != "SUCCESS"
    return what in notify.split(",")


def mail_params(*, ret: str, envid: str) -> list[str]:
    """The DSN parameters for MAIL FROM to a next hop that offers DSN."""
    out = [f"RET={ret}"] if ret else []
    if envid:
        out.append(f"ENVID={xtext_encode(envid)}")
    return out


def rcpt_params(*, notify: str, orcpt: str) -> list[str]:
    """The DSN parameters for RCPT TO to a next hop that offers DSN."""
    out = [f"NOTIFY={notify}"] if notify else []
    if orcpt:
        kind, _, address = orcpt.partition(";")
        out.append(f"ORCPT={kind};{xtext_encode(address)}")
    return out
