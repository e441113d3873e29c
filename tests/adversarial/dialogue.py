"""Dialogue scripts: the lines a client sends and the reply each must get.

A script is a list of steps `(send, expect)`:

- `send` is the raw bytes written to the socket (written exactly as given, so
  bare CR, bare LF and NUL reach the server untouched), `None` to send
  nothing, or `STARTTLS_HANDSHAKE` to turn the connection into TLS;
- `expect` is the start of the reply the server must give (`"250 2.1.5"`,
  `"521 5.5.2"`; the last line of a multi-line reply is compared), a list of
  such prefixes when one send is answered by several replies (pipelining,
  LMTP), `CLOSED` when the server must hang up without another word, or
  `None` when no reply is read.

`run()` plays a script and fails with the whole transcript, so a failing test
reads like a mail log:

    C: RCPT TO:<x@elsewhere.example>
    S: 554 5.7.1 Relay access denied
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass, field

from tests.support.suite import tls_client_context

CLOSED = "<closed>"
STARTTLS_HANDSHAKE = b"<tls handshake>"

Expect = str | list[str] | None
Step = tuple[bytes | None, Expect]


@dataclass
class Session:
    """One raw client connection and its transcript."""

    sock: socket.socket
    transcript: list[str] = field(default_factory=list)
    buffer: bytes = b""

    @classmethod
    def open(cls, port: int, *, implicit_tls: bool = False, timeout: float = 10.0) -> Session:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        if implicit_tls:
            sock = tls_client_context().wrap_socket(sock)
        return cls(sock)

    def send(self, data: bytes) -> None:
        self.transcript.append("C: " + _show(data))
        self.sock.sendall(data)

    def starttls(self) -> None:
        assert not self.buffer, f"plaintext after STARTTLS's 220: {self.buffer!r}"
        self.transcript.append("   <TLS handshake>")
        self.sock = tls_client_context().wrap_socket(self.sock)

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
        return line.rstrip(b"\r")

    def read_reply(self) -> str | None:
        """A whole reply (continuation lines too); returns its last line, or None at EOF."""
        while True:
            line = self.read_line()
            if line is None:
                self.transcript.append("S: " + CLOSED)
                return None
            text = line.decode("utf-8", "replace")
            self.transcript.append("S: " + text)
            if text[3:4] != "-":
                return text

    def expect(self, expect: Expect) -> list[str | None]:
        if expect is None:
            return []
        if expect == CLOSED:
            got = self.read_reply()
            self.check(got is None, f"expected the server to close the connection, got {got!r}")
            return [None]
        wanted = [expect] if isinstance(expect, str) else expect
        replies = []
        for prefix in wanted:
            got = self.read_reply()
            self.check(got is not None and got.startswith(prefix), f"expected {prefix!r}, got {got!r}")
            replies.append(got)
        return replies

    def check(self, ok: bool, why: str) -> None:
        if not ok:
            raise AssertionError(why + "\n--- dialogue ---\n" + "\n".join(self.transcript))

    def close(self) -> None:
        self.sock.close()


def run(port: int, script: list[Step], *, implicit_tls: bool = False, timeout: float = 10.0) -> Session:
    """Connect, play the script (the first step usually expects the 220 greeting), return the session."""
    s = Session.open(port, implicit_tls=implicit_tls, timeout=timeout)
    try:
        play(s, script)
    except BaseException:
        s.close()
        raise
    return s


def play(s: Session, script: list[Step]) -> None:
    for send, expect in script:
        if send == STARTTLS_HANDSHAKE:
            s.starttls()
        elif send is not None:
            s.send(send)
        s.expect(expect)


def line(text: str) -> bytes:
    """A well-formed command line: the text plus CRLF."""
    return text.encode("utf-8") + b"\r\n"


def _show(data: bytes) -> str:
    text = data.decode("utf-8", "replace")
    if len(text) > 200:
        text = text[:120] + f"... ({len(data)} octets) ..." + text[-40:]
    return text.replace("\r", "\\r").replace("\n", "\\n").replace("\x00", "\\0")
