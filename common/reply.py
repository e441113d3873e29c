"""SMTP/LMTP replies as values: a code, an enhanced status code and a text.

Handlers raise `SMTPError(reply)`; one place (`Session._reply` in
common/smtp/session.py) turns it into the line on the wire.  Keeping the replies here, named and with the RFC that
defines them, means a reader can check every answer Mailroom gives in one page.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.numbers import is_decimal


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    status: str  # enhanced status code, RFC 3463, e.g. "5.1.1"
    text: str

    def __str__(self) -> str:
        # Replies without an enhanced code: the greeting, EHLO, 334 and 354 (RFC 2034 3).
        return f"{self.code} {self.status} {self.text}" if self.status else f"{self.code} {self.text}"

    @property
    def is_ok(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def with_text(self, text: str) -> Reply:
        return Reply(self.code, self.status, text)


class SMTPError(Exception):
    """Raised by a handler to refuse a command with a specific reply."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


def parse_reply(code: int, lines: list[str]) -> Reply:
    """Build a Reply from a peer's answer, taking its enhanced code if it sent one."""
    text = " ".join(line.strip() for line in lines)
    first, _, rest = text.partition(" ")
    parts = first.split(".")
    if len(parts) == 3 and all(is_decimal(p) for p in parts) and first[0] == str(code)[0]:
        return Reply(code, first, rest)
    default = {2: "2.0.0", 4: "4.0.0", 5: "5.0.0"}.get(code // 100, "5.0.0")
    return Reply(code, default, text)


# RFC 5321 4.2.2 and RFC 3463 / RFC 5248 for the enhanced codes.
OK = Reply(250, "2.0.0", "Ok")
SENDER_OK = Reply(250, "2.1.0", "Sender ok")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient ok")
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")  # RFC 4954 6
BYE = Reply(221, "2.0.0", "Bye")  # RFC 5321 4.1.1.10
READY_FOR_TLS = Reply(220, "2.0.0", "Ready to start TLS")  # RFC 3207 4
# RFC 5321 4.1.1.8
HELP = Reply(250, "2.0.0", "Supported commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY STARTTLS AUTH")
CANNOT_VRFY = Reply(252, "2.5.0", "Cannot VRFY user, but will accept message")  # RFC 5321 3.5.3
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")  # RFC 5321 4.1.1.4
# Always said with a text of their own (our host name, the challenge), given where they are said.
GREETING = Reply(220, "", "Service ready")  # RFC 5321 3.1, 4.2: the text begins with our host name
HELLO = Reply(250, "", "Hello")  # RFC 5321 4.1.1.1: our host name, then one EHLO keyword a line
AUTH_CHALLENGE = Reply(334, "", "")  # RFC 4954 4: the challenge in base64, "" for none

# 4xx: temporary, the client keeps the message and tries again.
# 421 always closes the session (RFC 5321 3.8).
TIMEOUT = Reply(421, "4.4.2", "Idle timeout, closing connection")
SESSION_TIMEOUT = Reply(421, "4.4.2", "Session time limit reached, closing connection")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
LOCAL_ERROR_CLOSING = Reply(421, "4.3.0", "Local error, closing connection")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
TOO_MANY_AUTH_FAILURES = Reply(421, "4.7.0", "Too many authentication failures, try later")
MAILBOX_LOCKED = Reply(451, "4.2.0", "Mailbox busy, try again later")
LOCAL_ERROR = Reply(451, "4.3.0", "Local error in processing, try again later")
NEXT_HOP_UNAVAILABLE = Reply(451, "4.4.1", "Next hop unavailable, try again later")
# What our client side reports for a hop that failed: kept on the queue and put in
# DSNs, each with the RFC 3463 code that names the failure.
CONNECTION_LOST = Reply(451, "4.4.2", "Connection to the next hop lost")  # X.4.2 bad connection
DNS_FAILED = Reply(451, "4.4.3", "DNS lookup failed, try again later")  # X.4.3 directory server failure
PEER_PROTOCOL_ERROR = Reply(451, "4.5.0", "The next hop broke the protocol")  # X.5.0
# X.7.5 cryptographic failure: STARTTLS missing or failed where RFC 3207, DANE (RFC 7672)
# or MTA-STS (RFC 8461) require it.
TLS_FAILED = Reply(451, "4.7.5", "TLS with the next hop failed")
# X.7.0: our own relayhost refusing our password is our misconfiguration, so the mail waits.
RELAY_AUTH_REFUSED = Reply(451, "4.7.0", "relayhost refused authentication")
RATE_LIMITED = Reply(451, "4.7.1", "Sending rate limit exceeded, try again later")
DISK_LOW = Reply(452, "4.3.1", "Insufficient system storage")  # RFC 5321 4.2.2, RFC 3463 X.3.1
# Not a client error: the recipients accepted so far are kept (RFC 5321 4.5.3.1.10).
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")

# 5xx: permanent.
SYNTAX_ERROR = Reply(500, "5.5.2", "Syntax error, command unrecognized")
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")  # RFC 5321 4.5.3.1.4/6
PARAM_SYNTAX = Reply(501, "5.5.4", "Syntax error in parameters")
USE_LHLO = Reply(500, "5.5.2", "This is LMTP: use LHLO")  # RFC 2033 4.1: no HELO or EHLO in LMTP
# RFC 5321 4.1.1.1: a domain or an address literal (RFC 6531 3.3: or U-labels); RFC 3463 X.5.4.
BAD_HELLO = Reply(501, "5.5.4", "Invalid HELO/EHLO name: a domain name or an address literal is needed")
AUTH_SYNTAX = Reply(501, "5.5.2", "Cannot decode the AUTH response")  # RFC 4954 4
AUTH_CANCELLED = Reply(501, "5.0.0", "Authentication cancelled")  # RFC 4954 4
NOT_AVAILABLE = Reply(502, "5.5.1", "Command not available")  # RFC 5321 4.2.4
AUTH_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication mechanism")  # RFC 4954 6
PARAM_NOT_RECOGNIZED = Reply(555, "5.5.4", "Parameter not recognized")  # RFC 5321 4.1.1.11
STARTTLS_FIRST = Reply(530, "5.7.0", "Must issue a STARTTLS command first")  # RFC 3207 4
BAD_SENDER_SYNTAX = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT_SYNTAX = Reply(501, "5.1.3", "Bad recipient address syntax")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
NEED_MAIL = Reply(503, "5.5.1", "Need MAIL command first")  # RFC 5321 4.1.4: RCPT and DATA follow MAIL
BINARYMIME_NEEDS_BDAT = Reply(503, "5.5.1", "BODY=BINARYMIME needs BDAT, not DATA")  # RFC 3030 3
NO_VALID_RECIPIENTS = Reply(503, "5.5.1", "No valid recipients")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")  # RFC 4954 6
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")  # RFC 4954 6
ENCRYPTION_REQUIRED = Reply(538, "5.7.11", "Encryption required for authentication")
# SMTP smuggling defence: said once, then the connection is closed (as Postfix does).
BARE_LINE_ENDING = Reply(521, "5.5.2", "Bare CR or LF received, closing connection (use CRLF)")
# In a BDAT message the framing is by count, so the session can go on (RFC 3030 2).
BARE_LINE_IN_MESSAGE = Reply(550, "5.6.0", "Bare CR or LF in message (use CRLF)")
# Without a size the chunk's end cannot be found, so nothing after it can be read as a
# command: the session ends after this reply (RFC 3030 2).
BDAT_SYNTAX = Reply(501, "5.5.4", "Syntax: BDAT size [LAST], the size in ASCII digits; closing connection")
UNKNOWN_USER = Reply(550, "5.1.1", "Recipient address rejected: user unknown")
NO_SUCH_DOMAIN = Reply(550, "5.1.2", "Host or domain name not found")  # RFC 3463 X.1.2
NULL_MX = Reply(556, "5.1.10", "Domain does not accept mail (null MX)")  # RFC 7505 3, RFC 7504 3
# A Sieve reject (RFC 5429 2.1.1): the script's reason is the text, this when it gives none.
SIEVE_REJECT = Reply(550, "5.7.1", "Refused by the recipient's filter")
# The operator bounced the message by hand; RFC 3463 X.0.0, as no other code says why.
RETURNED_BY_ADMIN = Reply(550, "5.0.0", "Returned to sender by the mail administrator")
OVER_QUOTA = Reply(552, "5.2.2", "Mailbox full")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed limit")
# A BDAT chunk over the limit is refused before its octets are read, so they cannot be
# told from commands: the session ends after this reply (RFC 3030 2).
CHUNK_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed limit; closing connection")
HEADER_SENDER_DENIED = Reply(550, "5.7.1", "From: header address not owned by you")
SENDER_DENIED = Reply(553, "5.7.1", "Sender address not owned by you")
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
# A hop between our hosts (common/hop_tls.py) from a certificate whose node is not in [cluster] peers:
# temporary, so that a node left out by mistake defers its mail until the list is fixed, never bounces it.
NOT_A_PEER = Reply(421, "4.7.0", "Not a node of this installation, closing connection")
# The MTA's internal listener takes only our MSA: on its Unix socket, the uid the
# daemons run as (SO_PEERCRED); over TCP, AUTH with the installation's secret first.
NOT_OUR_MSA = Reply(554, "5.7.1", "This listener is for Mailroom's MSA only")
TRACE_SYNTAX = Reply(501, "5.5.4", "XTRACE must be 18 hexadecimal digits (0-9, A-F)")
TRACE_TAKEN = Reply(554, "5.5.4", "XTRACE names a message already queued; not queued again")
MAIL_LOOP = Reply(554, "5.4.6", "Too many hops, mail loop detected")
