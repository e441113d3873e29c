"""Hops between hosts: LMTP to the store's MDA and the MSA's hand-off to an MTA,
over TLS with certificates from the installation's own CA (common/hop_tls.py).

The MDA and the MTA run in-process exactly as `python -m mda` / `python -m mta`
wire them (`mda.server.run`, `mta.smtpd.run`), with `[cluster]` on and their
hop listeners on TCP.  The CA and the node certificates are made with the
real `mailroom cluster ca` and `mailroom cluster cert`.  A queue manager of
ours (the LMTP courier with our node's certificate) delivers; a client without
a certificate, with one from another CA, or naming a node that is not among
`[cluster] peers`, gets nothing, and the next good one is served as before.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from common import hop_tls
from common.endpoint import Endpoint
from common.log import new_trace_id
from mta import options
from mta.courier import Attempt
from mta.delivery import LocalDelivery
from tests.harness.services import Stack, installation
from tests.support.ports import free_port
from tests.support.suite import PASSWORD, Installation, maildir_messages, wait_port

pytestmark = pytest.mark.timeout(60)

BODY = b"From: carol@example.net\r\nSubject: across hosts\r\n\r\nFrom an MX host to the store.\r\n"


@pytest.fixture
def store(tmp_path: Path) -> Installation:
    """A node called "store" with the cluster on: its CA, its own certificate and those
    of two other nodes, mx1 (a peer) and mx9 (signed by the CA, but not a peer)."""
    inst = installation(tmp_path / "store", mailroom={"node": '"store"'})
    for args in (("ca",), ("cert", "store", "--name", "127.0.0.1"), ("cert", "mx1", "--name", "127.0.0.1"),
                 ("cert", "mx9", "--name", "127.0.0.1")):
        r = inst.cli("cluster", *args)
        assert r.returncode == 0, r.stderr
    inst.set("cluster", "ca", '"cluster/ca.pem"')
    inst.set("cluster", "peers", '["mx1", "mx2", "store"]')
    # A CA that is not ours, with a certificate for a node of the same name as a peer's.
    other = inst.root.parent / "other"
    hop_tls.make_ca(other / "ca.pem", other / "ca.key", "Someone else's CA")
    hop_tls.issue(other / "ca.pem", other / "ca.key", "mx1", ["127.0.0.1"], other / "mx1.pem", other / "mx1.key")
    return inst


def pki(inst: Installation) -> Path:
    return inst.root / "cluster"


def node_context(
    inst: Installation, node: str, *, ca: Path | None = None, cert_dir: Path | None = None,
) -> ssl.SSLContext:
    """What node `node`'s daemons connect with (the CA `ca` to check the server by)."""
    folder = cert_dir or pki(inst)
    return hop_tls.client_context(ca or pki(inst) / "ca.pem", folder / f"{node}.pem", folder / f"{node}.key")


def first_words(port: int, ctx: ssl.SSLContext | None, send: bytes = b"") -> bytes:
    """What the server says to a client (TLS with `ctx`, or plain) before it hangs up; b"" for nothing."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    got = b""
    try:
        if ctx is not None:
            sock = ctx.wrap_socket(sock, server_hostname="127.0.0.1")
        if send:
            sock.sendall(send)
        while b"\r\n" not in got:
            chunk = sock.recv(4096)
            if not chunk:
                break
            got += chunk
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        pass  # the handshake was refused, or the server hung up
    finally:
        sock.close()
    return got


def deliver(stack: Stack, local: LocalDelivery, rcpt: str) -> int:
    attempt = Attempt(new_trace_id(), "carol@example.net", [rcpt], BODY,
                      options.Outbound(options.Asked(), [1]))
    got = stack.run(local.deliver(attempt), timeout=30)
    return got.replies[0].code


@pytest.fixture
def mda(store: Installation) -> Iterator[Stack]:
    from mda.server import run

    stack = Stack(store)
    try:
        stack.start(run)
        wait_port(store.ports["lmtp"], 10)
        yield stack
    finally:
        stack.close()


def test_the_store_takes_lmtp_only_from_our_nodes(store: Installation, mda: Stack) -> None:
    port = store.ports["lmtp"]
    lmtp = Endpoint.parse(f"127.0.0.1:{port}")
    ours = LocalDelivery(lmtp, hostname="mx1.test", sessions=1, timeout=10, tls=node_context(store, "mx1"))
    try:
        assert deliver(mda, ours, "alice@example.org") == 250
        alice = store.mailbox("alice@example.org")
        assert len(maildir_messages(alice)) == 1

        # Everyone else: a plain LMTP client, a TLS client without a certificate, one with a
        # certificate of another CA (for a node of a peer's name), and one of our CA whose node
        # is not a peer.  Only the last gets as far as a greeting, and that greeting ends it.
        assert first_words(port, None, b"LHLO intruder.test\r\n") == b""
        anonymous = ssl.create_default_context(cafile=str(pki(store) / "ca.pem"))
        assert first_words(port, anonymous) == b""
        assert first_words(port, node_context(store, "mx1", cert_dir=store.root.parent / "other")) == b""
        assert first_words(port, node_context(store, "mx9")).startswith(b"421 4.7.0 ")

        # That node's queue manager delivers nothing, and its recipient waits (4xx), never bounces.
        rogue = LocalDelivery(lmtp, hostname="mx9.test", sessions=1, timeout=10, tls=node_context(store, "mx9"))
        try:
            assert deliver(mda, rogue, "alice@example.org") // 100 == 4
        finally:
            mda.run(rogue.close())

        # After the refusals our own node is served as before.
        assert deliver(mda, ours, "alice@example.org") == 250
        assert len(maildir_messages(alice)) == 2
    finally:
        mda.run(ours.close())


def test_a_queue_manager_hands_nothing_to_an_mda_it_cannot_verify(store: Installation, mda: Stack) -> None:
    # Our node's certificate, but the store's is checked against another CA: an impostor
    # store (or a man in the middle) gets no mail, and the recipient is deferred, not lost.
    other = store.root.parent / "other"
    doubting = LocalDelivery(
        Endpoint.parse(f"127.0.0.1:{store.ports['lmtp']}"), hostname="mx1.test", sessions=1, timeout=10,
        tls=node_context(store, "mx1", ca=other / "ca.pem"),
    )
    try:
        code = deliver(mda, doubting, "alice@example.org")
    finally:
        mda.run(doubting.close())
    assert code // 100 == 4
    assert maildir_messages(store.mailbox("alice@example.org")) == []


def test_the_msa_hands_over_to_an_mta_of_another_host_over_tls(store: Installation) -> None:
    from msa.server import run as msa_run
    from mta.smtpd import run as mta_run

    # Another host's MSA reaches the internal listener on TCP (on one host it is a Unix socket): guarded.
    internal = store.ports["internal"] = free_port()
    store.set("mta", "internal", f'"127.0.0.1:{internal}"')
    stack = Stack(store)
    try:
        stack.start(mta_run)
        wait_port(internal, 10)
        wait_port(store.ports["smtp"], 10)
        stack.start(msa_run)
        wait_port(store.ports["submission"], 10)
        body = b"From: alice@example.org\r\nTo: dave@remote.test\r\nSubject: out\r\n\r\nVia the internal hop.\r\n"
        code, reply = store.submit("alice@example.org", ["dave@remote.test"], body, password=PASSWORD)
        assert code == 250, reply
        assert [q.recipients for q in stack.queued()] == [("dave@remote.test",)]

        # The internal listener relays anywhere: without our certificate, nobody even gets a greeting.
        relay = b"EHLO x\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<victim@elsewhere.test>\r\nDATA\r\n"
        assert first_words(internal, None, relay) == b""
        assert first_words(internal, node_context(store, "mx1", cert_dir=store.root.parent / "other")) == b""
        assert first_words(internal, node_context(store, "mx9")).startswith(b"421 4.7.0 ")
        assert len(stack.queued()) == 1

        # And the MSA goes on handing over.
        code, reply = store.submit("alice@example.org", ["dave@remote.test"], body, password=PASSWORD)
        assert code == 250, reply
        assert len(stack.queued()) == 2
    finally:
        stack.close()
