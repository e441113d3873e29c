"""Random bytes at every listener: each session ends somehow, the listener stays up and
answers the next client, and no session dies of an unexpected exception."""

from __future__ import annotations

import logging
import random
import socket
import time
from collections.abc import Iterator

import pytest

from tests.harness.client import Client, line, play
from tests.harness.services import Stack, listeners

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One installation's listeners for the module: starting them cost more than
    each test's sessions; a listener the noise had hurt fails its own test, whichever came first."""
    with listeners(tmp_path_factory.mktemp("random_bytes") / "mailroom") as stack:
        yield stack

WORDS = [b"EHLO x", b"HELO x", b"LHLO x", b"MAIL FROM:<a@b.example>", b"RCPT TO:<alice@example.org>",
         b"DATA", b"BDAT 10", b"RSET", b"NOOP", b"STARTTLS", b"AUTH PLAIN", b"AUTH LOGIN", b"VRFY x",
         b".", b"..", b"\x00", b"\xff\xfe", b"=?utf-8?", b"<", b">", b"@", b"%", b"SIZE=99999999999999999999"]
ENDS = [b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r", b"", b"\r\n.\r\n"]


def noise(rng: random.Random) -> bytes:
    parts = []
    for _ in range(rng.randint(1, 30)):
        if rng.random() < 0.6:
            parts.append(rng.choice(WORDS) + rng.choice(ENDS))
        else:
            parts.append(rng.randbytes(rng.randint(1, 200)))
    if rng.random() < 0.05:
        parts.append(b"A" * rng.randint(500, 5000) + b"\r\n")
    return b"".join(parts)


def _connect(where: int | str) -> socket.socket:
    if isinstance(where, str):  # the internal listener's Unix socket
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(5)
        sock.connect(where)
        return sock
    return socket.create_connection(("127.0.0.1", where), timeout=5)


def still_answers(port: int | str, hello: bytes) -> None:
    s = Client.connect(port)
    try:
        play(s, [(None, "220 "), (line(hello.decode()), "250 "), (line("NOOP"), "250 "), (line("QUIT"), "221 ")])
    finally:
        s.close()


@pytest.mark.parametrize("key", ["submission", "submissions", "smtp", "internal", "lmtp"])
def test_random_bytes_do_not_hurt_a_listener(stack: Stack, key: str, caplog: pytest.LogCaptureFixture) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    port = stack.address(key)
    for _ in range(40):
        with _connect(port) as sock:
            try:
                sock.sendall(noise(rng))
                sock.settimeout(0.05)
                while sock.recv(65536):
                    pass
            except OSError:  # the server hung up, or has not answered yet: both fine
                pass
    time.sleep(0.1)
    if key == "submissions":
        s = Client.connect(port, tls=True)
        try:
            play(s, [(None, "220 "), (line("EHLO x"), "250 "), (line("QUIT"), "221 ")])
        finally:
            s.close()
    else:
        still_answers(port, b"LHLO x" if key == "lmtp" else b"EHLO x")
    crashes = [r for r in caplog.records if r.levelno >= logging.ERROR and "session failed" in r.getMessage()]
    assert crashes == [], f"seed {seed}: {crashes[0].getMessage()}\n{crashes[0].exc_text}"
