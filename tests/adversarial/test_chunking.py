"""CHUNKING / BDAT (RFC 3030) through the real listeners: a message sent in BDAT chunks
is stored exactly as the same message sent with DATA."""

from __future__ import annotations

import pytest

from tests.harness.client import CLOSED, line, play, run
from tests.harness.openings import LISTENERS, lmtp_hello, msa_login, smtp_hello
from tests.harness.services import Stack

pytestmark = pytest.mark.timeout(30)

MESSAGE = (
    b"From: alice@example.org\r\nSubject: chunks\r\nMessage-ID: <c@x>\r\nDate: Tue, 1 Dec 2026 10:00:00 +0000\r\n"
    b"\r\n.a line that starts with a dot\r\nend\r\n"
)


def _bdat(message: bytes, sizes: list[int]) -> list[tuple[bytes, str]]:
    """The message cut in chunks of `sizes` (the rest in the LAST one)."""
    steps = []
    pos = 0
    for n in sizes:
        steps.append((line(f"BDAT {n}") + message[pos : pos + n], "250 2.0.0"))
        pos += n
    rest = message[pos:]
    return [*steps, (line(f"BDAT {len(rest)} LAST") + rest, "250 2.0.0")]


@pytest.mark.parametrize("listener", ["msa", "mta", "mda"])
def test_chunking_is_advertised_and_a_chunked_message_is_stored_like_data(stack: Stack, listener: str) -> None:
    key, hello, sender, rcpt = LISTENERS[listener]
    s = run(stack.ports[key], hello())
    try:
        assert any(t.startswith("S: 250-CHUNKING") for t in s.transcript), s.transcript
        envelope = [(line(f"MAIL FROM:<{sender}>"), "250 2.1.0"), (line(f"RCPT TO:<{rcpt}>"), "250 2.1.5")]
        play(s, [*envelope, *_bdat(MESSAGE, [10, 7, 30])])
        # The MTA would recognise the same message sent again as a resubmission and queue
        # it once: the DATA copy gets a Message-ID of its own where it is queued.
        again = MESSAGE if listener == "mda" else MESSAGE.replace(b"Message-ID: <c@x>", b"Message-ID: <d@x>")
        play(s, [*envelope, (line("DATA"), "354 "), (again.replace(b"\r\n.", b"\r\n..") + b".\r\n", "250 2.0.0")])
        play(s, [(line("QUIT"), "221 ")])
    finally:
        s.close()
    stored = stack.mailbox(rcpt) if listener == "mda" else [q.body for q in stack.queued()]
    assert len(stored) == 2
    tail = b"\r\n.a line that starts with a dot\r\nend\r\n"
    if listener == "mda":
        tail = tail.replace(b"\r\n", b"\n")  # the MDA stores LF line ends
    assert all(m.endswith(tail) for m in stored), stored
    if listener == "mda":
        assert stored[0] == stored[1]  # byte for byte the same delivery


def test_lmtp_bdat_gives_one_reply_per_recipient(stack: Stack) -> None:
    s = run(stack.ports["lmtp"], [
        *lmtp_hello(), (line("MAIL FROM:<a@remote.example>"), "250 2.1.0"),
        (line("RCPT TO:<alice@example.org>"), "250 2.1.5"), (line("RCPT TO:<bob@example.org>"), "250 2.1.5"),
        (line(f"BDAT {len(MESSAGE)} LAST") + MESSAGE, ["250 2.0.0", "250 2.0.0"]),
    ])
    s.close()
    assert len(stack.mailbox("alice@example.org")) == 1 and len(stack.mailbox("bob@example.org")) == 1


def test_a_chunk_over_the_size_limit_is_552_at_once_and_the_session_ends(stack: Stack) -> None:
    # Its octets are not read (RFC 3030 2 would have them read): a size beyond any
    # message is refused before them, and what follows can no longer be framed.
    big = stack.config.smtp.max_message_size + 1
    run(stack.ports["smtp"], [
        *smtp_hello(), (line("MAIL FROM:<a@remote.example>"), "250 2.1.0"),
        (line("RCPT TO:<alice@example.org>"), "250 2.1.5"),
        (line(f"BDAT {big} LAST"), "552 5.3.4"),
        (None, CLOSED),
    ]).close()
    assert stack.queued() == []


def test_chunks_that_add_up_to_more_than_the_limit_are_read_and_refused_at_last(stack: Stack) -> None:
    limit = stack.config.smtp.max_message_size
    s = run(stack.ports["smtp"], [
        *smtp_hello(), (line("MAIL FROM:<a@remote.example>"), "250 2.1.0"),
        (line("RCPT TO:<alice@example.org>"), "250 2.1.5"),
    ])
    try:
        # Each chunk within the limit, together over it: read (memory bounded) and dropped.
        for size, last in ((limit // 2 + 1, ""), (limit // 2 + 1, " LAST")):
            s.send(line(f"BDAT {size}{last}"))
            left = size
            while left:
                n = min(left, 1 << 20)
                s.sock.sendall(b"x" * n)
                left -= n
        s.expect(["250 2.0.0", "552 5.3.4"])
        # The session stayed in step.
        play(s, [(line("NOOP"), "250 2.0.0")])
    finally:
        s.close()
    assert stack.queued() == []


def test_the_msa_takes_bdat_only_after_auth(stack: Stack) -> None:
    run(stack.ports["submission"], [
        *msa_login(), (line("MAIL FROM:<alice@example.org>"), "250 2.1.0"),
        (line("RCPT TO:<bob@example.org>"), "250 2.1.5"),
        (line(f"BDAT {len(MESSAGE)} LAST") + MESSAGE, "250 2.0.0"),
    ]).close()
    (queued,) = stack.queued()
    assert queued.recipients == ("bob@example.org",)
