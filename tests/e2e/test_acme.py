"""Certificates from pebble (a real ACME server) with `mailroom cert`, served by every listener at once.

One running suite and one pebble for the module: HTTP-01 is validated by
pebble connecting to the web program's `[web] http` listener, the names
resolved by a real DNS server that maps them to 127.0.0.1.  Each test checks
what a client sees on the wire: the certificate the MTA (25 role, STARTTLS),
the MSA (587 and 465), the web program (443 role) and Dovecot (993 role)
hand a new connection, verified against pebble's root for the host name.
"""

from __future__ import annotations

import pwd
import re
import socket
import ssl
import stat
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from prometheus_client.parser import text_string_to_metric_families

from cli import cert
from common.tls import key_type_of, read_certificate, tlsa_3_1_1
from tests.support.acme_faults import Fault, FaultyACME
from tests.support.dns_server import DNSServer
from tests.support.pebble import Pebble, wait_until
from tests.support.ports import free_port
from tests.support.suite import Installation
from tests.support.tls_probe import STARTTLS, fingerprint, names, served, verified

pytestmark = [pytest.mark.interop, pytest.mark.timeout(240)]

NAMES = ["mail.test", "mta-sts.example.org", "autoconfig.example.org"]
PROGRAMS = ("mta", "msa", "web", "qmgr", "mda", "imap", "renew")


def https_get(port: int, host: str, path: str, roots: bytes) -> tuple[int, bytes]:
    """GET over TLS verified for `host` (SNI and Host: `host`), connecting to 127.0.0.1:port."""
    ctx = ssl.create_default_context(cadata=roots.decode())
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=host) as tls:
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


class Stack:
    def __init__(self, inst: Installation, pebble: Pebble, dns: DNSServer, https: int) -> None:
        self.inst, self.pebble, self.dns, self.https = inst, pebble, dns, https
        self.roots = pebble.roots()

    def pids(self) -> dict[str, int]:
        return {p: self.inst.program_pid(p) for p in PROGRAMS}

    def fingerprint(self) -> str:
        return read_certificate(self.inst.root / "tls" / "cert.pem").fingerprint

    def mta_serves(self, print_: str) -> bool:
        return fingerprint(served(self.inst.ports["smtp"], STARTTLS)) == print_


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    inst = Installation(tmp_path_factory.mktemp("acme") / "mailroom")
    http, https = free_port(), free_port()
    with DNSServer({n: {"A": ["127.0.0.1"]} for n in NAMES}) as dns, Pebble(http_port=http, dns=dns.address) as pebble:
        inst.set("web", "http", f'"127.0.0.1:{http}"')
        inst.set("web", "https", f'"127.0.0.1:{https}"')
        inst.set("acme", "directory", f'"{pebble.directory}"')
        inst.set("acme", "directory_ca_file", f'"{pebble.ca_file}"')
        inst.start()
        try:
            yield Stack(inst, pebble, dns, https)
        finally:
            inst.stop()


def test_a_certificate_from_pebble_is_served_by_every_listener_without_a_restart(stack: Stack) -> None:
    inst = stack.inst
    pids = stack.pids()
    old = stack.fingerprint()
    assert stack.mta_serves(old)

    started = time.monotonic()
    r = inst.cli("cert", "request")
    command = time.monotonic() - started
    assert r.returncode == 0, r.stdout + r.stderr + stack.pebble.log()[-2000:]
    new = stack.fingerprint()
    assert new != old
    wait_until(lambda: stack.mta_serves(new), 30, "the MTA to serve the new certificate")
    # The figure: from the command to the MTA's next handshake with the new certificate.
    print(f"\nmailroom cert request against pebble -> the MTA serving the new certificate: "
          f"{time.monotonic() - started:.2f}s (the command itself {command:.2f}s)")
    assert "issued in" in r.stdout and "mta: signalled" in r.stdout

    ports = inst.ports
    leaf = verified(ports["smtp"], "mail.test", stack.roots, STARTTLS)  # a verifying sender accepts it
    assert sorted(names(leaf)) == sorted(NAMES)
    assert fingerprint(verified(ports["submission"], "mail.test", stack.roots, STARTTLS)) == new
    assert fingerprint(verified(ports["submissions"], "mail.test", stack.roots)) == new
    assert fingerprint(verified(stack.https, "mta-sts.example.org", stack.roots)) == new
    # Dovecot reads the files again on its reload (a new login process serves the next connection).
    wait_until(lambda: fingerprint(served(ports["imaps"])) == new, 20, "Dovecot to serve the new certificate")
    assert stack.pids() == pids  # nothing restarted

    # The policy, over HTTPS verified for the name the certificate now carries.
    status, body = https_get(stack.https, "mta-sts.example.org", "/.well-known/mta-sts.txt", stack.roots)
    assert status == 200
    assert body == b"version: STSv1\r\nmode: testing\r\nmx: mail.test\r\nmax_age: 604800\r\n"


def test_keys_are_owner_only_and_the_expiry_is_shown(stack: Stack) -> None:
    inst = stack.inst
    if not (inst.root / "acme" / "issued.json").exists():
        assert inst.cli("cert", "request").returncode == 0
    user = pwd.getpwnam(inst.config.mailroom.user)
    acme = inst.root / "acme"
    for path in (inst.root / "tls" / "key.pem", acme / "account.key", acme / "next-key.pem"):
        st = path.stat()
        assert stat.S_IMODE(st.st_mode) == 0o600, path
        assert (st.st_uid, st.st_gid) == (user.pw_uid, user.pw_gid), path
    info = read_certificate(inst.root / "tls" / "cert.pem")
    status = inst.cli("status").stdout
    assert f"certificate mail.test expires {info.not_after:%Y-%m-%d %H:%M} UTC" in status, status
    detail = inst.cli("cert", "status").stdout
    assert "(ACME)" in detail and f"TLSA:    {info.tlsa} (current key)" in detail, detail
    with urllib.request.urlopen(f"http://127.0.0.1:{inst.ports['listen']}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    [family] = [f for f in text_string_to_metric_families(text)
                if f.name == "mailroom_certificate_expiry_timestamp_seconds"]
    [sample] = family.samples
    assert sample.value == info.not_after.timestamp() and sample.labels["name"] == "mail.test"


def test_renewal_keeps_the_key_and_new_key_moves_to_the_published_next_one(stack: Stack) -> None:
    inst = stack.inst
    if not (inst.root / "acme" / "issued.json").exists():
        assert inst.cli("cert", "request").returncode == 0
    key_file = inst.root / "tls" / "key.pem"
    tlsa = tlsa_3_1_1(key_file.read_bytes())
    r = inst.cli("cert", "renew")
    assert r.returncode == 0 and "not due" in r.stdout, r.stdout  # a young certificate is left alone
    before = stack.fingerprint()

    r = inst.cli("cert", "renew", "--force")
    assert r.returncode == 0, r.stdout + r.stderr
    renewed = stack.fingerprint()
    assert renewed != before
    assert tlsa_3_1_1(key_file.read_bytes()) == tlsa  # the same key: the TLSA record stays true
    wait_until(lambda: stack.mta_serves(renewed), 30, "the renewed certificate")
    assert read_certificate(inst.root / "tls" / "cert.pem").tlsa == tlsa

    published = inst.cli("dns", "example.org").stdout
    lines = re.findall(r"(?m)^_25\._tcp\.mail\.test\. IN TLSA (3 1 1 [0-9a-f]{64})$", published)
    nxt = tlsa_3_1_1((inst.root / "acme" / "next-key.pem").read_bytes())
    assert lines == [tlsa, nxt], published  # the current key and the next, both to publish

    r = inst.cli("cert", "renew", "--new-key")
    assert r.returncode == 0, r.stdout + r.stderr
    assert tlsa_3_1_1(key_file.read_bytes()) == nxt  # the key published beforehand
    after = tlsa_3_1_1((inst.root / "acme" / "next-key.pem").read_bytes())
    assert after not in (tlsa, nxt)  # and a new next key to publish
    rolled = stack.fingerprint()
    wait_until(lambda: stack.mta_serves(rolled), 30, "the certificate with the next key")
    assert re.findall(r"(?m)^_25\._tcp\.mail\.test\. IN TLSA (3 1 1 [0-9a-f]{64})$",
                      inst.cli("dns", "example.org").stdout) == [nxt, after]


@pytest.mark.parametrize(("fault", "said"), [
    (Fault("/order-plz", 429, problem="rateLimited", retry_after="120", detail="too many certificates"),
     "rate limited by the ACME server (rateLimited): too many certificates; it asks us to wait 120 s"),
    (Fault("/order-plz", 500, problem="serverInternal", detail="database on fire"),
     "the ACME server refused (serverInternal): database on fire"),
    (Fault("/dir", 503, retry_after="30"),
     "the ACME server failed: HTTP 503 Service Unavailable at https://127.0.0.1:"),
], ids=["429", "500", "503-html"])
def test_an_acme_server_error_is_one_clear_line_and_the_certificate_stays(
    stack: Stack, fault: Fault, said: str
) -> None:
    inst = stack.inst
    before = stack.fingerprint()
    with FaultyACME(stack.pebble, [fault]) as front:
        inst.set("acme", "directory", f'"{front.directory}"')
        try:
            r = inst.cli("cert", "request")
        finally:
            inst.set("acme", "directory", f'"{stack.pebble.directory}"')
        assert any(s.faulty for s in front.requests)
    assert r.returncode == 1
    assert said in r.stderr, r.stderr
    assert "the certificate in" in r.stderr and "is unchanged" in r.stderr
    assert "Traceback" not in r.stderr
    assert stack.fingerprint() == before
    assert stack.mta_serves(before)
    last = cert.last_attempt(cert.Files.of(inst.config))
    assert last["ok"] is False and said in str(last["error"])
    # And the next request, the server well again, gets one.
    r = inst.cli("cert", "request")
    assert r.returncode == 0, r.stderr


def test_a_name_the_acme_server_cannot_validate_is_named(stack: Stack) -> None:
    inst = stack.inst
    before = stack.fingerprint()
    # The command writes its answers where the web program (not reloaded) does not look.
    inst.set("acme", "dir", '"acme-elsewhere"')
    try:
        r = inst.cli("cert", "request")
    finally:
        inst.set("acme", "dir", '"acme"')
    assert r.returncode == 1
    assert re.search(r"the ACME server could not validate .*mail\.test: [^;]*returned 404", r.stderr), r.stderr
    assert "is [web] http reachable on port 80 of every name?" in r.stderr
    assert stack.fingerprint() == before and stack.mta_serves(before)
    assert not list((inst.root / "acme-elsewhere" / "challenges").iterdir())  # answers removed


def test_an_rsa_key_type_gets_a_certificate_with_an_rsa_key(stack: Stack) -> None:
    inst = stack.inst
    inst.set("acme", "key_type", '"rsa-2048"')
    try:
        r = inst.cli("cert", "renew")  # the key is no longer of the configured type: due now
        assert r.returncode == 0, r.stdout + r.stderr
        assert "issued in" in r.stdout and "new key:" in r.stdout
        assert key_type_of((inst.root / "tls" / "key.pem").read_bytes()) == "rsa-2048"
        assert key_type_of((inst.root / "acme" / "next-key.pem").read_bytes()) == "rsa-2048"
        new = stack.fingerprint()
        wait_until(lambda: stack.mta_serves(new), 30, "the certificate with an RSA key")
        leaf = verified(inst.ports["smtp"], "mail.test", stack.roots, STARTTLS)
        assert isinstance(leaf.public_key(), rsa.RSAPublicKey) and leaf.public_key().key_size == 2048
    finally:
        inst.set("acme", "key_type", '"ecdsa-p256"')


def test_request_refuses_without_a_directory(tmp_path: Path) -> None:
    inst = Installation(tmp_path / "m")
    before = (inst.root / "tls" / "cert.pem").read_bytes()
    r = inst.cli("cert", "request")
    assert r.returncode == 1 and "[acme] directory is empty" in r.stderr
    assert "(self-signed)" in inst.cli("cert", "status").stdout
    assert (inst.root / "tls" / "cert.pem").read_bytes() == before
