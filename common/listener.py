"""The SMTP/LMTP listener every daemon uses: aiosmtpd's protocol, made fit for a mail host.

aiosmtpd gives us the session state, STARTTLS and the AUTH exchanges.  What a
mail host needs on top, and what this subclass adds, is:

- strict line handling: a bare CR or LF anywhere (command or DATA) ends the
  session with 521 5.5.2, so a body can never be read as a second message
  (SMTP smuggling, CVE-2023-51764); command lines over 512 octets and text
  lines over 1000 octets are refused (RFC 5321 4.5.3.1);
- ENHANCEDSTATUSCODES (RFC 2034) on every reply, and PIPELINING advertised;
- limits: message size with bounded memory, recipients per message,
  connections per listener and per client address, idle and whole-session
  timeouts, errors per session;
- AUTH on implicit-TLS listeners (aiosmtpd hides it there, its issue 274),
  with the password check run off the event loop;
- LMTP's rule of one reply per accepted recipient after DATA, also when the
  whole message is refused (RFC 2033 4.2).

A daemon supplies a `Handler`; its methods raise `SMTPError(reply)` to refuse.
Nothing here knows about queues or mailboxes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import ssl
from base64 import b64decode
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session, TLSSetupException

from common import address as addr
from common import reply as R
from common.config import SMTPSection, parse_hostport
from common.log import trace_id
from common.reply import Reply, SMTPError

log = logging.getLogger("listener")

COMMAND_LINE_LIMIT = 512  # RFC 5321 4.5.3.1.4, CRLF included
TEXT_LINE_LIMIT = 1000  # RFC 5321 4.5.3.1.6, CRLF included (+1 for a stuffed dot)

# Default enhanced codes for replies whose text does not carry one (aiosmtpd's own).
_DEFAULT_STATUS = {
    221: "2.0.0", 235: "2.7.0", 250: "2.0.0", 251: "2.1.5", 252: "2.0.0",
    421: "4.3.2", 450: "4.2.0", 451: "4.3.0", 452: "4.3.1", 454: "4.7.0",
    500: "5.5.2", 501: "5.5.4", 502: "5.5.1", 503: "5.5.1", 504: "5.5.4",
    530: "5.7.0", 535: "5.7.8", 538: "5.7.11", 550: "5.0.0", 552: "5.3.4",
    553: "5.1.3", 554: "5.0.0", 555: "5.5.4",
}  # fmt: skip


@dataclass(frozen=True)
class Limits:
    max_message_size: int = 35 * 1024 * 1024
    max_recipients: int = 100
    idle_timeout: float = 300.0
    session_timeout: float = 1800.0
    max_connections: int = 1000
    max_connections_per_client: int = 50
    max_errors: int = 20


def limits_from(smtp: SMTPSection, **overrides: Any) -> Limits:
    """The [smtp] limits of the config, with per-listener changes."""
    values = {f: getattr(smtp, f) for f in Limits.__dataclass_fields__}
    values.update(overrides)
    return Limits(**values)


@dataclass
class Connections:
    """Open connections of one listener, in total and per client address."""

    total: int = 0
    per_client: Counter[str] = field(default_factory=Counter)


class MailSession(Session):
    """aiosmtpd's session plus what our handlers keep per connection."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.client_ip = ""
        self.user: str | None = None  # the authenticated login
        self.errors = 0
        self.tls = False  # on a TLS transport (STARTTLS done, or implicit)


class MailEnvelope(Envelope):
    def __init__(self) -> None:
        super().__init__()
        self.trace_id = ""
        self.params: dict[str, str] = {}  # MAIL FROM parameters we understood


class Handler:
    """What a daemon plugs into a listener; every method may raise SMTPError."""

    #: Extra EHLO keywords (e.g. XTRACE on internal listeners).
    ehlo_keywords: tuple[str, ...] = ()
    #: Whether AUTH PLAIN/LOGIN is offered (only over TLS).
    offers_auth = False

    async def connect(self, session: MailSession) -> None:
        """Called before the greeting; raise SMTPError to turn the client away."""

    async def mail(self, session: MailSession, envelope: MailEnvelope, sender: str) -> Reply:
        return R.SENDER_OK

    async def rcpt(self, session: MailSession, envelope: MailEnvelope, recipient: str) -> Reply:
        return R.RECIPIENT_OK

    async def data(self, session: MailSession, envelope: MailEnvelope) -> Reply | list[Reply]:
        """The message is in envelope.content (bytes, CRLF lines, dots unstuffed).

        SMTP returns one reply; LMTP returns one per accepted recipient, in order.
        """
        raise NotImplementedError

    async def authenticate(self, session: MailSession, login: str, password: str) -> Reply:
        return R.AUTH_FAILED

    async def refused(self, session: MailSession, envelope: MailEnvelope, reply: Reply) -> None:
        """The listener itself refused the message after DATA (too big, line too long)."""

    def reset(self, session: MailSession) -> None:
        """The transaction ended (RSET, end of DATA, new EHLO or disconnect)."""


class Listener(SMTP):
    """One client connection.  Built by `serve()`; one instance per connection."""

    # aiosmtpd sizes its StreamReader with this; a longer line raises LimitOverrunError.
    line_length_limit = TEXT_LINE_LIMIT + 1

    def __init__(
        self,
        handler: Handler,
        *,
        hostname: str,
        limits: Limits,
        connections: Connections,
        tls_context: ssl.SSLContext | None = None,
        implicit_tls: bool = False,
        require_starttls: bool = False,
        lmtp: bool = False,
        utf8: bool = True,
    ) -> None:
        super().__init__(
            handler,
            hostname=hostname,
            data_size_limit=limits.max_message_size,
            enable_SMTPUTF8=utf8,
            tls_context=None if implicit_tls else tls_context,
            require_starttls=require_starttls,
            timeout=limits.idle_timeout,
            auth_require_tls=not implicit_tls,
            auth_exclude_mechanism=[] if handler.offers_auth else ["PLAIN", "LOGIN"],
            ident="Mailroom",
        )
        self.handler = handler
        self.limits = limits
        self.connections = connections
        self.implicit_tls = implicit_tls
        self.lmtp = lmtp
        self._deadline: asyncio.TimerHandle | None = None
        self._counted = ""

    # --- sessions and envelopes with our fields -------------------------------

    def _create_session(self) -> MailSession:
        return MailSession(self.loop)

    def _create_envelope(self) -> MailEnvelope:
        return MailEnvelope()

    def _set_rset_state(self) -> None:
        if self.session is not None and self.envelope is not None:
            self.handler.reset(self.session)  # type: ignore[arg-type]
        super()._set_rset_state()  # type: ignore[no-untyped-call]

    # Typed views of aiosmtpd's attributes.  No asserts here: aiosmtpd's
    # __init__ reads every attribute (inspect.getmembers) before they exist.
    @property
    def mail_session(self) -> MailSession:
        return cast(MailSession, self.session)

    @property
    def mail_envelope(self) -> MailEnvelope:
        return cast(MailEnvelope, self.envelope)

    # --- writing replies -------------------------------------------------------

    async def push(self, status: str | bytes) -> None:
        """Send one reply line, adding an enhanced status code where it lacks one."""
        text = status.decode() if isinstance(status, bytes) else status
        code_text, sep, rest = text.partition(" ")
        if code_text.isdigit() and sep:
            code = int(code_text)
            if code >= 400:
                self.mail_session.errors += 1
            first = rest.split(" ", 1)[0]
            has_status = first[:1] in "245" and first.count(".") == 2
            if code in _DEFAULT_STATUS and not has_status:
                text = f"{code} {_DEFAULT_STATUS[code]} {rest}"
        self._write_line(text)
        await self._writer.drain()
        if self.mail_session.errors > self.limits.max_errors and self.transport is not None:
            self._write_line("421 4.7.0 Too many errors, closing connection")
            self.transport.close()

    async def reply(self, r: Reply) -> None:
        await self.push(str(r))

    def _write_line(self, text: str) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s << %s", self.mail_session.client_ip, text)
        self._writer.write(text.encode("utf-8", "surrogateescape") + b"\r\n")

    def _timeout_cb(self) -> None:
        if self.transport is not None:
            self._write_line(str(R.TIMEOUT))
            self.transport.close()

    def _session_deadline(self) -> None:
        if self.transport is not None:
            self._write_line(str(R.TIMEOUT.with_text("Session time limit reached, closing")))
            self.transport.close()

    # --- the command loop --------------------------------------------------------

    async def _handle_client(self) -> None:
        session = self.mail_session
        peer = session.peer
        session.client_ip = _client_ip(peer)
        session.tls = self.implicit_tls
        if self.implicit_tls and self.transport is not None:
            session.ssl = {"cipher": self.transport.get_extra_info("cipher")}
        try:
            if not self._admit(session.client_ip):
                return
            await self.handler.connect(session)
            self._deadline = self.loop.call_later(
                self.limits.session_timeout, self._session_deadline
            )
            self._write_line(f"220 {self.hostname} {'LMTP' if self.lmtp else 'ESMTP'} Mailroom")
            while self.transport is not None:
                session = self.mail_session  # STARTTLS replaces the session object
                line = await self._read_line(COMMAND_LINE_LIMIT)
                if line is None:
                    await self.reply(R.LINE_TOO_LONG)
                    continue
                if not line.endswith(b"\r\n") or b"\r" in line[:-2] or b"\n" in line[:-1]:
                    await self._refuse_bare_line_ending()
                    return
                line = line[:-2]
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("%s >> %s", session.client_ip, _redact(line))
                command, _, arg_bytes = line.partition(b" ")
                try:
                    name = command.upper().decode("ascii")
                    arg = arg_bytes.strip().decode("utf-8", "surrogateescape") or None
                except UnicodeDecodeError:
                    await self.reply(R.SYNTAX_ERROR)
                    continue
                method = self._smtp_methods.get(name) if name.isalpha() else None
                if method is None:
                    await self.reply(R.SYNTAX_ERROR.with_text(f"Command not recognized: {name[:20]!r}"))
                    continue
                if self.require_starttls and not session.tls and name not in (
                    "NOOP", "EHLO", "LHLO", "HELO", "STARTTLS", "QUIT", "RSET",
                    "AUTH",  # smtp_AUTH answers 538 5.7.11 itself (RFC 4954 6)
                ):  # fmt: skip
                    await self.reply(Reply(530, "5.7.0", "Must issue a STARTTLS command first"))
                    continue
                self._reset_timeout()
                try:
                    await method(arg)
                except SMTPError as exc:
                    await self.reply(exc.reply)
                    if exc.reply.code == 421:  # RFC 5321 3.8: 421 means we close
                        if self.transport is not None:
                            self.transport.close()
                        return
        except SMTPError as exc:
            self._write_line(str(exc.reply))
            if self.transport is not None:
                self.transport.close()
        except (asyncio.CancelledError, ConnectionError):
            with contextlib.suppress(Exception):
                self._writer.close()
            raise
        except Exception:
            log.exception("%s: session failed", session.client_ip)
            self._write_line(str(R.LOCAL_ERROR))
            if self.transport is not None:
                self.transport.close()
        finally:
            if self._deadline is not None:
                self._deadline.cancel()
            self._release()
            # A disconnect ends the transaction too: the handler lets go of what it
            # holds (the MSA's session with the MTA), or every dropped client
            # would leave one behind.
            try:
                self.handler.reset(self.mail_session)
            except Exception:
                log.exception("%s: reset after disconnect failed", session.client_ip)

    def _admit(self, ip: str) -> bool:
        c = self.connections
        if c.total >= self.limits.max_connections or (
            c.per_client[ip] >= self.limits.max_connections_per_client
        ):
            log.warning("%s: connection limit reached, refusing", ip)
            self._write_line(str(R.TOO_MANY_CONNECTIONS))
            if self.transport is not None:
                self.transport.close()
            return False
        c.total += 1
        c.per_client[ip] += 1
        self._counted = ip
        return True

    def _release(self) -> None:
        if self._counted:
            c = self.connections
            c.total -= 1
            c.per_client[self._counted] -= 1
            if c.per_client[self._counted] <= 0:
                del c.per_client[self._counted]
            self._counted = ""

    async def _read_line(self, limit: int) -> bytes | None:
        """One line ending in LF, or None when it was longer than `limit` (then skipped)."""
        try:
            line = await self._reader.readuntil(b"\n")
        except asyncio.LimitOverrunError as exc:
            await self._reader.readexactly(exc.consumed)
            while True:
                try:
                    await self._reader.readuntil(b"\n")
                    return None
                except asyncio.LimitOverrunError as more:
                    await self._reader.readexactly(more.consumed)
        except asyncio.IncompleteReadError as exc:
            raise ConnectionResetError("client closed the connection") from exc
        return line if len(line) <= limit else None

    async def _refuse_bare_line_ending(self) -> None:
        """Bare CR/LF: answer and hang up, so nothing after it is ever read as SMTP."""
        log.warning("%s: bare CR or LF, disconnecting", self.mail_session.client_ip)
        self._write_line(str(R.BARE_LINE_ENDING))
        if self.transport is not None:
            self.transport.close()

    # --- commands ------------------------------------------------------------------

    async def smtp_EHLO(self, hostname: str) -> None:
        if self.lmtp:
            await self.reply(R.SYNTAX_ERROR.with_text("This is LMTP: use LHLO"))
            return
        await self._ehlo(hostname)

    async def smtp_HELO(self, hostname: str) -> None:
        if self.lmtp:
            await self.reply(R.SYNTAX_ERROR.with_text("This is LMTP: use LHLO"))
            return
        await super().smtp_HELO(hostname)

    async def smtp_LHLO(self, hostname: str) -> None:
        if not self.lmtp:
            await self.reply(R.SYNTAX_ERROR.with_text("Command not recognized: 'LHLO'"))
            return
        await self._ehlo(hostname)

    async def _ehlo(self, hostname: str | None) -> None:
        if not hostname:
            await self.reply(R.PARAM_SYNTAX.with_text("Syntax: EHLO hostname"))
            return
        self._set_rset_state()
        session = self.mail_session
        session.host_name = hostname
        session.extended_smtp = True
        lines = [self.hostname, "PIPELINING", f"SIZE {self.limits.max_message_size}", "8BITMIME"]
        if self.enable_SMTPUTF8:
            lines.append("SMTPUTF8")
        lines.append("ENHANCEDSTATUSCODES")
        if self.tls_context and not session.tls:
            lines.append("STARTTLS")
        if self.handler.offers_auth and session.tls:
            lines.append("AUTH PLAIN LOGIN")
        lines.extend(self.handler.ehlo_keywords)
        for i, text in enumerate(lines):
            self._write_line(f"250{'-' if i < len(lines) - 1 else ' '}{text}")
        await self._writer.drain()

    async def smtp_STARTTLS(self, arg: str) -> None:
        if self.mail_session.tls or not self.tls_context:
            await self.reply(Reply(502, "5.5.1", "STARTTLS not available"))
            return
        before = self.mail_session
        try:
            await super().smtp_STARTTLS(arg)
        except TLSSetupException as exc:
            # A client that says STARTTLS and then sends no (or a broken) handshake:
            # nothing to answer in either protocol, just hang up.
            log.info("%s: TLS handshake failed: %r", before.client_ip, exc.__cause__)
            if self.transport is not None:
                self.transport.close()
            raise ConnectionResetError("TLS handshake failed") from exc
        # aiosmtpd made a fresh session when TLS came up: RFC 3207 4.2 says to
        # forget everything learned before TLS, EHLO included.  Keep only who
        # the client is.
        self.mail_session.client_ip = before.client_ip
        self.mail_session.tls = True

    async def smtp_AUTH(self, arg: str) -> None:
        session = self.mail_session
        if not self.handler.offers_auth:
            await self.reply(Reply(502, "5.5.1", "AUTH not available here"))
        elif not session.tls:
            await self.reply(R.ENCRYPTION_REQUIRED)
        elif not session.extended_smtp:
            await self.reply(R.BAD_SEQUENCE.with_text("Send EHLO first"))
        elif self.envelope is not None and self.envelope.mail_from is not None:
            await self.reply(R.BAD_SEQUENCE.with_text("AUTH not allowed during a transaction"))
        else:
            await super().smtp_AUTH(arg)

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        if len(args) == 1:
            blob = await self.challenge_auth("")
        else:
            try:
                blob = b64decode(args[1].encode(), validate=True)
            except Exception:
                await self.reply(Reply(501, "5.5.2", "Cannot decode base64"))
                return AuthResult(success=False, handled=True)
        if not isinstance(blob, bytes):
            return AuthResult(success=False, handled=True)
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            await self.reply(Reply(501, "5.5.2", "Cannot split AUTH PLAIN value"))
            return AuthResult(success=False, handled=True)
        return await self._check_login(parts[1], parts[2])

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        if len(args) == 1:
            login = await self.challenge_auth("Username:")
        else:
            try:
                login = b64decode(args[1].encode(), validate=True)
            except Exception:
                await self.reply(Reply(501, "5.5.2", "Cannot decode base64"))
                return AuthResult(success=False, handled=True)
        if not isinstance(login, bytes):
            return AuthResult(success=False, handled=True)
        password = await self.challenge_auth("Password:")
        if not isinstance(password, bytes):
            return AuthResult(success=False, handled=True)
        return await self._check_login(login, password)

    async def _check_login(self, login: bytes, password: bytes) -> AuthResult:
        session = self.mail_session
        result = await self.handler.authenticate(
            session, login.decode("utf-8", "replace"), password.decode("utf-8", "replace")
        )
        if result.code == 235:
            session.user = login.decode("utf-8", "replace").lower()
            return AuthResult(success=True, auth_data=session.user, message=str(result))
        if result.code == 421:
            raise SMTPError(result)  # ends the session
        # handled=False: aiosmtpd's AuthResult defaults to handled=True, which
        # would send no reply at all and leave the client waiting.
        return AuthResult(success=False, handled=False, message=str(result))

    async def smtp_MAIL(self, arg: str | None) -> None:
        session, envelope = self.mail_session, self.mail_envelope
        if not session.host_name:
            raise SMTPError(R.BAD_SEQUENCE.with_text("Send EHLO/LHLO first"))
        if envelope.mail_from is not None:
            raise SMTPError(R.BAD_SEQUENCE.with_text("Nested MAIL command"))
        if not arg or not arg[:5].upper() == "FROM:":
            raise SMTPError(R.PARAM_SYNTAX.with_text("Syntax: MAIL FROM:<address>"))
        sender, params = addr.parse_path(arg[5:], sender=True, utf8=self.enable_SMTPUTF8)
        envelope.params = self._mail_params(params)
        reply = await self.handler.mail(session, envelope, sender)
        if reply.is_ok:
            envelope.mail_from = sender
            envelope.smtp_utf8 = "SMTPUTF8" in envelope.params
        await self.reply(reply)

    def _mail_params(self, params: list[str]) -> dict[str, str]:
        out: dict[str, str] = {}
        for p in params:
            key, _, value = p.partition("=")
            key = key.upper()
            if key == "SIZE":
                if not value.isdigit():
                    raise SMTPError(R.PARAM_SYNTAX.with_text("SIZE needs a number"))
                if int(value) > self.limits.max_message_size:
                    raise SMTPError(R.MESSAGE_TOO_BIG)
            elif key == "BODY":
                if value.upper() not in ("7BIT", "8BITMIME"):
                    raise SMTPError(R.PARAM_SYNTAX.with_text("BODY must be 7BIT or 8BITMIME"))
            elif key == "SMTPUTF8":
                if value or not self.enable_SMTPUTF8:
                    raise SMTPError(R.PARAM_SYNTAX.with_text("SMTPUTF8 takes no value"))
            elif key not in self.handler.ehlo_keywords:
                raise SMTPError(Reply(555, "5.5.4", f"Unsupported parameter {key[:30]}"))
            out[key] = value
        return out

    async def smtp_RCPT(self, arg: str | None) -> None:
        session, envelope = self.mail_session, self.mail_envelope
        if envelope.mail_from is None:
            raise SMTPError(R.BAD_SEQUENCE.with_text("Need MAIL command first"))
        if not arg or not arg[:3].upper() == "TO:":
            raise SMTPError(R.PARAM_SYNTAX.with_text("Syntax: RCPT TO:<address>"))
        recipient, params = addr.parse_path(arg[3:], sender=False, utf8=self.enable_SMTPUTF8)
        if params:
            raise SMTPError(Reply(555, "5.5.4", "RCPT parameters not supported"))
        if len(envelope.rcpt_tos) >= self.limits.max_recipients:
            raise SMTPError(R.TOO_MANY_RECIPIENTS)
        reply = await self.handler.rcpt(session, envelope, recipient)
        if reply.is_ok:
            envelope.rcpt_tos.append(recipient)
        await self.reply(reply)

    async def smtp_RSET(self, arg: str | None) -> None:
        self._set_rset_state()
        await self.reply(R.OK)

    async def smtp_VRFY(self, arg: str | None) -> None:
        # RFC 5321 3.5.3: 252 neither confirms nor denies; we never reveal users.
        await self.reply(Reply(252, "2.5.0", "Cannot VRFY user, but will accept message"))

    async def smtp_DATA(self, arg: str | None) -> None:
        session, envelope = self.mail_session, self.mail_envelope
        if envelope.mail_from is None:
            raise SMTPError(R.BAD_SEQUENCE.with_text("Need MAIL command first"))
        if not envelope.rcpt_tos:
            raise SMTPError(R.NO_VALID_RECIPIENTS)
        if arg:
            raise SMTPError(R.PARAM_SYNTAX.with_text("Syntax: DATA"))
        self._write_line("354 End data with <CR><LF>.<CR><LF>")
        await self._writer.drain()
        content, problem = await self._read_data()
        if content is None:
            return  # bare line ending: already answered and closed
        replies: list[Reply]
        if problem is not None:
            replies = [problem] * (len(envelope.rcpt_tos) if self.lmtp else 1)
            await self.handler.refused(session, envelope, problem)
        else:
            envelope.content = envelope.original_content = content
            try:
                result = await self.handler.data(session, envelope)
            except SMTPError as exc:
                result = exc.reply
            replies = result if isinstance(result, list) else [result] * (len(envelope.rcpt_tos) if self.lmtp else 1)
        for r in replies:
            self._write_line(str(r))
            if r.code >= 400:
                session.errors += 1
        await self._writer.drain()
        trace_id.set("-")
        self._set_rset_state()

    async def _read_data(self) -> tuple[bytes | None, Reply | None]:
        """Read the message up to CRLF.CRLF; returns (content, problem).

        Memory stays bounded: once the message is too big or a line too long
        we keep reading (the client cannot be interrupted) but stop storing.
        """
        chunks: list[bytes] = []
        size = 0
        problem: Reply | None = None
        limit = self.limits.max_message_size
        while True:
            line = await self._read_line(TEXT_LINE_LIMIT + 1)
            if line is not None and len(line) > TEXT_LINE_LIMIT and line[0:1] != b".":
                line = None  # the extra octet is only for a stuffed dot
            if line is None:
                problem = problem or R.LINE_TOO_LONG
                chunks.clear()
                continue
            if not line.endswith(b"\r\n") or b"\r" in line[:-2]:
                await self._refuse_bare_line_ending()
                return None, None
            self._reset_timeout()
            if line[0:1] == b".":
                if line == b".\r\n":
                    break
                line = line[1:]  # RFC 5321 4.5.2: undo dot-stuffing
            size += len(line)
            if problem is None:
                if size > limit:
                    problem = R.MESSAGE_TOO_BIG
                    chunks.clear()
                else:
                    chunks.append(line)
        if problem is not None:
            return b"", problem
        return b"".join(chunks), None


def _client_ip(peer: Any) -> str:
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return "local"  # a Unix socket


def _redact(line: bytes) -> str:
    text = line.decode("utf-8", "replace")
    if text[:4].upper() == "AUTH":
        return " ".join(text.split()[:2]) + " <redacted>"
    return text


def in_networks(ip: str, networks: list[str]) -> bool:
    """True when `ip` is inside one of `networks` (e.g. trusted_networks)."""
    try:
        a = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(a in ipaddress.ip_network(n, strict=False) for n in networks)


async def serve(
    where: str,
    make_handler: Callable[[], Handler],
    *,
    hostname: str,
    limits: Limits,
    tls_context: ssl.SSLContext | None = None,
    implicit_tls: bool = False,
    require_starttls: bool = False,
    lmtp: bool = False,
    sock: socket.socket | None = None,
    connections: Connections | None = None,
) -> asyncio.Server:
    """Start a listener on `where` ('host:port' or 'unix:/path') or on a bound socket.

    Listeners given the same `connections` share their connection caps (the
    MSA's 587 and 465 roles count one client's connections together).
    """
    loop = asyncio.get_running_loop()
    connections = connections if connections is not None else Connections()

    def factory() -> Listener:
        return Listener(
            make_handler(),
            hostname=hostname,
            limits=limits,
            connections=connections,
            tls_context=tls_context,
            implicit_tls=implicit_tls,
            require_starttls=require_starttls,
            lmtp=lmtp,
        )

    server_ssl = tls_context if implicit_tls else None
    if sock is not None:
        if sock.family == socket.AF_UNIX:
            return await loop.create_unix_server(factory, sock=sock, ssl=server_ssl)
        return await loop.create_server(factory, sock=sock, ssl=server_ssl)
    if where.startswith("unix:"):
        path = where[5:]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return await loop.create_unix_server(factory, path=path, ssl=server_ssl)
    host, port = parse_hostport(where)
    return await loop.create_server(
        factory, host=host, port=port, ssl=server_ssl, reuse_address=True, backlog=1024
    )
