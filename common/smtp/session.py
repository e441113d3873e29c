"""One SMTP or LMTP session, greeting to QUIT: every command, in one place.

The session is an asyncio Protocol.  `data_received` feeds the wire reader
(common.smtp.wire); commands are pulled from it one at a time, in order, and
executed by the same code whichever way they come:

- while the session's one task waits for the client, what needs no waiting
  (HELO/EHLO, RSET, NOOP, QUIT, DATA's 354, an unknown command, and MAIL and
  RCPT when the handler has no hook for them) is executed at once, from
  `data_received`: no task wake-up per command;
- the first command that may wait (STARTTLS, AUTH, BDAT, a handler's MAIL or
  RCPT, the end of a message: the handler's verdict) is handed to the task,
  which executes it and everything after it until it waits for the client again
  (common/smtp/schedule.py says which commands may wait).

So a pipelined batch is executed in order, and nothing after a closing reply
is ever executed: the reader is emptied and no further command is pulled.

`_reply` is the only place a reply is made (`_flush` puts what it made on the
wire: at once, or, for pipelined commands, together in one write).  It counts the client's
errors, closes after too many (421 4.7.0), and after any reply that ends the
session (421, 521, 554 at the greeting) it drops the rest of the input and
closes.  A 452 for the recipient limit is not an error: the client did
nothing wrong, and the recipients already accepted are kept (RFC 5321
4.5.3.1.10).

Commands: HELO, EHLO, LHLO (LMTP only), STARTTLS (RFC 3207; input read
before TLS is thrown away, CVE-2011-0411), AUTH PLAIN and LOGIN (RFC 4954;
only over TLS), MAIL, RCPT, DATA, BDAT (RFC 3030), RSET, NOOP, VRFY, HELP,
QUIT.  Extensions advertised: PIPELINING (RFC 2920), SIZE (RFC 1870),
8BITMIME (RFC 6152), SMTPUTF8 (RFC 6531), ENHANCEDSTATUSCODES (RFC 2034),
CHUNKING (RFC 3030), STARTTLS, AUTH; DSN (RFC 3461) and REQUIRETLS
(RFC 8689, after STARTTLS) where the handler honours them.

What is not the state machine lives beside it: the listener's settings,
admission and stress-aware timeouts (`serve.Listener`, `admission`), the
checks of command arguments and MAIL/RCPT parameters (`params`) and the AUTH
exchange's decoding (`sasl`); those are pure or hold no session state.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, cast

from common import address as addr
from common import counters
from common import reply as R
from common.log import trace_id
from common.reply import Reply, SMTPError
from common.smtp import sasl, wire
from common.smtp.admission import client_address, peer_uid
from common.smtp.handler import Handler, MailEnvelope, MailSession
from common.smtp.params import bdat_args, hello_name, mail_params, rcpt_params
from common.smtp.schedule import Started, waiting_verbs

if TYPE_CHECKING:
    from common.smtp.serve import Listener

log = logging.getLogger("smtp")

# Replies that end the session (RFC 5321 3.8 for 421; 521 as Postfix says it for bare LF).
_CLOSING = frozenset({421, 521})
# Pause reading a client that sends faster than we execute (memory stays bounded).
_HIGH_WATER = 256 * 1024
# After a closing reply, how long we keep swallowing input before dropping the
# connection (closing with unread input would reset the connection and could
# destroy the reply on its way to the client).
_LINGER = 2.0
# Commands allowed before STARTTLS on a listener that requires it (RFC 3207 4).
_BEFORE_TLS = frozenset({b"NOOP", b"EHLO", b"HELO", b"LHLO", b"STARTTLS", b"QUIT", b"RSET", b"AUTH", b"HELP"})
# Commands allowed while a BDAT transaction is open (RFC 3030 2).
_DURING_BDAT = frozenset({b"BDAT", b"RSET", b"QUIT", b"NOOP"})
# The wire form of replies already written once.  Most replies are the same few
# constants, and formatting and encoding each again is per-command work; the
# size bound keeps replies with variable text from growing it without end.
_WIRE: dict[tuple[Reply, tuple[str, ...]], bytes] = {}
_WIRE_MAX = 1024


class Session(asyncio.Protocol):
    """One client connection."""

    def __init__(self, handler: Handler, listener: Listener) -> None:
        self.handler = handler
        self.listener = listener
        self.limits = listener.limits
        self.session = MailSession()
        self.envelope = MailEnvelope()
        self.reader = wire.Reader(max_message_size=listener.limits.max_message_size)
        self.transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._wakeup: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        # A fresh context: the session never inherits a trace id from whoever
        # accepted the connection, and keeps its own, in its task and in what
        # data_received executes at once alike.
        self._context = contextvars.Context()
        self._parked = False  # the task waits for the client's next command
        self._pending: wire.Item | None = None  # read at once, left for the task to execute
        self._waits = waiting_verbs(type(handler))
        self._handshake: Started[asyncio.Transport | None] | None = None  # implicit TLS, started
        self._eof = False  # the client will send no more
        self._closing = False  # a closing reply was sent: execute nothing more
        self._paused = False
        self._admitted = False
        self._last_input = self._loop.time()
        self._timer: asyncio.TimerHandle | None = None
        self._started = 0.0
        self._linger: asyncio.TimerHandle | None = None
        self._on_tls = False
        # Replies not yet written: while the client's next commands are already
        # read (PIPELINING, RFC 2920 3.1) their replies go out together, in one
        # write, when the session next waits for input (or closes, or starts TLS).
        self._out: list[bytes] = []
        self._holding = False  # LMTP's replies after DATA: one write for them all

    # --- the Protocol side: bytes in, wake the task ------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance check: uvloop's transports do not derive from asyncio's classes.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.session.peer = peer
        self.session.client_ip = client_address(peer[0]) if isinstance(peer, tuple) and peer else "local"
        if self.session.client_ip == "local":
            self.session.peer_uid = peer_uid(transport)  # who connected, as the kernel says
        self._admitted = self.listener.admit(self, self.session.client_ip)
        self.session.listener = self.listener.name
        # In memory (common/counters.py): a connection never costs a database write.
        counters.inc(counters.CONNECTIONS, listener=self.listener.name,
                     result="accepted" if self._admitted else "refused")
        if self.listener.implicit_tls:
            # The ClientHello is for the TLS layer, not for us, and uvloop starts
            # reading when connection_made returns, whatever it asked: so the TLS
            # layer takes the transport now (its first step, run here), and the
            # task finishes the handshake.
            ctx = self.listener.tls_context
            assert ctx is not None  # serve() refuses implicit TLS without one
            self._handshake = Started(self._loop.start_tls(
                self.transport, self, ctx, server_side=True,
                ssl_handshake_timeout=self.listener.handshake_timeout(),
            ))
        self._task = self._loop.create_task(self._run(), context=self._context)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return  # after a closing reply, input is dropped unread
        self._last_input = self._loop.time()
        self.reader.feed(data)
        if self.reader.buffered > _HIGH_WATER and self.transport is not None and not self._paused:
            self._paused = True
            self.transport.pause_reading()
        if self._parked and self._pending is None:
            self._context.run(self._execute_at_once)
        else:
            self._wake()

    def eof_received(self) -> bool | None:
        self._eof = True
        self._wake()
        if self._closing and self.transport is not None:
            self.transport.close()
        # Half-open: the replies to what was sent before the EOF may still be written.
        return None if self._on_tls else True

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._closing = True
        self.transport = None
        self._wake()
        self._release()

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def _next(self, *, command: bool = False) -> wire.Item | None:
        """The next thing the client sent, or None when it is gone (or we closed).

        `command`: the session waits for its next command, so data_received may
        execute what needs no waiting at once (see _execute_at_once)."""
        while not self._closing:
            item = self._pending
            if item is not None:
                self._pending = None
                return item
            item = self.reader.next()
            if item is not None:
                return item
            if self._eof:
                return None
            self._waiting()
            self._wakeup = self._loop.create_future()
            self._parked = command
            try:
                await self._wakeup
            finally:
                self._wakeup = None
                self._parked = False
        return None

    def _waiting(self) -> None:
        """Everything read is executed: answer it, and read more."""
        if self._out:
            self._flush()
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        self._last_input = self._loop.time()  # idle time counts from here

    def _execute_at_once(self) -> None:
        """While the task waits for a command: execute, here and now, the commands
        read that need no waiting; hand the first one that may wait to the task."""
        try:
            while not self._closing:
                item = self.reader.next()
                if item is None:
                    self._waiting()
                    return
                if not self._at_once(item):
                    self._pending = item
                    break
                step = self._item(item)
                try:
                    step.send(None)
                except StopIteration:
                    continue
                step.close()  # _at_once let through something that waits: a bug here
                raise RuntimeError(f"executing {item!r} at once had to wait")
        except Exception:
            log.exception("%s: session failed", self.session.client_ip)
            self._reply(R.LOCAL_ERROR_CLOSING)
        self._wake()

    def _at_once(self, item: wire.Item) -> bool:
        """True when executing `item` cannot wait for anything."""
        if type(item) is wire.Command:
            return item.line.partition(b" ")[0].upper() not in self._waits
        return type(item) is wire.LineTooLong or type(item) is wire.BareLineEnding

    # --- the one place replies are written ------------------------------------------------

    def _reply(self, reply: Reply, more: tuple[str, ...] = (), *, counts: bool = True, greeting: bool = False) -> None:
        """Write one reply (with continuation lines `more` before it) and act on what it means."""
        if self._closing or self.transport is None:
            return
        key = (reply, more)
        wire_form = _WIRE.get(key)
        if wire_form is None:
            wire_form = _wire_form(reply, more)
            if len(_WIRE) < _WIRE_MAX:
                _WIRE[key] = wire_form
        if log.isEnabledFor(logging.DEBUG):
            text = wire_form.decode("utf-8", "surrogateescape")
            log.debug("%s << %s", self.session.client_ip, text.rstrip().replace("\r\n", " | "))
        self._out.append(wire_form)
        if not (self._holding or self.reader.buffered):
            self._flush()  # nothing more to execute first: the client is waiting for it
        if reply.code in _CLOSING or (greeting and reply.code == 554):
            self._close()
            return
        # The client's mistakes count; a limit reached (452) or our own trouble (4xx) does not.
        if counts and reply.code >= 500:
            self.session.errors += 1
            if self.session.errors > self.limits.max_errors:
                self._reply(R.TOO_MANY_ERRORS)

    def _flush(self) -> None:
        """Write the replies held back, in one write."""
        out = self._out
        if not out:
            return
        self._out = []
        if self.transport is not None:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def _close(self) -> None:
        """Execute nothing more: drop what is buffered, stop reading, hang up."""
        self._flush()
        self._closing = True
        self.reader.discard()
        self._wake()
        transport = self.transport
        if transport is None:
            return
        if self._eof or self._on_tls or not transport.can_write_eof():
            transport.close()
            return
        # Say we are done (FIN after the reply) but keep swallowing what the client
        # still sends until it hangs up, so the kernel never answers it with a reset.
        try:
            transport.write_eof()
        except OSError:  # the client is already gone
            transport.close()
            return
        if self._paused:
            transport.resume_reading()
        self._linger = self._loop.call_later(_LINGER, transport.abort)

    # --- admission (common/smtp/admission.py asks), timeouts ---------------------------------

    def _release(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._linger is not None:
            self._linger.cancel()
        self.listener.release(self)

    @property
    def unproven(self) -> bool:
        """Admission's question: must this session still prove who it is (log in)?"""
        return self.session.user is None and self.handler.needs_login(self.session)

    def evict(self) -> None:
        """Admission made this session give way to a newer connection (it is already counted out)."""
        self._context.run(self._reply, R.TOO_MANY_CONNECTIONS)

    def under_stress(self) -> None:
        """Stress mode began or ended: the idle limit changed; look again at once."""
        if self._timer is not None and not self._closing:
            self._timer.cancel()
            self._timer = self._loop.call_later(0, self._check_time, context=self._context)

    def _start_timer(self) -> None:
        self._started = self._loop.time()
        first = min(self.listener.idle_timeout(), self.limits.session_timeout)
        self._timer = self._loop.call_later(first, self._check_time)

    def _check_time(self) -> None:
        """One timer for both limits: re-armed for whichever comes first."""
        now, lim = self._loop.time(), self.limits
        session_left = lim.session_timeout - (now - self._started)
        # Idle is the client's silence while we wait for it, not our own time spent
        # executing its command (a slow disk or next hop must not end the session).
        waiting = self._wakeup is not None
        idle = self.listener.idle_timeout()
        idle_left = idle - (now - self._last_input) if waiting else idle
        if session_left <= 0:
            self._reply(R.SESSION_TIMEOUT)
        elif idle_left <= 0:
            self._reply(R.TIMEOUT)
        else:
            self._timer = self._loop.call_later(min(session_left, idle_left), self._check_time)

    # --- the command loop --------------------------------------------------------------------------

    async def _run(self) -> None:
        ip = self.session.client_ip
        try:
            if self.listener.implicit_tls and not await self._start_tls():
                return
            if not self._admitted:
                log.warning("%s: connection limit reached, refusing", ip)
                self._reply(R.TOO_MANY_CONNECTIONS)
                return
            self._start_timer()
            try:
                if type(self.handler).connect is not Handler.connect:  # most handlers need no hook here
                    await self.handler.connect(self.session)
            except SMTPError as exc:
                self._reply(exc.reply, greeting=True)
                if not self._closing:
                    self._close()
                return
            self._reply(self.listener.greeting)
            while not self._closing:
                # A pipelined command already read needs no trip through _next.
                item = self.reader.next()
                if item is None:
                    item = await self._next(command=True)
                    if item is None:
                        break
                await self._item(item)
        except ConnectionError:
            pass  # the client (or a next hop the handler spoke to) went away
        except asyncio.CancelledError:
            # The server is shutting down: leave no transport behind.
            self._closing = True
            if self.transport is not None:
                self.transport.abort()
            raise
        except Exception:
            log.exception("%s: session failed", ip)
            self._reply(R.LOCAL_ERROR_CLOSING)
        finally:
            self._flush()
            if self.transport is not None and not self._closing:
                self._closing = True
                self.transport.close()
            self.reader.discard()
            # A disconnect ends the transaction too: the handler lets go of what it holds.
            try:
                self.handler.reset(self.session)
            except Exception:
                log.exception("%s: reset after disconnect failed", ip)

    async def _item(self, item: wire.Item) -> None:
        if type(item) is wire.Command:  # by far the most common: tested first
            await self._command(item.line)
        elif isinstance(item, wire.BareLineEnding):
            log.warning("%s: bare CR or LF, disconnecting", self.session.client_ip)
            self._reply(R.BARE_LINE_ENDING)
        elif isinstance(item, wire.LineTooLong):
            self._reply(R.LINE_TOO_LONG)
        elif isinstance(item, wire.Message):  # the end of DATA: the reader was told after the 354
            await self._deliver(item)
        else:  # a chunk outside BDAT cannot happen
            raise AssertionError(f"unexpected {item!r}")

    async def _command(self, line: bytes) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s >> %s", self.session.client_ip, _redact(line))
        verb, _, rest = line.partition(b" ")
        name = verb.upper()
        method = _COMMANDS.get(name)
        if method is None:
            shown = name.decode("ascii", "replace")
            self._reply(R.SYNTAX_ERROR.with_text(f"Command not recognized: {shown[:20]!r}"))
            return
        if self.listener.require_starttls and not self.session.tls and name not in _BEFORE_TLS:
            self._reply(R.STARTTLS_FIRST)
            return
        if self.reader.in_bdat and name not in _DURING_BDAT:
            self._reply(R.BAD_SEQUENCE.with_text("Only BDAT, RSET or QUIT during BDAT"))
            return
        # Most commands have no argument: skip decoding an empty one.
        arg = rest.strip().decode("utf-8", "surrogateescape") if rest else ""
        try:
            await method(self, arg)
        except SMTPError as exc:
            self._reply(exc.reply)

    # --- greeting commands ---------------------------------------------------------------------

    def _hello_name(self, verb: str, arg: str) -> str:
        # A domain or an address literal (common/smtp/params.py): a name that reaches
        # Received: headers and terminals is never raw octets or control characters.
        return hello_name(verb, arg, utf8=self.listener.utf8)

    async def _helo(self, arg: str) -> None:
        if self.listener.lmtp:
            raise SMTPError(R.USE_LHLO)
        name = self._hello_name("HELO", arg)
        self._reset_transaction()
        self.session.host_name, self.session.extended_smtp = name, False
        self._reply(self.listener.helo_reply)

    async def _ehlo(self, arg: str) -> None:
        if self.listener.lmtp:
            raise SMTPError(R.USE_LHLO)
        await self._extended_hello("EHLO", arg)

    async def _lhlo(self, arg: str) -> None:
        if not self.listener.lmtp:
            raise SMTPError(R.SYNTAX_ERROR.with_text("Command not recognized: 'LHLO'"))
        await self._extended_hello("LHLO", arg)

    async def _extended_hello(self, verb: str, arg: str) -> None:
        name = self._hello_name(verb, arg)
        self._reset_transaction()
        self.session.host_name, self.session.extended_smtp = name, True
        lst, session = self.listener, self.session
        lines = [lst.hostname, "PIPELINING", f"SIZE {self.limits.max_message_size}", "8BITMIME"]
        if lst.utf8:
            lines.append("SMTPUTF8")
        lines.append("ENHANCEDSTATUSCODES")
        if self.handler.offers_chunking:
            lines.append("CHUNKING")
            if self.handler.offers_binarymime:
                lines.append("BINARYMIME")
        if lst.tls_context is not None and not session.tls:
            lines.append("STARTTLS")
        if self.handler.offers_auth and (session.tls or self.handler.auth_in_clear):
            lines.append("AUTH PLAIN LOGIN")
        if self.handler.offers_dsn:
            lines.append("DSN")
        if self._requiretls_offered():
            lines.append("REQUIRETLS")
        lines.extend(self.handler.ehlo_keywords)
        self._reply(R.HELLO.with_text(lines[-1]), tuple(lines[:-1]))

    # --- TLS and AUTH -----------------------------------------------------------------------------

    async def _starttls(self, arg: str) -> None:
        if self.listener.tls_context is None or self.session.tls:
            raise SMTPError(R.NOT_AVAILABLE.with_text("STARTTLS not available"))
        if arg:
            raise SMTPError(R.PARAM_SYNTAX.with_text("Syntax: STARTTLS"))
        self._reply(R.READY_FOR_TLS)
        # CVE-2011-0411: whatever came with STARTTLS in plaintext is not a command.
        self.reader.discard()
        if await self._start_tls():
            # RFC 3207 4.2: forget everything learned before TLS, EHLO included.
            self._reset_transaction()
            self.session = MailSession(
                peer=self.session.peer, client_ip=self.session.client_ip, tls=True, errors=self.session.errors,
                listener=self.session.listener, peer_uid=self.session.peer_uid,
                peer_certificate=self.session.peer_certificate,
            )

    async def _start_tls(self) -> bool:
        """Turn the connection into TLS; False (logged once, connection closed) when that fails."""
        self._flush()  # the 220 for STARTTLS must leave in plaintext, before the handshake
        transport, ctx = self.transport, self.listener.tls_context
        assert ctx is not None
        if transport is None:
            return False
        handshake, self._handshake = self._handshake, None
        try:
            new = await (handshake or self._loop.start_tls(
                transport, self, ctx, server_side=True,
                ssl_handshake_timeout=self.listener.handshake_timeout(),
            ))
        except OSError as exc:  # ssl.SSLError, resets and handshake timeouts are all OSErrors
            log.info("%s: TLS handshake failed: %s", self.session.client_ip, _reason(exc))
            self._closing = True
            transport.abort()
            return False
        if new is None:
            return False
        self.transport = new
        self._on_tls = True
        self.session.tls = True
        ssl_object = new.get_extra_info("ssl_object")
        # Only a listener that asks for a client's certificate has one, verified by then.
        self.session.peer_certificate = (ssl_object.getpeercert() or None) if ssl_object is not None else None
        self._last_input = self._loop.time()
        return True

    async def _auth(self, arg: str) -> None:
        try:
            await self._auth_exchange(arg)
        except SMTPError as exc:
            # Undecodable credentials (bad base64, a PLAIN value that does not split)
            # are a failed login too: the handler counts them toward its lockout.
            if (exc.reply.code, exc.reply.status) == (R.AUTH_SYNTAX.code, R.AUTH_SYNTAX.status):
                await self.handler.auth_garbled(self.session)
            raise

    async def _auth_exchange(self, arg: str) -> None:
        session = self.session
        if not self.handler.offers_auth:
            raise SMTPError(R.NOT_AVAILABLE.with_text("AUTH not available here"))
        if not session.tls and not self.handler.auth_in_clear:
            raise SMTPError(R.ENCRYPTION_REQUIRED)
        if not session.extended_smtp:
            raise SMTPError(R.BAD_SEQUENCE.with_text("Send EHLO first"))
        if session.user is not None:
            raise SMTPError(R.BAD_SEQUENCE.with_text("Already authenticated"))
        if self.envelope.mail_from is not None:
            raise SMTPError(R.BAD_SEQUENCE.with_text("AUTH not allowed during a transaction"))
        # The mechanism's challenges and their answers (common/smtp/sasl.py, which
        # refuses a bad mechanism at the first step, before any challenge).
        steps = sasl.exchange(arg)
        try:
            challenge = next(steps)
            while True:
                line = await self._challenge(challenge)
                if line is None:
                    return  # the client went away, or sent what is not an answer
                challenge = steps.send(line)
        except StopIteration as done:
            login, password = done.value
        await self.handler.authenticate(session, login, password)
        session.user = login.lower()
        self._reply(R.AUTH_OK)

    async def _challenge(self, prompt: str) -> bytes | None:
        """Send a 334 challenge and read the answer line; None when the exchange ended."""
        self._reply(R.AUTH_CHALLENGE.with_text(prompt))
        item = await self._next()
        if item is None:
            return None
        if not isinstance(item, wire.Command):
            await self._item(item)
            return None
        return item.line

    # --- the transaction ---------------------------------------------------------------------------

    def _reset_transaction(self) -> None:
        if self.envelope.mail_from is not None or self.envelope.rcpt_tos or self.reader.in_bdat:
            self.handler.reset(self.session)
        self.envelope = MailEnvelope()
        self.reader.abort_message()
        trace_id.set("-")

    async def _mail(self, arg: str) -> None:
        session, envelope = self.session, self.envelope
        if not session.host_name:
            raise SMTPError(R.BAD_SEQUENCE.with_text("Send EHLO/LHLO first"))
        if envelope.mail_from is not None:
            raise SMTPError(R.BAD_SEQUENCE.with_text("Nested MAIL command"))
        if arg[:5].upper() != "FROM:":
            raise SMTPError(R.PARAM_SYNTAX.with_text("Syntax: MAIL FROM:<address>"))
        sender, params = addr.parse_path(arg[5:], sender=True, utf8=self.listener.utf8)
        h = self.handler
        envelope.params = mail_params(
            params, max_size=self.limits.max_message_size, utf8=self.listener.utf8, dsn=h.offers_dsn,
            requiretls=self._requiretls_offered(), binarymime=h.offers_chunking and h.offers_binarymime,
            keywords=h.ehlo_keywords,
        )
        envelope.smtp_utf8 = "SMTPUTF8" in envelope.params
        envelope.body_type = envelope.params.get("BODY", "7BIT").upper()
        result = _accepted(await self.handler.mail(session, envelope, sender))
        envelope.mail_from = sender
        self._reply(result or R.SENDER_OK)

    def _requiretls_offered(self) -> bool:
        h = self.handler
        return h.offers_requiretls and (self.session.tls or h.requiretls_in_clear)

    async def _rcpt(self, arg: str) -> None:
        session, envelope = self.session, self.envelope
        if envelope.mail_from is None:
            raise SMTPError(R.NEED_MAIL)
        if arg[:3].upper() != "TO:":
            raise SMTPError(R.PARAM_SYNTAX.with_text("Syntax: RCPT TO:<address>"))
        recipient, params = addr.parse_path(arg[3:], sender=False, utf8=self.listener.utf8)
        taken = rcpt_params(params, dsn=self.handler.offers_dsn) if params else None
        if len(envelope.rcpt_tos) >= self.limits.max_recipients:
            self._reply(R.TOO_MANY_RECIPIENTS, counts=False)
            return
        if taken is not None:
            envelope.rcpt_params[recipient] = taken  # the handler may pass them on
        try:
            result = _accepted(await self.handler.rcpt(session, envelope, recipient))
        except SMTPError:
            if taken is not None and recipient not in envelope.rcpt_tos:
                envelope.rcpt_params.pop(recipient, None)
            raise
        envelope.rcpt_tos.append(recipient)
        self._reply(result or R.RECIPIENT_OK)

    def _ready_for_message(self) -> None:
        envelope = self.envelope
        if envelope.mail_from is None:
            raise SMTPError(R.NEED_MAIL)
        if not envelope.rcpt_tos:
            raise SMTPError(R.NO_VALID_RECIPIENTS)

    async def _data(self, arg: str) -> None:
        self._ready_for_message()
        if arg:
            raise SMTPError(R.PARAM_SYNTAX.with_text("Syntax: DATA"))
        if self.envelope.body_type == "BINARYMIME":
            raise SMTPError(R.BINARYMIME_NEEDS_BDAT)
        self._reply(R.START_DATA)
        # What follows is the message: the reader's next item is its end (or a bare
        # CR or LF, which ends the session), executed like any other (_item).
        self.reader.start_data()

    async def _bdat(self, arg: str) -> None:
        args = bdat_args(arg)
        if args is None or args[0] > self.limits.max_message_size:
            # RFC 3030 2: the octets that follow cannot be found (no size), or are not
            # worth reading (more than any message may hold): end the session.
            self._reply(R.BDAT_SYNTAX if args is None else R.CHUNK_TOO_BIG, counts=False)
            self._close()
            return
        size, last = args
        try:
            self._ready_for_message()
        except SMTPError as exc:
            # The chunk still follows: read it and drop it (RFC 3030 2).
            self.reader.start_bdat(size, last=True)
            if await self._next() is not None:
                self.reader.abort_message()
                self._reply(exc.reply)
            return
        self.reader.start_bdat(size, last=last, binary=self.envelope.body_type == "BINARYMIME")
        item = await self._next()
        if item is None:
            return
        if isinstance(item, wire.Chunk):
            self._reply(R.OK.with_text(f"{size} octets received"))
            return
        assert isinstance(item, wire.Message)
        await self._deliver(item)

    async def _deliver(self, message: wire.Message) -> None:
        """The end of a message: the handler's verdict, one reply (SMTP) or one per recipient (LMTP)."""
        session, envelope = self.session, self.envelope
        count = len(envelope.rcpt_tos) if self.listener.lmtp else 1
        replies: list[Reply]
        problem = None
        if message.too_big:
            problem = R.MESSAGE_TOO_BIG
        elif message.line_too_long:
            problem = R.LINE_TOO_LONG
        elif message.bare_line_ending:
            problem = R.BARE_LINE_IN_MESSAGE
        if problem is not None:
            replies = [problem] * count
            await self.handler.refused(session, envelope, problem)
        else:
            envelope.content = message.content
            try:
                result = await self.handler.data(session, envelope)
            except SMTPError as exc:
                result = exc.reply
            replies = result if isinstance(result, list) else [result] * count
        self._holding = len(replies) > 1
        try:
            for r in replies:
                self._reply(r, counts=False)
        finally:
            self._holding = False
        if not self.reader.buffered:
            self._flush()
        self.envelope = MailEnvelope()
        self.handler.reset(session)
        trace_id.set("-")

    # --- the small ones ------------------------------------------------------------------------------

    async def _rset(self, arg: str) -> None:
        self._reset_transaction()
        self._reply(R.OK)

    async def _noop(self, arg: str) -> None:
        self._reply(R.OK)

    async def _vrfy(self, arg: str) -> None:
        if not arg:
            raise SMTPError(R.PARAM_SYNTAX.with_text("Syntax: VRFY address"))
        self._reply(R.CANNOT_VRFY)  # RFC 5321 3.5.3: we never reveal who exists

    async def _help(self, arg: str) -> None:
        self._reply(R.HELP)

    async def _quit(self, arg: str) -> None:
        self._reply(R.BYE)
        if self.reader.buffered or self.transport is None:
            self._close()  # input after QUIT: swallow it while the 221 leaves
        else:
            self._closing = True
            self.transport.close()


# Looked up by the command's verb as it came off the wire (upper-cased bytes).
_COMMANDS: dict[bytes, Callable[[Session, str], Awaitable[None]]] = {
    b"HELO": Session._helo, b"EHLO": Session._ehlo, b"LHLO": Session._lhlo, b"STARTTLS": Session._starttls,
    b"AUTH": Session._auth, b"MAIL": Session._mail, b"RCPT": Session._rcpt, b"DATA": Session._data,
    b"BDAT": Session._bdat, b"RSET": Session._rset, b"NOOP": Session._noop, b"VRFY": Session._vrfy,
    b"HELP": Session._help, b"QUIT": Session._quit,
}  # fmt: skip


def _wire_form(reply: Reply, more: tuple[str, ...]) -> bytes:
    """A reply as it goes on the wire: continuation lines `more`, then the last line."""
    last = f"{reply.code} {reply.status} {reply.text}" if reply.status else f"{reply.code} {reply.text}"
    if more:
        lines = [f"{reply.code}-{text}" for text in more]
        lines.append(last)
        out = "\r\n".join(lines) + "\r\n"
    else:
        out = last + "\r\n"
    return out.encode("utf-8", "surrogateescape")


def _accepted(result: Reply | None) -> Reply | None:
    """A handler refuses only by raising; a refusal returned by mistake is refused all the same."""
    if result is not None and not result.is_ok:
        log.error("handler returned %s instead of raising SMTPError", result)
        raise SMTPError(result)
    return result


def _redact(line: bytes) -> str:
    text = line.decode("utf-8", "replace")
    if text[:4].upper() == "AUTH":
        return " ".join(text.split()[:2]) + " <redacted>"
    return text


def _reason(exc: BaseException) -> str:
    """One short reason for a failed TLS handshake, for the log line."""
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__
