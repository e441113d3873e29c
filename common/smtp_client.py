"""Our SMTP and LMTP client: one small class for every hop we make.

The MSA uses it to hand a submission to the MTA, the queue manager to hand mail
to the MDA (LMTP) and to remote hosts (SMTP).  LMTP differs from SMTP in one
important way (RFC 2033 4.2): after DATA the server answers once *per accepted
recipient*, so a message can be delivered to one mailbox and deferred for
another.  `send()` therefore always returns one reply per recipient.

What leaves through here is clean: every line ends in CRLF (a stray CR or LF in
a stored body is turned into CRLF, so we never emit the ambiguous line endings
that SMTP smuggling relies on), dots are stuffed, and lines are never split.
The one exception is a BODY=BINARYMIME message: it goes as it is, framed by
its length in BDAT (RFC 3030), where no line ending can end it early.

To an LMTP server that offers PIPELINING and CHUNKING (our MDA, Dovecot's) a
whole transaction is one write and one round trip: MAIL, every RCPT and
`BDAT n LAST` with the message behind it (RFC 2033 4.2 makes pipelining part
of LMTP; RFC 3030 2 lets BDAT follow the RCPTs in the same group, since its
octets are framed by their count, never by a reply).  The replies are read in
order: MAIL's, one per RCPT, then one per accepted recipient, or BDAT's one
refusal when none was accepted (the server still reads and drops the octets).
No dot-stuffing on the way out, no dot search on the way in.  A message over
the SIZE the server offers goes the ordinary way (the envelope first), since
a chunk over the server's limit ends the session.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
import ssl
from dataclasses import dataclass, field

from common import reply as R
from common.endpoint import Endpoint
from common.numbers import is_decimal
from common.reply import Reply, parse_reply

log = logging.getLogger("smtp_client")

_LINE_ENDINGS = re.compile(rb"\r\n|\r|\n")
# The MAIL FROM parameter of a message sent only with BDAT (RFC 3030 3).
BINARYMIME = "BODY=BINARYMIME"


class NextHopError(Exception):
    """The session failed as a whole (connect, greeting, TLS, dropped connection)."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


class NoStartTLS(NextHopError):
    """TLS was required and the server does not offer STARTTLS, or refused it."""


def encode_body(content: bytes) -> bytes:
    """CRLF line endings, dot-stuffed (RFC 5321 4.5.2), ending in CRLF.CRLF."""
    lines = _LINE_ENDINGS.split(content)
    if lines and lines[-1] == b"":
        lines.pop()
    out = [b"." + line if line.startswith(b".") else line for line in lines]
    return b"\r\n".join(out) + (b"\r\n" if out else b"") + b".\r\n"


def crlf_lines(content: bytes) -> bytes:
    """`content` with CRLF line endings, ending in CRLF, not dot-stuffed: for BDAT."""
    pairs = content.count(b"\r\n")
    if content.count(b"\n") != pairs or content.count(b"\r") != pairs:
        content = _LINE_ENDINGS.sub(b"\r\n", content)  # a stray CR or LF: made a line end
    return content if not content or content.endswith(b"\r\n") else content + b"\r\n"


@dataclass
class Client:
    """One SMTP or LMTP session with a next hop.  Use `async with Client.connect(...)`."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    lmtp: bool
    timeout: float
    peer: str
    extensions: dict[str, str] = field(default_factory=dict)
    tls: bool = False
    # Whether the last transaction's MAIL got its 250.  Until then the server has
    # taken on nothing, so a failed reused session can be replaced and the
    # message sent again at once (`LocalDelivery`, `RemoteDelivery`).
    mail_accepted: bool = False

    @classmethod
    async def connect(
        cls,
        host: str | Endpoint,
        port: int = 25,
        *,
        lmtp: bool = False,
        helo: str = "localhost",
        timeout: float = 60.0,
        connect_timeout: float = 30.0,
        tls: ssl.SSLContext | None = None,
        require_tls: bool = False,
        implicit_tls: bool = False,
        tls_name: str = "",
    ) -> Client:
        """Connect, read the greeting, say EHLO/LHLO and start TLS when offered.

        `host` is a name or address with `port`, or one of our own listeners'
        `Endpoint` (TCP or Unix socket; `port` unused); `tls_name` is the name
        the certificate must carry when `tls` verifies it (an MX host's name),
        `host` if empty.
        Raises NextHopError with a 4xx reply when the hop cannot be reached, so
        callers defer rather than bounce.
        """
        where = host if isinstance(host, Endpoint) else Endpoint(host, port)
        name = where.host
        peer = str(where) if where.is_unix else f"{where.host}:{where.port}"
        try:
            if where.is_unix:
                opened = asyncio.open_unix_connection(where.path, limit=1 << 20)
            else:
                opened = asyncio.open_connection(
                    name, where.port, limit=1 << 20, ssl=tls if implicit_tls else None,
                    server_hostname=name if implicit_tls else None,
                )
            reader, writer = await asyncio.wait_for(opened, connect_timeout)
        except (OSError, TimeoutError) as exc:
            raise NextHopError(R.NEXT_HOP_UNAVAILABLE.with_text(f"Cannot connect to {peer}: {exc}")) from exc
        client = cls(reader, writer, lmtp, timeout, peer, tls=implicit_tls)
        try:
            greeting = await client.read_reply()
            if greeting.code != 220:
                raise NextHopError(_prefixed(greeting, f"{peer} greeted with"))
            await client.hello(helo)
            if tls is not None and not client.tls and "STARTTLS" in client.extensions:
                await client.starttls(tls, tls_name or name)
                await client.hello(helo)
            elif require_tls and not client.tls:
                raise NoStartTLS(R.TLS_FAILED.with_text(f"{peer} does not offer STARTTLS"))
        except BaseException:
            client.close()
            raise
        return client

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.quit()

    # --- the wire --------------------------------------------------------------

    async def read_reply(self) -> Reply:
        code, lines = await self.read_lines()
        return parse_reply(code, lines)

    async def read_lines(self) -> tuple[int, list[str]]:
        """One reply: its code and the text of each of its lines."""
        lines: list[str] = []
        code = 0
        while True:
            try:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for makes a task of every
                # read, and this runs for every reply line of every hop (py-spy, queue manager).
                async with asyncio.timeout(self.timeout):
                    raw = await self.reader.readline()
            except TimeoutError as exc:
                raise NextHopError(R.CONNECTION_LOST.with_text(f"Timeout waiting for {self.peer}")) from exc
            except (OSError, ValueError) as exc:
                raise NextHopError(R.CONNECTION_LOST.with_text(f"Lost {self.peer}: {exc}")) from exc
            if not raw:
                raise NextHopError(R.CONNECTION_LOST.with_text(f"{self.peer} closed the connection"))
            text = raw.decode("utf-8", "replace").rstrip("\r\n")
            if len(text) < 3 or not is_decimal(text[:3]):  # "²²⁰" is no reply code
                raise NextHopError(R.PEER_PROTOCOL_ERROR.with_text(f"{self.peer} sent garbage: {text[:60]!r}"))
            code = int(text[:3])
            lines.append(text[4:])
            if text[3:4] != "-":
                break
        return code, lines

    async def command(self, line: str) -> Reply:
        await self._write(line.encode("utf-8") + b"\r\n")
        return await self.read_reply()

    async def _write(self, data: bytes) -> None:
        # Asked first: uvloop raises RuntimeError for a write to a closed transport
        # where asyncio's own loop drops it and the drain reports the loss.
        if self.writer.transport.is_closing():
            raise NextHopError(R.CONNECTION_LOST.with_text(f"Lost {self.peer}: connection closed"))
        try:
            self.writer.write(data)
            # Usually the kernel took it all at once: then there is nothing to wait
            # for, and no timer to set (a lost connection shows at the next read).
            if self.writer.transport.get_write_buffer_size():
                async with asyncio.timeout(self.timeout):
                    await self.writer.drain()
        except (OSError, TimeoutError) as exc:
            raise NextHopError(R.CONNECTION_LOST.with_text(f"Lost {self.peer}: {exc}")) from exc

    async def hello(self, name: str) -> None:
        await self._write(f"{'LHLO' if self.lmtp else 'EHLO'} {name}\r\n".encode())
        code, lines = await self.read_lines()
        if code != 250 and not self.lmtp:
            # A server without ESMTP (RFC 5321 3.2): plain HELO, and no extensions.
            await self._write(f"HELO {name}\r\n".encode())
            code, lines = await self.read_lines()
            lines = lines[:1]
        if code != 250:
            raise NextHopError(_prefixed(parse_reply(code, lines), f"{self.peer} refused EHLO:"))
        # EHLO keywords, e.g. {'SIZE': '10240000', 'PIPELINING': ''}; line 1 is the name.
        self.extensions = {}
        for line in lines[1:]:
            key, _, value = line.partition(" ")
            self.extensions[key.upper()] = value

    async def starttls(self, ctx: ssl.SSLContext, host: str) -> None:
        reply = await self.command("STARTTLS")
        if reply.code != 220:
            raise NoStartTLS(_prefixed(reply, f"{self.peer} refused STARTTLS:"))
        try:
            await self.writer.start_tls(ctx, server_hostname=host)
        except (OSError, ssl.SSLError) as exc:
            raise NextHopError(R.TLS_FAILED.with_text(f"TLS with {self.peer} failed: {exc}")) from exc
        self.tls = True

    async def auth_plain(self, user: str, password: str, *, clear_ok: bool = False) -> Reply:
        """AUTH PLAIN; never without TLS unless `clear_ok` (our own internal hop, on loopback)."""
        if not self.tls and not clear_ok:
            return R.STARTTLS_FIRST.with_text("Refusing to send a password without TLS")
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        await self._write(f"AUTH PLAIN {token}\r\n".encode())
        return await self.read_reply()

    async def send(
        self,
        sender: str,
        recipients: list[str],
        content: bytes,
        *,
        mail_params: tuple[str, ...] = (),
        rcpt_params: list[tuple[str, ...]] | None = None,
    ) -> list[Reply]:
        """One transaction; returns one reply per recipient, in order.

        A recipient refused at RCPT gets that reply; the others get the reply
        after DATA (SMTP: the one reply; LMTP: their own).  If the session
        breaks part-way, NextHopError is raised and nothing may be assumed
        delivered.  A message declared BODY=BINARYMIME goes as it is in one
        `BDAT n LAST` (RFC 3030 3), never with DATA.
        """
        params = list(mail_params)
        if "SIZE" in self.extensions:
            params.append(f"SIZE={len(content)}")
        mail = f"MAIL FROM:<{sender}>" + "".join(f" {p}" for p in params)
        more = rcpt_params or [()] * len(recipients)
        commands = [mail] + [
            f"RCPT TO:<{r}>" + "".join(f" {p}" for p in ps) for r, ps in zip(recipients, more, strict=True)
        ]
        self.mail_accepted = False
        if self.lmtp and "PIPELINING" in self.extensions and "CHUNKING" in self.extensions:
            binary = BINARYMIME in mail_params
            octets = content if binary else crlf_lines(content)
            if not self._over_size(len(octets)):
                return await self._send_in_one_round_trip(commands, len(recipients), octets)
            # Over the size the server offers: MAIL is refused, and a chunk that big would
            # end the session (RFC 3030 2 lets a server close rather than read it): the
            # envelope alone goes, below, and the session stays usable.
        if "PIPELINING" in self.extensions:
            # RFC 2920: send the whole envelope, then read the replies in order.
            await self._write("".join(c + "\r\n" for c in commands).encode("utf-8"))
            replies = [await self.read_reply()]
            self.mail_accepted = replies[0].code == 250
            replies += [await self.read_reply() for _ in commands[1:]]
        else:
            replies = []
            for c in commands:
                replies.append(await self.command(c))
                self.mail_accepted = replies[0].code == 250
                if not self.mail_accepted:
                    break
        mail_reply = replies[0]
        if mail_reply.code != 250:
            if len(replies) > 1:
                await self.command("RSET")
            return [mail_reply] * len(recipients)
        rcpt_replies = replies[1:]
        accepted = [i for i, r in enumerate(rcpt_replies) if r.code in (250, 251)]
        if not accepted:
            await self.command("RSET")
            return rcpt_replies
        if BINARYMIME in mail_params:
            await self._write(_bdat_last(content))
        else:
            reply = await self.command("DATA")
            if reply.code != 354:
                return [reply if i in accepted else r for i, r in enumerate(rcpt_replies)]
            await self._write(encode_body(content))
        results = list(rcpt_replies)
        if self.lmtp:
            for i in accepted:
                results[i] = await self.read_reply()
        else:
            final = await self.read_reply()
            for i in accepted:
                results[i] = final
        return results

    def _over_size(self, octets: int) -> bool:
        """True when the server's EHLO SIZE (RFC 1870) is a limit and `octets` exceed it."""
        limit = self.extensions.get("SIZE", "")
        return is_decimal(limit) and int(limit) > 0 and octets > int(limit)

    async def _send_in_one_round_trip(self, commands: list[str], count: int, octets: bytes) -> list[Reply]:
        """LMTP: MAIL, the RCPTs and `BDAT n LAST` with the message, in one write (see the module)."""
        await self._write("".join(c + "\r\n" for c in commands).encode("utf-8") + _bdat_last(octets))
        mail_reply = await self.read_reply()
        self.mail_accepted = mail_reply.code == 250
        rcpt_replies = [await self.read_reply() for _ in range(count)]
        accepted = [i for i, r in enumerate(rcpt_replies) if r.code in (250, 251)]
        if not accepted:
            await self.read_reply()  # BDAT refused as a whole (no valid recipients): one reply
            return [mail_reply] * count if mail_reply.code != 250 else rcpt_replies
        results = list(rcpt_replies)
        for i in accepted:  # RFC 2033 4.2: one reply per accepted recipient, in RCPT order
            results[i] = await self.read_reply()
        return results

    # The steps of one transaction, for a proxy that passes each reply on (the MSA).

    async def mail(self, sender: str, params: tuple[str, ...] = ()) -> Reply:
        return await self.command(f"MAIL FROM:<{sender}>" + "".join(f" {p}" for p in params))

    async def rcpt(self, recipient: str, params: tuple[str, ...] = ()) -> Reply:
        return await self.command(f"RCPT TO:<{recipient}>" + "".join(f" {p}" for p in params))

    async def data(self, content: bytes) -> Reply:
        reply = await self.command("DATA")
        if reply.code != 354:
            return reply
        await self._write(encode_body(content))
        return await self.read_reply()

    async def bdat(self, content: bytes) -> Reply:
        """The whole message as it is, in one last chunk (RFC 3030): for BODY=BINARYMIME."""
        await self._write(_bdat_last(content))
        return await self.read_reply()

    async def quit(self) -> None:
        with contextlib.suppress(NextHopError, TimeoutError, OSError):
            await asyncio.wait_for(self.command("QUIT"), 5)
        self.close()

    def peer_chain(self) -> list[bytes]:
        """The certificates the server sent (DER, its own first), unverified: what DANE
        checks against its TLSA records.  [] before TLS."""
        ssl_object = self.writer.get_extra_info("ssl_object")
        if ssl_object is None:
            return []
        # Public from Python 3.13; the same method of the C object before.
        chain_of = getattr(ssl_object, "get_unverified_chain", None) or ssl_object._sslobj.get_unverified_chain
        return [cert.public_bytes(ssl._ssl.ENCODING_DER) for cert in chain_of() or []]  # type: ignore[attr-defined]

    def local_address(self) -> str:
        """Our end's IP address ("" for a Unix socket)."""
        sockname = self.writer.get_extra_info("sockname")
        return str(sockname[0]) if isinstance(sockname, tuple) else ""

    def looks_alive(self) -> bool:
        """False when the server is known to have gone (no round trip: nothing is sent)."""
        return not self.writer.transport.is_closing() and not self.reader.at_eof()

    def close(self) -> None:
        with contextlib.suppress(Exception):  # a broken transport: nothing left to close
            self.writer.close()


def _bdat_last(content: bytes) -> bytes:
    return b"BDAT %d LAST\r\n" % len(content) + content


def _prefixed(reply: Reply, what: str) -> Reply:
    return Reply(reply.code, reply.status, f"{what} {reply.code} {reply.text}")
