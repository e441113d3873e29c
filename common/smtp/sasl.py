"""SASL for AUTH (RFC 4954): the PLAIN (RFC 4616) and LOGIN mechanisms, as a pure exchange.

`exchange(arg)` takes AUTH's argument (the mechanism and any initial
response) and is a generator: it yields each challenge the session sends
(the text of a 334, already base64), is sent each line the client answers
with, and returns the login and password it decoded.  The session does the
talking and the handler decides whether the password is right; nothing here
touches a socket.

A bad exchange raises SMTPError: a mechanism missing (501 5.5.4) or other
than PLAIN and LOGIN (504 5.5.4), before any challenge; an answer of "*"
(501 5.0.0, RFC 4954 4); base64 that cannot be decoded or a PLAIN value that
does not split in three (501 5.5.2, `R.AUTH_SYNTAX`: the MSA counts those as
failed logins).
"""

from __future__ import annotations

import binascii
from base64 import b64decode
from collections.abc import Generator

from common import reply as R
from common.reply import SMTPError

# The LOGIN mechanism's prompts, as clients expect them: "Username:" and "Password:".
USERNAME = "VXNlcm5hbWU6"
PASSWORD = "UGFzc3dvcmQ6"

# Challenges out (base64 text), the client's answer lines in, (login, password) at the end.
Exchange = Generator[str, bytes, tuple[str, str]]


def exchange(arg: str) -> Exchange:
    """The exchange `AUTH arg` starts: "PLAIN", "PLAIN <initial response>", "LOGIN", ..."""
    mechanism, _, initial = arg.partition(" ")
    mechanism = mechanism.upper()
    if mechanism == "PLAIN":
        blob = decode(initial.strip()) if initial else answer((yield ""))
        parts = blob.split(b"\x00")  # authzid NUL authcid NUL passwd (RFC 4616 2)
        if len(parts) != 3:
            raise SMTPError(R.AUTH_SYNTAX.with_text("Cannot split AUTH PLAIN value"))
        login, password = parts[1], parts[2]
    elif mechanism == "LOGIN":
        login = decode(initial.strip()) if initial else answer((yield USERNAME))
        password = answer((yield PASSWORD))
    elif not mechanism:
        raise SMTPError(R.PARAM_SYNTAX.with_text("Syntax: AUTH mechanism"))
    else:
        raise SMTPError(R.AUTH_MECHANISM)
    return login.decode("utf-8", "replace"), password.decode("utf-8", "replace")


def answer(line: bytes) -> bytes:
    """The client's answer to a challenge, decoded; "*" cancels the exchange (RFC 4954 4)."""
    if line == b"*":
        raise SMTPError(R.AUTH_CANCELLED)
    return decode(line.decode("ascii", "replace"))


def decode(text: str) -> bytes:
    """Base64 as RFC 4954 4 sends it (strictly: no stray characters)."""
    try:
        return b64decode(text.encode("ascii", "replace"), validate=True)
    except (binascii.Error, ValueError):
        raise SMTPError(R.AUTH_SYNTAX.with_text("Cannot decode base64")) from None
