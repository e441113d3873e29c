"""Limits and timeouts: message size with bounded memory, idle and slow clients,
connections per listener and per client address, errors per session.

The limits are made small through the [smtp] section of the config, the way
an administrator would set them.
"""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.client import CLOSED, Client, line, play, run
from tests.harness.openings import LISTENERS, smtp_hello, transaction
from tests.harness.services import Stack, listeners

pytestmark = pytest.mark.timeout(30)

LIMITS = {
    "idle_timeout": 1, "session_timeout": 2.5, "max_message_size": 65536,
    "max_connections": 3, "max_connections_per_client": 2, "max_errors": 3,
}


@pytest.fixture
def small(tmp_path: Path) -> Iterator[Stack]:
    with listeners(tmp_path / "mailroom", smtp=LIMITS) as stack:
        yield stack


@pytest.mark.parametrize("listener", ["msa", "mta", "mda"])
def test_size_limit_with_and_without_size_parameter(small: Stack, listener: str) -> None:
    key, hello, sender, rcpt = LISTENERS[listener]
    big = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 100 + b".\r\n"  # 100 KB > 64 KiB
    run(small.ports[key], [
        *hello(),
        (line(f"MAIL FROM:<{sender}> SIZE=70000"), "552 5.3.4"),  # announced: refused at once
        (line(f"MAIL FROM:<{sender}> SIZE=60000"), "250 2.1.0"),
        (line(f"RCPT TO:<{rcpt}>"), "250 2.1.5"), (line("DATA"), "354 "),
        (big, "552 5.3.4"),  # announced small, sent big
        *transaction(sender, rcpt), (big, "552 5.3.4"),  # not announced
        (line("NOOP"), "250 2.0.0"),  # the session carries on
    ]).close()
    assert small.queued() == [] and small.mailbox(rcpt) == []


def test_an_oversized_message_is_not_held_in_memory(small: Stack) -> None:
    chunk = (b"y" * 998 + b"\r\n") * 1000  # 1 MB
    s = run(small.ports["smtp"], [*smtp_hello(), *transaction("a@remote.example", "alice@example.org")])
    tracemalloc.start()
    try:
        for _ in range(20):  # 20 MB against a 64 KiB limit
            s.sock.sendall(chunk)
        play(s, [(b".\r\n", "552 5.3.4")])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        s.close()
    assert peak < 4 * 1024 * 1024, f"peak {peak} bytes while refusing a 20 MB message"


def test_idle_client_gets_421_and_its_slot_back(small: Stack) -> None:
    port = small.ports["smtp"]
    first = run(port, smtp_hello())
    second = run(port, smtp_hello())
    run(port, [(None, "421 4.7.0"), (None, CLOSED)]).close()  # a third from the same address
    started = time.monotonic()
    for s in (first, second):
        play(s, [(None, "421 4.4.2"), (None, CLOSED)])
        s.close()
    assert time.monotonic() - started < 2.5
    run(port, [*smtp_hello(), (line("QUIT"), "221 ")]).close()  # the slots are free again


def test_byte_at_a_time_client_is_cut_off_at_the_session_deadline(small: Stack) -> None:
    s = run(small.ports["smtp"], smtp_hello())
    started = time.monotonic()
    try:
        # Each NOOP arrives one octet at a time, never idle for a whole second.
        while time.monotonic() - started < 6:
            for b in b"NOOP\r\n":
                try:
                    s.sock.send(bytes([b]))
                except OSError:
                    break
                time.sleep(0.08)
            reply = s.read_reply()
            if reply is None or not reply.startswith("250"):
                break
        assert reply is not None and reply.startswith("421 4.4.2"), "\n".join(s.transcript)
        assert s.read_reply() is None
    finally:
        s.close()
    assert 2.0 < time.monotonic() - started < 4.0


def _from(source: str, port: int) -> Client:
    return Client.connect(port, source=source)


def _wait_until_released(port: int, timeout: float = 10.0) -> None:
    """Wait until the listener has let go of earlier connections (the start-up port probes).

    Their slots are freed when the server notices the hang-up, which on a busy
    machine can come after the test's first connections.
    """
    deadline = time.monotonic() + timeout
    while True:
        probe = _from("127.0.0.1", port)
        greeting = probe.read_reply()
        probe.send(line("QUIT"))
        probe.read_reply()
        probe.close()
        if greeting is not None and greeting.startswith("220 "):
            time.sleep(0.3)  # and let this probe's own slot go
            return
        assert time.monotonic() < deadline, f"listener still full: {greeting}"
        time.sleep(0.1)


def test_connections_per_client_address_and_per_listener(small: Stack) -> None:
    port = small.ports["smtp"]
    _wait_until_released(port)
    a1, a2, b1 = _from("127.0.0.1", port), _from("127.0.0.1", port), _from("127.0.0.2", port)
    try:
        for s in (a1, a2, b1):
            s.expect("220 ")
        a3 = _from("127.0.0.1", port)  # per client: 2
        play(a3, [(None, "421 4.7.0"), (None, CLOSED)])
        c1 = _from("127.0.0.3", port)  # per listener: 3
        play(c1, [(None, "421 4.7.0"), (None, CLOSED)])
        for s in (a3, c1):
            s.close()
        play(b1, [(line("QUIT"), "221 "), (None, CLOSED)])
        b1.close()
        time.sleep(0.2)
        c2 = _from("127.0.0.3", port)  # one slot free again
        play(c2, [(None, "220 "), (line("QUIT"), "221 ")])
        c2.close()
    finally:
        for s in (a1, a2, b1):
            s.close()


@pytest.mark.parametrize("listener", ["msa", "mta", "mda"])
def test_too_many_errors_end_the_session(small: Stack, listener: str) -> None:
    key, hello, _, _ = LISTENERS[listener]
    run(small.ports[key], [
        *hello(),
        (line("BOGUS 1"), "500 5.5.2"), (line("BOGUS 2"), "500 5.5.2"), (line("BOGUS 3"), "500 5.5.2"),
        (line("BOGUS 4"), ["500 5.5.2", "421 4.7.0"]),  # max_errors = 3
        (None, CLOSED),
    ]).close()
