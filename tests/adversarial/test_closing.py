"""After a reply that closes the session, nothing the client already sent is executed.

The attack: a client sends, in ONE write, a message with a bare LF (or enough
bad commands to be thrown out) followed by a complete second transaction.  The
listener reads it all at once; after its 521 (or 421) it must drop the rest,
not queue or deliver the second message.  Over TLS the whole batch arrives in
one TLS record, which is where a session that only "closes the transport" kept
executing what it had already buffered.

Every listener is tried: the MSA's 587 (after STARTTLS) and 465 (implicit
TLS), the MTA's public listener (plain and after STARTTLS), the MTA's internal
listener and the MDA (LMTP); each with a client that stays silent after the
refusal and with one that hangs up at once.  Also here: the recipient limit
is not an error (150 pipelined RCPTs deliver to 100), HELO names with control
characters, and a failed TLS handshake as one log line.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator

import pytest

from common.log import trace_id
from tests.harness.client import CLOSED, STARTTLS_HANDSHAKE, Client, Step, line, play, run
from tests.harness.openings import auth_plain, lmtp_hello, msa_login, smtp_hello
from tests.harness.services import Since, Stack, listeners
from tests.harness.users import add_users

pytestmark = pytest.mark.timeout(60)

# The 150 pipelined recipients, users of the shared installation.
USERS = [f"user{i:03}@example.org" for i in range(150)]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One installation's listeners for the whole module: making an installation and
    starting its four listeners cost more than most of these tests, and none of them
    changes a listener (each test sees only what arrived since it began, `Since`)."""
    with listeners(tmp_path_factory.mktemp("closing") / "mailroom") as stack:
        add_users(stack.inst, *USERS)
        yield stack


@pytest.fixture
def stack(shared: Stack) -> Since:
    return Since(shared)


def _starttls_hello() -> list[Step]:
    return [
        (None, "220 "), (line("EHLO client.example"), "250 "),
        (line("STARTTLS"), "220 "), (STARTTLS_HANDSHAKE, None), (line("EHLO client.example"), "250 "),
    ]


def _implicit_login() -> list[Step]:
    return [(None, "220 "), (line("EHLO client.example"), "250 "), (auth_plain("alice@example.org"), "235 2.7.0")]


# name: (port key, implicit TLS, opening, sender, recipient of the smuggled message)
LISTENERS = {
    "587-starttls": ("submission", False, msa_login, "alice@example.org", "bob@example.org"),
    "465-tls": ("submissions", True, _implicit_login, "alice@example.org", "bob@example.org"),
    "public-plain": ("smtp", False, smtp_hello, "someone@remote.example", "bob@example.org"),
    "public-starttls": ("smtp", False, _starttls_hello, "someone@remote.example", "bob@example.org"),
    "internal-plain": ("internal", False, smtp_hello, "alice@example.org", "bob@example.org"),
    "lmtp-plain": ("lmtp", False, lmtp_hello, "someone@remote.example", "bob@example.org"),
}


def _transaction(sender: str, rcpt: str, subject: str) -> bytes:
    return (
        line(f"MAIL FROM:<{sender}>") + line(f"RCPT TO:<{rcpt}>") + line("DATA")
        + f"Subject: {subject}\r\n\r\nThis must never be stored.\r\n.\r\n".encode()
    )


def _nothing_stored(stack: Since) -> None:
    time.sleep(1.0)  # what the listener would still execute, it executes within this
    assert stack.queued() == []
    assert stack.mailbox("alice@example.org") == [] and stack.mailbox("bob@example.org") == []


def _open(stack: Since, name: str) -> tuple[Client, str, str]:
    key, implicit, opening, sender, rcpt = LISTENERS[name]
    return run(stack.address(key), opening(), tls=implicit), sender, rcpt


def _hang_up_and_wait(s: Client, stack: Since) -> None:
    """The client closes at once; give the listener time to do whatever it would do."""
    s.close()
    time.sleep(0.5)


@pytest.mark.parametrize("client", ["silent", "closes"])
@pytest.mark.parametrize("name", list(LISTENERS))
def test_nothing_after_a_bare_lf_is_executed(stack: Since, name: str, client: str) -> None:
    s, sender, rcpt = _open(stack, name)
    try:
        first = (
            line(f"MAIL FROM:<{sender}>") + line(f"RCPT TO:<{rcpt}>") + line("DATA")
        )
        # The first message has a bare LF; the second transaction follows in the same write.
        batch = first + b"Subject: first\r\n\r\nhello\n" + _transaction(sender, rcpt, "second")
        s.send(batch)
        if client == "silent":
            s.expect(["250 2.1.0", "250 2.1.5", "354 ", "521 5.5.2"])
            s.expect(CLOSED)
            _nothing_stored(stack)  # while the client still holds its end open
        else:
            _hang_up_and_wait(s, stack)
            _nothing_stored(stack)
    finally:
        s.close()


def _nothing_smuggled(stack: Since) -> None:
    time.sleep(1.0)  # what the listener would still execute, it executes within this
    stored = [q.body for q in stack.queued()] + stack.mailbox("alice@example.org") + stack.mailbox("bob@example.org")
    assert not [m for m in stored if b"must never be stored" in m]


@pytest.mark.parametrize("client", ["silent", "closes"])
@pytest.mark.parametrize("name", list(LISTENERS))
def test_nothing_after_too_many_errors_is_executed(stack: Since, name: str, client: str) -> None:
    s, sender, rcpt = _open(stack, name)
    errors = stack.config.smtp.max_errors
    good = (
        line(f"MAIL FROM:<{sender}>") + line(f"RCPT TO:<{rcpt}>") + line("DATA")
        + b"Subject: fine\r\n\r\nThis one is welcome.\r\n.\r\n"
    )
    try:
        # Errors up to the limit, a good message, the error too many, then a smuggled one.
        s.send(line("BOGUS") * errors + good + line("BOGUS") + _transaction(sender, rcpt, "after the 421"))
        if client == "silent":
            s.expect(["500 5.5.2"] * errors + ["250 2.1.0", "250 2.1.5", "354 ", "250 2.0.0", "500 5.5.2", "421 4.7.0"])
            s.expect(CLOSED)
            _nothing_smuggled(stack)  # while the client still holds its end open
        else:
            _hang_up_and_wait(s, stack)
            _nothing_smuggled(stack)
    finally:
        s.close()


@pytest.mark.parametrize("name", ["587-starttls", "public-plain", "lmtp-plain"])
def test_150_pipelined_recipients_deliver_to_the_first_100(stack: Since, name: str) -> None:
    users = USERS
    stack.watch(*users)
    s, sender, _ = _open(stack, name)
    lmtp = name.startswith("lmtp")
    try:
        batch = line(f"MAIL FROM:<{sender}>") + b"".join(line(f"RCPT TO:<{u}>") for u in users) + line("DATA")
        s.send(batch)
        s.expect(["250 2.1.0"] + ["250 2.1.5"] * 100 + ["452 4.5.3"] * 50 + ["354 "])
        play(s, [(b"Subject: many\r\n\r\nhi\r\n.\r\n", ["250 2.0.0"] * (100 if lmtp else 1)),
                 (line("QUIT"), "221 ")])
    finally:
        s.close()
    if lmtp:
        assert [u for u in users if stack.mailbox(u)] == users[:100]
    else:
        (queued,) = stack.queued()
        assert list(queued.recipients) == users[:100]


@pytest.mark.parametrize(
    "bad", [b"\x00", b"\x1b[31m", b"\x07", b"\x7f", b"\t"], ids=["NUL", "ESC", "BEL", "DEL", "TAB"]
)
@pytest.mark.parametrize("key", ["submission", "submissions", "smtp", "internal", "lmtp"])
def test_hello_names_with_control_characters_get_501(stack: Since, key: str, bad: bytes) -> None:
    verbs = ["LHLO"] if key == "lmtp" else ["HELO", "EHLO"]
    s = run(stack.address(key), [(None, "220 ")], tls=key == "submissions")
    try:
        for verb in verbs:
            play(s, [(verb.encode() + b" evil" + bad + b".example\r\n", "501 5.5.4")])
        # A clean name is still welcome, and the session goes on.
        play(s, [(line(f"{verbs[-1]} client.example"), "250 "), (line("NOOP"), "250 2.0.0")])
    finally:
        s.close()


# --- a failed TLS handshake -----------------------------------------------------------


class _Records(logging.Handler):
    """Every log record, with the trace id in force where it was logged."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[tuple[logging.LogRecord, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record, trace_id.get()))


@pytest.fixture
def records() -> Iterator[_Records]:
    h = _Records()
    root = logging.getLogger()
    old = root.level
    root.addHandler(h)
    root.setLevel(logging.INFO)
    try:
        yield h
    finally:
        root.removeHandler(h)
        root.setLevel(old)


def _garbage_handshake(port: int, starttls: bool) -> None:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        s = Client(sock)
        if starttls:
            play(s, [(None, "220 "), (line("EHLO client.example"), "250 "), (line("STARTTLS"), "220 ")])
        else:
            sock.settimeout(10)
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n" + b"\x16\x03\x01\x00\x05hello" * 4)
        # The listener gives up on the handshake and hangs up.
        while True:
            try:
                if not sock.recv(65536):
                    break
            except OSError:
                break
    finally:
        sock.close()


@pytest.mark.parametrize("key", ["submission", "submissions", "smtp"])
def test_a_failed_tls_handshake_is_one_log_line(stack: Since, key: str, records: _Records) -> None:
    # A delivery first, so a trace id was in force on this listener's loop.
    run(stack.ports["smtp"], [
        *smtp_hello(), (_transaction("a@remote.example", "alice@example.org", "first"),
                        ["250 2.1.0", "250 2.1.5", "354 ", "250 2.0.0"]),
    ]).close()
    records.records.clear()
    _garbage_handshake(stack.ports[key], starttls=key != "submissions")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any("TLS handshake" in r.getMessage() for r, _ in records.records):
        time.sleep(0.05)
    time.sleep(0.3)  # and whatever else would be logged about it
    about = [(r, t) for r, t in records.records if "handshake" in r.getMessage().lower() or r.exc_info]
    assert len(about) == 1, [r.getMessage() for r, _ in about]
    record, trace = about[0]
    assert "127.0.0.1" in record.getMessage() and record.exc_info is None
    assert trace == "-", f"logged under an unrelated trace id {trace}"
    assert not [r for r, _ in records.records if r.levelno >= logging.ERROR]
    # The listener is fine afterwards.
    opening = _implicit_login() if key == "submissions" else _starttls_hello()
    run(stack.ports[key], [*opening, (line("QUIT"), "221 ")], tls=key == "submissions").close()
