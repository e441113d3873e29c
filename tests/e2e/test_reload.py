"""`mailroom reload` (SIGHUP) on the running suite: a new certificate for new connections, no restart.

Under smtp-source's load (20 sessions, a new connection per message) and
TLS clients on the MTA (STARTTLS), the MSA (465, AUTH) and a session left
open across all of them, ten reloads one second apart, each with a new
certificate: nothing refused, nothing dropped, every message queued, each
daemon's pid the same, new connections served the newest certificate and the
open session finishing on the one it began with.  Then the same reload
picks up a DKIM selector, names what waits for a restart, and a key that does
not load changes nothing.
"""

from __future__ import annotations

import contextlib
import os
import re
import smtplib
import threading
import time
from collections import Counter
from pathlib import Path

import dkim as dkimpy
import pytest
from cryptography import x509
from sqlalchemy import func, select

from common.models import Message
from common.tls import make_self_signed, read_certificate
from mta.auth import dkim
from tests.support.pebble import wait_until
from tests.support.ports import free_port
from tests.support.postfix import smtp_source
from tests.support.suite import PASSWORD, Installation, tls_client_context
from tests.support.suite import running as _running
from tests.support.tls_probe import IMPLICIT, STARTTLS, fingerprint, served

pytestmark = [pytest.mark.interop, pytest.mark.timeout(300)]

PROGRAMS = ("mta", "msa", "web", "qmgr", "mda", "imap")
running = contextlib.contextmanager(_running)  # the suite started, and stopped at the end of the block
SOURCE = "source@source.test"


def _reloads(inst: Installation) -> dict[str, int]:
    """How many reloads each TLS program has logged (the certificate loaded or refused; the web
    program's one line, whether or not its HTTPS listener is on)."""
    text = inst.log_text()
    done = {p: len(re.findall(rf"(?m) {p}\[\d+\] .*reload: (certificate|cannot load)", text)) for p in ("mta", "msa")}
    done["web"] = len(re.findall(r"(?m) web\[\d+\] .*reloaded \(MTA-STS policy id", text))
    return done


def _reload(inst: Installation) -> None:
    """`mailroom reload`, and wait until the MTA, the MSA and the web program have handled it."""
    before = _reloads(inst)
    r = inst.cli("reload")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "mta: signalled" in r.stdout and "msa: signalled" in r.stdout and "web: signalled" in r.stdout
    wait_until(lambda: all(n > before[p] for p, n in _reloads(inst).items()), 20, "the daemons to reload")


class TLSClients:
    """Threads that each send message after message over TLS, noting the certificate each new
    connection was served and every failure (an exception, or a reply that is not 250)."""

    def __init__(self, inst: Installation) -> None:
        self.inst = inst
        self.stop = threading.Event()
        self.seen: Counter[str] = Counter()
        self.sent = 0
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._loop, args=(kind,), daemon=True)
                        for kind in ("mta", "msa", "mta", "msa")]

    def __enter__(self) -> TLSClients:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def _loop(self, kind: str) -> None:
        while not self.stop.is_set():
            try:
                print_, code = self._one(kind)
            except Exception as exc:  # noqa: BLE001 - every failure is counted and shown
                with self.lock:
                    self.failures.append(f"{kind}: {exc!r}")
                continue
            with self.lock:
                self.seen[print_] += 1
                self.sent += 1
                if code != 250:
                    self.failures.append(f"{kind}: {code}")

    def _one(self, kind: str) -> tuple[str, int]:
        inst = self.inst
        client: smtplib.SMTP
        if kind == "mta":
            client = smtplib.SMTP("127.0.0.1", inst.ports["smtp"], timeout=60)
            client.starttls(context=tls_client_context())
            sender = "tls@outside.test"
        else:
            client = smtplib.SMTP_SSL("127.0.0.1", inst.ports["submissions"], timeout=60,
                                      context=tls_client_context())
            client.login("alice@example.org", PASSWORD)
            sender = "alice@example.org"
        with client:
            der = client.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
            assert der is not None
            print_ = fingerprint(x509.load_der_x509_certificate(der))
            client.sendmail(sender, ["alice@example.org"], f"From: {sender}\r\nSubject: tls\r\n\r\nx\r\n")
            return print_, 250


@pytest.mark.slow  # a soak: `make soak`
def test_ten_reloads_under_load_refuse_nothing_and_restart_nothing(installation: Installation) -> None:
    inst = installation
    cert, key = inst.root / "tls" / "cert.pem", inst.root / "tls" / "key.pem"
    with running(inst):
        pids = {p: inst.program_pid(p) for p in PROGRAMS}
        first = read_certificate(cert).fingerprint
        # A session begun before the reloads, in the middle of a transaction throughout them.
        held = smtplib.SMTP_SSL("127.0.0.1", inst.ports["submissions"], timeout=120, context=tls_client_context())
        held.login("alice@example.org", PASSWORD)
        held.mail("alice@example.org")
        assert held.rcpt("alice@example.org")[0] == 250

        batches: list[int] = []  # smtp-source runs back to back while the reloads go on
        errors: list[str] = []
        done = threading.Event()

        def load() -> None:
            while not done.is_set():
                run = smtp_source(f"127.0.0.1:{inst.ports['smtp']}", count=200, sessions=20, size=2048,
                                  sender=SOURCE, recipient="alice@example.org", timeout=240, check=False)
                if run.process.returncode != 0 or run.process.stderr.strip():
                    errors.append(f"exit {run.process.returncode}: {run.process.stderr.strip()[-500:]}")
                batches.append(200)

        loader = threading.Thread(target=load, daemon=True)
        generations = [first]
        with TLSClients(inst) as clients:
            loader.start()
            time.sleep(1)
            for i in range(10):
                started = time.monotonic()
                make_self_signed(cert, key, f"reload-{i}.test")
                inst.give(inst.root / "tls")
                generations.append(read_certificate(cert).fingerprint)
                _reload(inst)
                time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
            time.sleep(1)
            done.set()
            loader.join(240)
        assert not loader.is_alive()

        with held:
            assert held.data(b"Subject: held\r\n\r\nbegun before ten reloads\r\n")[0] == 250
            der = held.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
            assert der is not None and fingerprint(x509.load_der_x509_certificate(der)) == first

        last = generations[-1]
        ports = inst.ports
        assert fingerprint(served(ports["smtp"], STARTTLS)) == last
        assert fingerprint(served(ports["submission"], STARTTLS)) == last
        assert fingerprint(served(ports["submissions"], IMPLICIT)) == last
        wait_until(lambda: fingerprint(served(ports["imaps"], IMPLICIT)) == last, 20, "Dovecot's new certificate")
        assert {p: inst.program_pid(p) for p in PROGRAMS} == pids

        sent = sum(batches)
        db = inst.db()
        try:
            def queued() -> int:
                with db.read() as s:
                    return int(s.scalar(select(func.count()).select_from(Message).where(Message.sender == SOURCE))
                               or 0)
            wait_until(lambda: queued() == sent, 30, "every message smtp-source sent to be queued")
        finally:
            db.close()
    served_generations = [g for g in generations if clients.seen[g]]
    print(f"\n10 reloads one second apart under smtp-source -s 20: {sent} messages sent and queued, "
          f"errors {len(errors)}; TLS clients {clients.sent} messages, failures {len(clients.failures)}, "
          f"{len(served_generations)} of {len(generations)} certificates seen; pids unchanged")
    assert errors == []
    assert clients.failures == []
    assert sent >= 200 and clients.sent > 0
    assert len(served_generations) >= 5  # new connections kept getting the newest certificate
    assert "Traceback" not in inst.log_text()


def test_reload_takes_dkim_keys_and_a_selector_and_names_what_waits_for_a_restart(
    installation: Installation, tmp_path: Path
) -> None:
    inst = installation
    r = inst.cli("dkim", "keygen", "example.org", "--selector", "roll2")
    assert r.returncode == 0, r.stderr
    first = re.findall(r"example\.org\.(mr\d+)\.rsa\.key", " ".join(p.name for p in (inst.root / "dkim").iterdir()))
    assert first  # the key set `mailroom init` made
    inst.set("dkim", "selectors", f'{{ "example.org" = "{first[0]}" }}')
    # Outside mail waits (nothing listens there), so its queued, signed copy stays to be read.
    inst.set("mta.transport", '"outside.test"', f'"127.0.0.1:{free_port()}"')
    inst.give(inst.root / "dkim")
    with running(inst):
        pid = inst.program_pid("mta")
        assert f"s={first[0]}-rsa" in _signed_body(inst, "before")
        inst.set("dkim", "selectors", '{ "example.org" = "roll2" }')
        inst.set("mta", "max_hops", "20")
        _reload(inst)
        wait_until(lambda: "takes effect at the next restart: mta.max_hops" in inst.log_text(), 10, "the line")
        assert "s=roll2-rsa" in _signed_body(inst, "after")
        # A key file replaced in place (the folder's time put back, so only a reload can tell):
        # after the reload the MTA signs with the new key.
        key_dir = inst.root / "dkim"
        fresh = dkim.generate(tmp_path / "fresh", "example.org", "roll2")
        stamp = key_dir.stat()
        for k in fresh:
            dkim.key_path(key_dir, "example.org", "roll2", k.algorithm).write_bytes(k.private)
        os.utime(key_dir, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
        _reload(inst)
        body = _signed_body(inst, "new key").encode()
        records = {f"{k.dns_name}.".encode(): dkim.public_record(k).encode() for k in fresh}
        assert dkimpy.verify(body, dnsfunc=lambda name, timeout=5: records.get(name, b"")), "not the new key"
        assert inst.program_pid("mta") == pid


def _signed_body(inst: Installation, subject: str) -> str:
    """Submit one message to an outside address; the body the MTA queued (signed at the MTA)."""
    code, reply = inst.submit("alice@example.org", ["someone@outside.test"],
                              f"From: alice@example.org\r\nTo: someone@outside.test\r\nSubject: {subject}\r\n\r\n"
                              f"hello\r\n".encode())
    assert code == 250, reply
    trace = reply.decode().rsplit(" ", 1)[1]
    db = inst.db()
    try:
        with db.read() as s:
            body = s.scalar(select(Message.body).where(Message.id == trace))
    finally:
        db.close()
    assert body is not None
    return body.decode(errors="replace")


def test_a_key_that_does_not_load_changes_nothing(installation: Installation, tmp_path: Path) -> None:
    inst = installation
    cert, key = inst.root / "tls" / "cert.pem", inst.root / "tls" / "key.pem"
    with running(inst):
        pids = {p: inst.program_pid(p) for p in ("mta", "msa", "web")}
        old = read_certificate(cert).fingerprint
        make_self_signed(tmp_path / "other.pem", tmp_path / "other.key", "other.test")
        cert.write_bytes((tmp_path / "other.pem").read_bytes())  # a certificate without its key
        inst.give(inst.root / "tls")
        _reload(inst)
        assert inst.log_text().count("still serving the previous certificate") >= 2  # mta, msa
        assert fingerprint(served(inst.ports["smtp"], STARTTLS)) == old
        assert fingerprint(served(inst.ports["submissions"], IMPLICIT)) == old
        assert {p: inst.program_pid(p) for p in pids} == pids
        key.write_bytes((tmp_path / "other.key").read_bytes())  # the pair, complete
        inst.give(inst.root / "tls")
        _reload(inst)
        new = read_certificate(cert).fingerprint
        wait_until(lambda: fingerprint(served(inst.ports["smtp"], STARTTLS)) == new, 15, "the complete pair")
        assert {p: inst.program_pid(p) for p in pids} == pids
