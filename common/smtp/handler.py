"""The contract between the engine and a daemon: what a `Handler` is given and returns.

The engine owns the protocol (syntax, sequence, limits, TLS, the replies'
wording); a handler owns the decisions about mail (who may send, who exists,
where a message goes).  A handler method either returns (the command is
accepted; a returned `Reply` only changes the wording of the 2xx) or refuses
by raising `SMTPError(reply)`.  There is no other way to refuse.

After DATA, an SMTP handler returns one 2xx reply; an LMTP handler returns
one reply per accepted recipient, in order (RFC 2033 4.2): those are the
outcomes of the deliveries, and may be refusals.  If an LMTP handler raises
instead, the engine repeats that reply once per recipient.

Nothing here knows about queues, mailboxes or the config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from common.reply import AUTH_FAILED, Reply, SMTPError


@dataclass
class MailSession:
    """What is known about the client, for the life of one connection."""

    peer: Any = None  # the socket's peer address (a tuple; "" for a Unix socket)
    client_ip: str = ""  # "local" on a Unix socket
    host_name: str | None = None  # the HELO/EHLO/LHLO argument
    extended_smtp: bool = False  # EHLO/LHLO rather than HELO
    tls: bool = False  # the connection is encrypted (STARTTLS done, or implicit TLS)
    listener: str = ""  # the address the client connected to (host:port, unix:/path), for metrics
    user: str | None = None  # the authenticated login, lower-case
    # The client's certificate (as ssl's getpeercert() gives it), checked in the
    # handshake against the CA of a listener that asks for one; None elsewhere.
    peer_certificate: dict[str, Any] | None = None
    peer_uid: int | None = None  # on a Unix socket: the client's uid (SO_PEERCRED); None over TCP
    errors: int = 0  # client errors so far (the engine closes after too many)


@dataclass
class MailEnvelope:
    """One mail transaction, from MAIL FROM to the end of DATA."""

    mail_from: str | None = None
    rcpt_tos: list[str] = field(default_factory=list)
    content: bytes | None = None  # CRLF lines, dots unstuffed; set before data()
    params: dict[str, str] = field(default_factory=dict)  # the MAIL FROM parameters understood
    # RCPT address -> its parameters (NOTIFY, ORCPT: RFC 3461), values checked and decoded.
    rcpt_params: dict[str, dict[str, str]] = field(default_factory=dict)
    trace_id: str = ""
    smtp_utf8: bool = False
    body_type: str = "7BIT"  # 7BIT | 8BITMIME | BINARYMIME (RFC 6152, RFC 3030)


class Handler:
    """What a daemon plugs into a listener.  Every async method may raise SMTPError."""

    #: Extra EHLO keywords, also accepted as MAIL FROM parameters (e.g. XTRACE).
    ehlo_keywords: tuple[str, ...] = ()
    #: Whether AUTH PLAIN/LOGIN is offered (only ever over TLS).
    offers_auth = False
    #: Whether BDAT (RFC 3030) may be offered: data() stores a BDAT message
    #: exactly as a DATA one.
    offers_chunking = True
    #: Whether BINARYMIME (RFC 3030 3) is offered with CHUNKING: data() keeps a
    #: BODY=BINARYMIME message's octets exactly (bare CR and LF too), and
    #: whatever the handler hands it to takes it the same way, or refuses it.
    offers_binarymime = False
    #: Whether DSN (RFC 3461) is offered: NOTIFY, RET, ENVID and ORCPT are
    #: stored and honoured (or passed on) by whatever the handler hands mail to.
    offers_dsn = False
    #: Whether REQUIRETLS (RFC 8689) is offered; only over TLS (RFC 8689 4.1),
    #: unless `requiretls_in_clear`: the internal hop from our own MSA, which
    #: took the message over TLS and reaches us over loopback or a Unix socket.
    offers_requiretls = False
    requiretls_in_clear = False
    #: Whether AUTH is offered without TLS too: only the internal hop, on loopback,
    #: where only root could read the secret on the wire (and root can read its file).
    auth_in_clear = False

    def needs_login(self, session: MailSession) -> bool:
        """Whether this client must log in before it may send (and, until it has,
        may be made to give way to a newer connection when the listener is full)."""
        return False

    async def connect(self, session: MailSession) -> None:
        """Before the greeting; raise SMTPError to turn the client away."""

    async def mail(self, session: MailSession, envelope: MailEnvelope, sender: str) -> Reply | None:
        """MAIL FROM; envelope.params holds its parameters."""
        return None

    async def rcpt(self, session: MailSession, envelope: MailEnvelope, recipient: str) -> Reply | None:
        """RCPT TO; the engine has already applied the recipient limit."""
        return None

    async def data(self, session: MailSession, envelope: MailEnvelope) -> Reply | list[Reply]:
        """The whole message is in envelope.content."""
        raise NotImplementedError

    async def authenticate(self, session: MailSession, login: str, password: str) -> None:
        """Check a login (AUTH PLAIN/LOGIN over TLS); raise SMTPError to refuse."""
        raise SMTPError(AUTH_FAILED)

    async def auth_garbled(self, session: MailSession) -> None:
        """AUTH credentials that could not be decoded (bad base64, a PLAIN value that does
        not split): count it as a failed login where logins are counted.  The engine
        then answers 501 5.5.2, unless this raises SMTPError with another reply."""

    async def refused(self, session: MailSession, envelope: MailEnvelope, reply: Reply) -> None:
        """The engine refused the message itself after DATA (too big, line too long)."""

    def reset(self, session: MailSession) -> None:
        """The transaction ended (RSET, end of DATA, new EHLO or disconnect)."""
