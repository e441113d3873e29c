"""Admission: the per-client cap counts an IPv6 client by its /64, and stress mode shortens
the timeouts near the listener's cap (common/smtp/admission.py).

With the caps counting exact addresses, one IPv6 host (2^64 addresses of its own)
could fill a listener alone, and 20 addresses x 50 connections filled it with the
default caps.  The /64 counting is tested on the function, on the admission
logic, and on a real listener in a network namespace of the test's own (loopback
gives one /64 only: ::1).  Stress mode is tested with real connections.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common import counters
from common import reply as R
from common.reply import Reply
from common.smtp import Handler, Limits, MailEnvelope, MailSession
from common.smtp.admission import Connections, client_key
from tests.harness.client import CLOSED, Client, play
from tests.harness.services import Stack

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]


class Sink(Handler):
    async def data(self, session: MailSession, envelope: MailEnvelope) -> Reply:
        return R.OK


class Member:
    """A stand-in session for the admission logic alone."""

    def __init__(self, unproven: bool = False) -> None:
        self.unproven = unproven
        self.evicted = False
        self.stress_calls = 0

    def evict(self) -> None:
        self.evicted = True

    def under_stress(self) -> None:
        self.stress_calls += 1


# --- counting by /64 ---------------------------------------------------------------------


def test_an_ipv6_client_is_counted_by_its_64() -> None:
    assert client_key("2001:db8:1:2:aaaa:bbbb:cccc:dddd") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:2::1") == client_key("2001:db8:1:2:ffff:ffff:ffff:ffff")
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("fe80::1%eth0") == "fe80::/64"
    assert client_key("192.0.2.7") == "192.0.2.7"  # IPv4: the address itself
    assert client_key("local") == "local"  # a Unix socket


def test_admission_counts_one_64_as_one_client() -> None:
    limits = Limits(max_connections=100, max_connections_per_client=2)
    c = Connections()
    first, second = Member(), Member()
    assert c.admit(first, "2001:db8:1:2::1", limits, "test")
    assert c.admit(second, "2001:db8:1:2::2", limits, "test")
    assert not c.admit(Member(), "2001:db8:1:2:ffff::3", limits, "test")  # the same /64: full
    assert c.admit(Member(), "2001:db8:1:3::1", limits, "test")  # another /64
    c.release(first, limits, "test")
    assert c.admit(Member(), "2001:db8:1:2::99", limits, "test")  # a slot of that /64 is free again
    assert c.per_client == {"2001:db8:1:2::/64": 2, "2001:db8:1:3::/64": 1}


NETNS_SCRIPT = textwrap.dedent("""
    import asyncio, json, socket
    from common import reply as R
    from common.smtp import Handler, Limits, serve

    async def main():
        server = await serve("[::]:0", Handler, hostname="v6.test",
                             limits=Limits(max_connections=100, max_connections_per_client=2))
        port = server.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()

        def greet(source):
            s = socket.socket(socket.AF_INET6)
            s.settimeout(5)
            s.bind((source, 0))
            s.connect(("2001:db8:1:2::10", port))
            return s, s.recv(200).decode().split(" ", 2)[:2]

        out, held = {}, []
        for source in ("2001:db8:1:2::10", "2001:db8:1:2::11", "2001:db8:1:2::12", "2001:db8:1:3::10"):
            s, reply = await loop.run_in_executor(None, greet, source)
            held.append(s)
            out[source] = reply
        print(json.dumps(out))
        for s in held:
            s.close()
        server.close()

    asyncio.run(main())
""")


def test_a_real_listener_counts_ipv6_clients_by_64_in_a_network_namespace() -> None:
    # A network namespace of the test's own, with three addresses of two /64s on its loopback.
    addresses = ("2001:db8:1:2::10", "2001:db8:1:2::11", "2001:db8:1:2::12", "2001:db8:1:3::10")
    setup = "ip link set lo up && " + " && ".join(f"ip addr add {a}/128 dev lo nodad" for a in addresses)
    r = subprocess.run(
        ["unshare", "--net", "sh", "-c", f'{setup} && exec "$0" -c "$1"', sys.executable, NETNS_SCRIPT],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got == {
        "2001:db8:1:2::10": ["220", "v6.test"],
        "2001:db8:1:2::11": ["220", "v6.test"],
        "2001:db8:1:2::12": ["421", "4.7.0"],  # a third connection from the same /64
        "2001:db8:1:3::10": ["220", "v6.test"],  # another /64 is another client
    }


# --- making an unproven session give way -------------------------------------------------


def test_a_full_listener_makes_the_oldest_unproven_session_give_way() -> None:
    limits = Limits(max_connections=3, max_connections_per_client=3, stress_threshold=0)
    c = Connections()
    proven, old, young = Member(), Member(unproven=True), Member(unproven=True)
    for m in (proven, old, young):
        assert c.admit(m, "127.0.0.1", limits, "test")
    newcomer = Member()
    assert c.admit(newcomer, "127.0.0.1", limits, "test")
    assert old.evicted and not young.evicted and not proven.evicted
    assert list(c.members) == [proven, young, newcomer] and c.total == 3
    # Only proven sessions left to give way: full is full.
    c.release(young, limits, "test")
    assert c.admit(Member(), "127.0.0.1", limits, "test")
    assert not c.admit(Member(), "127.0.0.1", limits, "test")


# --- stress mode -------------------------------------------------------------------------------


@pytest.fixture
def stack() -> Iterator[Stack]:
    s = Stack()
    try:
        yield s
    finally:
        s.close()


def idle(port: int, n: int) -> list[Client]:
    clients = []
    for _ in range(n):
        c = Client.session(port, timeout=10)
        assert c.greeting.code == 220, c.greeting
        clients.append(c)
    return clients


def test_stress_mode_shortens_the_idle_timeout_near_the_cap_and_says_so(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="smtp")
    limits = Limits(max_connections=10, max_connections_per_client=10, idle_timeout=30, stress_threshold=50,
                    stress_timeout=1.0)
    port = stack.listen(Sink, limits=limits)
    listener = f"127.0.0.1:{port}"
    before = counters.COUNTERS.value(counters.STRESS, listener=listener)
    calm = idle(port, 4)  # under 5 (50 % of 10): no stress, the 30 s idle timeout holds
    assert all(c.quiet(1.5) for c in calm)
    assert not any("stress:" in r.getMessage() for r in caplog.records)
    started = time.monotonic()
    pressing = idle(port, 1)  # the fifth: stress begins, for the open sessions too
    for c in calm + pressing:  # all told before any leaves: leaving ends the stress
        play(c, [(None, "421 4.4.2"), (None, CLOSED)])
    for c in calm + pressing:
        c.close()
    took = time.monotonic() - started
    assert took < 5.0, f"idle sessions were let go after {took:.1f} s under stress"
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith(f"stress: 5 of 10 connections on {listener}: idle and TLS handshake timeouts now 1s")
               for m in messages), messages
    deadline = time.monotonic() + 5
    while not any(m.startswith("stress over:") for m in messages) and time.monotonic() < deadline:
        time.sleep(0.05)
        messages = [r.getMessage() for r in caplog.records]
    # Over under three quarters of the mark (5): at 2 connections left.
    assert any(m.startswith(f"stress over: 2 of 10 connections on {listener}") for m in messages), messages
    assert counters.COUNTERS.value(counters.STRESS, listener=listener) == before + 1
    # Calm again: a silent client keeps its slot past the stress timeout.
    (after,) = idle(port, 1)
    try:
        assert after.quiet(2.0)
    finally:
        after.close()


def test_the_tls_handshake_timeout_shrinks_under_stress_too(stack: Stack, tmp_path: Path) -> None:
    from common.tls import make_self_signed, server_context

    folder = tmp_path
    make_self_signed(folder / "cert.pem", folder / "key.pem", "stress.test")
    ctx = server_context(folder / "cert.pem", folder / "key.pem")
    limits = Limits(max_connections=4, max_connections_per_client=4, idle_timeout=30, tls_handshake_timeout=30,
                    stress_threshold=50, stress_timeout=1.0)
    port = stack.listen(Sink, limits=limits, tls_context=ctx, implicit_tls=True)
    # A client that finished TLS and is silent, then one that never starts TLS: the second
    # puts the listener under stress, and both are let go after the stress timeout.
    tls_idle = Client.session(port, tls=True, timeout=10)
    assert tls_idle.greeting.code == 220
    started = time.monotonic()
    silent = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        assert silent.recv(100) == b""  # its handshake timed out: closed without a word
        play(tls_idle, [(None, "421 4.4.2"), (None, CLOSED)])
    finally:
        silent.close()
        tls_idle.close()
    assert time.monotonic() - started < 5.0


def test_stress_is_counted_on_the_listener_and_sessions_follow_it(stack: Stack) -> None:
    # The admission logic alone: members hear of both moments, and the mark has hysteresis.
    limits = Limits(max_connections=8, max_connections_per_client=8, stress_threshold=50)
    c = Connections()
    members = [Member() for _ in range(4)]
    for m in members[:3]:
        c.admit(m, "127.0.0.1", limits, "x")
    assert not c.stressed
    c.admit(members[3], "127.0.0.1", limits, "x")  # 4 of 8: 50 %
    assert c.stressed and all(m.stress_calls == 1 for m in members)
    c.release(members[3], limits, "x")  # 3: not under three quarters of 4 yet
    assert c.stressed
    c.release(members[2], limits, "x")  # 2: over
    assert not c.stressed and members[0].stress_calls == 2
