"""The one raw SMTP/LMTP client of the tests: bytes out, replies in, a transcript kept.

`Client` writes exactly the bytes it is given (so bare CR, bare LF and NUL reach
the server untouched), reads replies line by line, and turns the connection
into TLS on request (STARTTLS or implicit TLS).  Pipelining is sending several
commands in one `send` and then reading as many replies.  Every line either
way goes into `transcript`, and a failed check shows it, so a failing test
reads like a mail log:

    C: RCPT TO:<x@elsewhere.example>
    S: 554 5.7.1 Relay access denied

Dialogue scripts are lists of steps `(send, expect)`:

- `send` is the raw bytes to write, `None` to send nothing, or
  `STARTTLS_HANDSHAKE` to turn the connection into TLS;
- `expect` is the start of the reply the server must give (`"250 2.1.5"`; the
  last line of a multi-line reply is compared), a list of such prefixes when one
  send is answered by several replies (pipelining, LMTP), `CLOSED` when the
  server must hang up without another word, or `None` when no reply is read.

`run()` connects and plays a script; `play()` plays one on an open client.
"""

from __future__ import annotations

import base64
import contextlib
import select
import smtplib
import socket
import ssl
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from tests.support.suite import PASSWORD, tls_client_context

if TYPE_CHECKING:
    from tests.support.suite import Installation

CLOSED = "<closed>"
STARTTLS_HANDSHAKE = b"<tls handshake>"

Expect = str | list[str] | None
Step = tuple[bytes | None, Expect]


class Reply(NamedTuple):
    """One whole reply: its code (0 when the server hung up instead) and its lines joined with newlines."""

    code: int
    text: str

    @property
    def last(self) -> str:
        return self.text.rsplit("\n", 1)[-1]


@dataclass
class Client:
    """One raw client connection and its transcript."""

    sock: socket.socket
    transcript: list[str] = field(default_factory=list)
    buffer: bytes = b""
    greeting: Reply = Reply(0, "")  # read by `session`

    @classmethod
    def connect(
        cls, port: int | str, *, host: str = "127.0.0.1", tls: bool = False, source: str = "", timeout: float = 10.0
    ) -> Client:
        """A connection to host:port (from `source`, another loopback address, when given), or to
        the Unix socket at the path `port`; `tls` is implicit TLS (the 465 role)."""
        if isinstance(port, str):
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(timeout)
            try:
                sock.connect(port)
            except OSError:
                sock.close()
                raise
        else:
            sock = socket.create_connection(
                (host, port), timeout=timeout, source_address=(source, 0) if source else None
            )
        if tls:
            sock = tls_client_context().wrap_socket(sock)
        return cls(sock)

    @classmethod
    def session(cls, port: int | str, **connect: Any) -> Client:
        """A connection (arguments as for `connect`) with the server's greeting read into `greeting`."""
        c = cls.connect(port, **connect)
        c.greeting = c.reply()
        return c

    # --- writing --------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.transcript.append("C: " + _show(data))
        self.sock.sendall(data)

    def starttls(self) -> None:
        """The TLS handshake (after the server's 220 to STARTTLS)."""
        assert not self.buffer, f"plaintext after STARTTLS's 220: {self.buffer!r}"
        self.transcript.append("   <TLS handshake>")
        self.sock = tls_client_context().wrap_socket(self.sock)

    # --- reading --------------------------------------------------------------------

    def read_line(self) -> bytes | None:
        """One reply line (without CRLF), or None when the server closed the connection."""
        while b"\n" not in self.buffer:
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, ssl.SSLEOFError):
                chunk = b""
            except TimeoutError:
                self.check(False, "no reply from the server (timeout)")
            if not chunk:
                if self.buffer:
                    line, self.buffer = self.buffer, b""
                    return line
                return None
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        self.check(line.endswith(b"\r"), f"a reply line not ended by CRLF: {line!r}")
        return line[:-1]

    def _lines(self) -> list[str] | None:
        """The lines of one whole reply (continuation lines too), or None at EOF."""
        lines: list[str] = []
        while True:
            raw = self.read_line()
            if raw is None:
                self.transcript.append("S: " + CLOSED)
                return lines or None
            text = raw.decode("utf-8", "replace")
            self.transcript.append("S: " + text)
            lines.append(text)
            if text[3:4] != "-":
                return lines

    def read_reply(self) -> str | None:
        """A whole reply; returns its last line, or None at EOF."""
        lines = self._lines()
        return lines[-1] if lines else None

    def reply(self) -> Reply:
        """A whole reply with its code; Reply(0, "") when the server hung up."""
        lines = self._lines()
        if not lines:
            return Reply(0, "")
        code = lines[-1][:3]
        return Reply(int(code) if code.isdigit() else 0, "\n".join(lines))

    def cmd(self, text: str) -> Reply:
        """Send one command line (CRLF added) and read its reply."""
        self.send(line(text))
        return self.reply()

    def expect(self, expect: Expect) -> list[str | None]:
        if expect is None:
            return []
        if expect == CLOSED:
            got = self.read_reply()
            self.check(got is None, f"expected the server to close the connection, got {got!r}")
            return [None]
        wanted = [expect] if isinstance(expect, str) else expect
        replies: list[str | None] = []
        for prefix in wanted:
            got = self.read_reply()
            self.check(got is not None and got.startswith(prefix), f"expected {prefix!r}, got {got!r}")
            replies.append(got)
        return replies

    def quiet(self, seconds: float) -> bool:
        """True when the server sends nothing for `seconds`."""
        if self.buffer or (isinstance(self.sock, ssl.SSLSocket) and self.sock.pending()):
            return False
        ready, _, _ = select.select([self.sock], [], [], seconds)
        return not ready

    def closed(self) -> bool:
        """True when the server has closed the connection (EOF) with nothing more to read."""
        return self.read_line() is None

    def check(self, ok: bool, why: str) -> None:
        if not ok:
            raise AssertionError(why + "\n--- dialogue ---\n" + "\n".join(self.transcript))

    # --- whole transactions -----------------------------------------------------------

    def auth_plain(self, user: str, password: str) -> Reply:
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        return self.cmd(f"AUTH PLAIN {token}")

    def data(self, message: bytes, replies: int = 1) -> list[Reply]:
        """DATA, then the message dot-stuffed; one reply (SMTP) or one per accepted recipient (LMTP)."""
        r = self.cmd("DATA")
        self.check(r.code == 354, f"DATA refused: {r.text}")
        self.send(stuff(message))
        return [self.reply() for _ in range(replies)]

    def deliver(
        self, sender: str, rcpts: list[str], message: bytes, *, trace: str = "", lmtp: bool = True
    ) -> tuple[list[Reply], list[Reply]]:
        """One transaction; returns (RCPT replies, DATA replies).  With no recipient
        accepted, the DATA replies are the refusal of DATA itself."""
        xtrace = f" XTRACE={trace}" if trace else ""
        r = self.cmd(f"MAIL FROM:<{sender}>{xtrace}")
        self.check(r.code == 250, f"MAIL refused: {r.text}")
        rcpt_replies = [self.cmd(f"RCPT TO:<{a}>") for a in rcpts]
        accepted = sum(1 for r in rcpt_replies if r.code == 250)
        if not accepted:
            return rcpt_replies, [self.cmd("DATA")]
        return rcpt_replies, self.data(message, accepted if lmtp else 1)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def quit(self) -> None:
        """QUIT (its reply read if it comes), then close."""
        with contextlib.suppress(OSError, AssertionError):
            self.send(b"QUIT\r\n")
            self.reply()
        self.close()


def run(port: int | str, script: list[Step], *, tls: bool = False, timeout: float = 10.0) -> Client:
    """Connect, play the script (the first step usually expects the 220 greeting), return the client."""
    s = Client.connect(port, tls=tls, timeout=timeout)
    try:
        play(s, script)
    except BaseException:
        s.close()
        raise
    return s


def play(s: Client, script: list[Step]) -> None:
    for send, expect in script:
        if send == STARTTLS_HANDSHAKE:
            s.starttls()
        elif send is not None:
            s.send(send)
        s.expect(expect)


def line(text: str) -> bytes:
    """A well-formed command line: the text plus CRLF."""
    return text.encode("utf-8") + b"\r\n"


def stuff(message: bytes) -> bytes:
    """A message as DATA sends it: CRLF lines, dot-stuffed, with the final CRLF.CRLF."""
    lines = message.split(b"\r\n")
    if lines[-1] == b"":
        lines.pop()
    return b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines) + b".\r\n"


def _show(data: bytes) -> str:
    text = data.decode("utf-8", "replace")
    if len(text) > 200:
        text = text[:120] + f"... ({len(data)} octets) ..." + text[-40:]
    return text.replace("\r", "\\r").replace("\n", "\\n").replace("\x00", "\\0")


# --- smtplib sessions with the MSA --------------------------------------------------------
# For tests that want a whole conforming client rather than a dialogue.


def submission(inst: Installation, *, source: str = "127.0.0.1", tls: bool = True) -> smtplib.SMTP:
    """A client on the 587 role, after EHLO (and STARTTLS + EHLO when `tls`)."""
    client = smtplib.SMTP("127.0.0.1", inst.ports["submission"], timeout=20, source_address=(source, 0))
    client.ehlo("client.test")
    if tls:
        client.starttls(context=tls_client_context())
        client.ehlo("client.test")
    return client


def submissions(inst: Installation, *, source: str = "127.0.0.1") -> smtplib.SMTP_SSL:
    """A client on the 465 role (implicit TLS), after EHLO."""
    client = smtplib.SMTP_SSL("127.0.0.1", inst.ports["submissions"], timeout=20, context=tls_client_context(),
                              source_address=(source, 0))
    client.ehlo("client.test")
    return client


def logged_in(
    inst: Installation, user: str = "alice@example.org", *, source: str = "127.0.0.1", password: str = PASSWORD
) -> smtplib.SMTP:
    """A client on the 587 role after STARTTLS and AUTH."""
    client = submission(inst, source=source)
    client.login(user, password)
    return client


def auth_plain(client: smtplib.SMTP, user: str, password: str) -> tuple[int, bytes]:
    """AUTH PLAIN through smtplib, the reply as smtplib gives it (no exception on refusal)."""
    token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    return client.docmd("AUTH", f"PLAIN {token}")
