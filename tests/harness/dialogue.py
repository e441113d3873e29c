"""Dialogue transcripts (tests/dialogues/*.txt, format in its README.md): read one, play it, check each reply.

`parse` turns a transcript into `Exchange`s: the octets the client writes at
once (one or more `C:` lines, each with CRLF; `D:` octets exactly as escaped),
then the replies it must get, one `S:` line each (`S: <closed>`: the server
hangs up).  `play` writes and reads them through `Client` on an open
connection and fails, with the whole dialogue so far, at the first reply whose
code, enhanced status code or text (a prefix, where the transcript gives it)
is not the one expected.  `run` plays a transcript against the listener it
names on a `Stack` of `listeners()` (tests/harness/services.py) and then
checks `stored:`, the messages the listeners kept (queued by the MTA plus
delivered by the MDA; there is no queue manager).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from tests.harness.client import Client, Reply
from tests.harness.services import Stack
from tests.support.suite import PASSWORD

# The listeners a transcript can name, and the port (of `Stack.ports`) each is on.
LISTENERS = {
    "mta": "smtp",  # the MTA's public listener (port 25's role), as a stranger on loopback
    "lmtp": "lmtp",  # the MDA
    "msa": "submission",  # the MSA before STARTTLS
    "msa-after-auth": "submission",  # after EHLO, STARTTLS, EHLO, AUTH as alice, which the runner plays
}
CLOSED = "<closed>"
_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_ESCAPE = re.compile(rb"\\(x[0-9a-fA-F]{2}|[rn0\\])")


@dataclass(frozen=True)
class Expect:
    """One reply: its code, enhanced status code and text as the transcript gives them ("" when it does not)."""

    line: int  # in the transcript
    code: int  # 0: the server closes the connection
    status: str = ""
    text: str = ""
    continued: tuple[str, ...] = ()  # lines of a multi-line reply that must be there ("250-PIPELINING")


@dataclass(frozen=True)
class Exchange:
    send: bytes  # written at once (pipelined when several commands)
    replies: tuple[Expect, ...]


@dataclass(frozen=True)
class Dialogue:
    title: str
    listener: str
    exchanges: tuple[Exchange, ...]
    stored: int | None = None
    name: str = ""


def _octets(text: str) -> bytes:
    """A `D:` line's text: UTF-8, with \\r \\n \\0 \\\\ and \\xNN standing for their octets."""
    def one(m: re.Match[bytes]) -> bytes:
        esc = m.group(1)
        return bytes([int(esc[1:], 16)]) if esc[:1] == b"x" else {b"r": b"\r", b"n": b"\n", b"0": b"\0",
                                                                   b"\\": b"\\"}[esc]

    return _ESCAPE.sub(one, text.encode("utf-8"))


def _expect(text: str, n: int, continued: list[str]) -> Expect:
    if text == CLOSED:
        return Expect(n, 0)
    code, _, rest = text.partition(" ")
    if not (len(code) == 3 and code.isdigit()):
        raise ValueError(f"line {n}: a reply starts with a three-digit code: {text!r}")
    status, _, more = rest.partition(" ")
    if not _STATUS.fullmatch(status):
        status, more = "", rest
    return Expect(n, int(code), status, more, tuple(continued))


def parse(text: str, name: str = "") -> Dialogue:
    title, listener, stored = "", "", None
    exchanges: list[Exchange] = []
    send, replies, continued = b"", [], []  # the exchange being read
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        if raw.startswith("#"):
            title = title or raw.lstrip("# ").strip()
            continue
        tag, sep, value = raw.partition(": ")
        if not sep and raw.rstrip() == "C:":  # an empty line (its trailing space trimmed by an editor)
            tag, value = "C", ""
        if tag in ("C", "D"):
            if replies:
                exchanges.append(Exchange(send, tuple(replies)))
                send, replies = b"", []
            send += value.encode("utf-8") + b"\r\n" if tag == "C" else _octets(value)
        elif tag == "S":
            if value[3:4] == "-":
                continued.append(value)
            else:
                replies.append(_expect(value, n, continued))
                continued = []
        elif tag == "listener":
            if value not in LISTENERS:
                raise ValueError(f"line {n}: no listener {value!r}; the runner knows {', '.join(LISTENERS)}")
            listener = value
        elif tag == "stored":
            stored = int(value)
        else:
            raise ValueError(f"line {n}: neither C:, D:, S:, listener: nor stored: {raw!r}")
    if send or replies:
        exchanges.append(Exchange(send, tuple(replies)))
    if not listener:
        raise ValueError(f"{name}: no `listener:` line")
    return Dialogue(title, listener, tuple(exchanges), stored, name)


def check(c: Client, got: Reply, want: Expect, name: str = "") -> None:
    where = f"{name}:{want.line}: " if name else f"line {want.line}: "
    if want.code == 0:
        c.check(got.code == 0, f"{where}expected the server to close the connection, got {got.text!r}")
        return
    last = got.last
    _, _, rest = last.partition(" ")
    status, _, text = rest.partition(" ")
    if not _STATUS.fullmatch(status):
        status, text = "", rest
    ok = got.code == want.code and (not want.status or status == want.status) and text.startswith(want.text)
    lines = got.text.split("\n")[:-1]
    ok = ok and all(any(ln.startswith(c) for ln in lines) for c in want.continued)
    shown = " ".join(x for x in (str(want.code), want.status, want.text) if x)
    c.check(ok, f"{where}expected {shown!r}{' with ' + repr(want.continued) if want.continued else ''}, "
                f"got {got.text!r}")


def play(c: Client, dialogue: Dialogue) -> None:
    """Play the exchanges on an open connection (nothing read yet but what the opening read)."""
    for exchange in dialogue.exchanges:
        if exchange.send:
            c.send(exchange.send)
        for want in exchange.replies:
            check(c, c.reply(), want, dialogue.name)


def _login(c: Client) -> None:
    """The MSA's opening up to AUTH, as alice."""
    c.check(c.reply().code == 220, "the opening: no greeting")
    c.check(c.cmd("EHLO client.example").code == 250, "the opening: EHLO refused")
    c.check(c.cmd("STARTTLS").code == 220, "the opening: STARTTLS refused")
    c.starttls()
    c.check(c.cmd("EHLO client.example").code == 250, "the opening: EHLO refused after STARTTLS")
    c.check(c.auth_plain("alice@example.org", PASSWORD).code == 235, "the opening: AUTH refused")


def kept(stack: Stack) -> int:
    """The messages the listeners kept: in the MTA's queue and in alice's and bob's mailboxes."""
    return len(stack.queued()) + sum(len(stack.mailbox(a)) for a in ("alice@example.org", "bob@example.org"))


def run(path: Path, stack: Stack) -> None:
    """Play the transcript at `path` against its listener on `stack` (a `listeners()` stack)."""
    dialogue = parse(path.read_text(encoding="utf-8"), path.name)
    before = kept(stack)
    c = Client.connect(stack.ports[LISTENERS[dialogue.listener]])
    try:
        if dialogue.listener == "msa-after-auth":
            _login(c)
        play(c, dialogue)
    finally:
        c.quit()
    if dialogue.stored is not None:
        stored = kept(stack) - before
        c.check(stored == dialogue.stored, f"{path.name}: stored {stored} messages, the transcript says "
                                           f"{dialogue.stored}")

