"""Openings of the adversarial dialogues (hello; TLS and AUTH on the MSA) and the listeners they run against."""

from __future__ import annotations

import base64

from tests.harness.client import STARTTLS_HANDSHAKE, Step, line
from tests.support.suite import PASSWORD


def auth_plain(user: str, password: str = PASSWORD) -> bytes:
    token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    return line(f"AUTH PLAIN {token}")


def smtp_hello() -> list[Step]:
    """MTA public listener: greeting and EHLO."""
    return [(None, "220 "), (line("EHLO client.example"), "250 ")]


def lmtp_hello() -> list[Step]:
    """MDA: greeting and LHLO."""
    return [(None, "220 "), (line("LHLO mta.example"), "250 ")]


def msa_login(user: str = "alice@example.org") -> list[Step]:
    """MSA submission port: EHLO, STARTTLS, EHLO again, AUTH PLAIN."""
    return [
        (None, "220 "),
        (line("EHLO client.example"), "250 "),
        (line("STARTTLS"), "220 "),
        (STARTTLS_HANDSHAKE, None),
        (line("EHLO client.example"), "250 "),
        (auth_plain(user), "235 2.7.0"),
    ]


def transaction(sender: str, recipient: str) -> list[Step]:
    """MAIL and one RCPT, both accepted, then DATA's 354."""
    return [
        (line(f"MAIL FROM:<{sender}>"), "250 2.1.0"),
        (line(f"RCPT TO:<{recipient}>"), "250 2.1.5"),
        (line("DATA"), "354 "),
    ]


# The three listeners a stranger can talk to, with the opening each needs and a
# transaction it accepts (sender, recipient).
LISTENERS = {
    "msa": ("submission", msa_login, "alice@example.org", "bob@example.org"),
    "mta": ("smtp", smtp_hello, "someone@remote.example", "alice@example.org"),
    "mda": ("lmtp", lmtp_hello, "someone@remote.example", "alice@example.org"),
}
