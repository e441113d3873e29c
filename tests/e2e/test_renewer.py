"""The renewer `mailroom run` supervises: it renews at two thirds of the lifetime, through an ACME
server that first rate-limits (429 with Retry-After) and then fails (500), backing off as told,
keeping the old certificate until a new one is in hand, and reloading every daemon after.

The certificate it starts with is one "ACME gave us" 61 days ago for 90 days (made by a test CA,
its fingerprint recorded as cli/cert.py records an issued one), so it is due at once; the ACME
server is pebble behind a front that answers the first two orders itself.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from common.tls import read_certificate, tlsa_3_1_1
from tests.support.acme_faults import Fault, FaultyACME
from tests.support.dns_server import DNSServer
from tests.support.pebble import Pebble, issue, make_ca, wait_until
from tests.support.ports import free_port
from tests.support.suite import Installation
from tests.support.tls_probe import STARTTLS, fingerprint, served, verified

pytestmark = [pytest.mark.interop, pytest.mark.timeout(240)]

NAMES = ["mail.test", "mta-sts.example.org", "autoconfig.example.org"]


def _aged_acme_certificate(inst: Installation, tmp: Path) -> str:
    """tls/cert.pem: 61 of its 90 days gone, the installation's own key, recorded as issued by ACME."""
    key = serialization.load_pem_private_key((inst.root / "tls" / "key.pem").read_bytes(), None)
    ca = make_ca(tmp / "old-ca", "the CA of the first certificate")
    start = dt.datetime.now(dt.UTC) - dt.timedelta(days=61)
    cert, _ = issue(tmp / "old", "cert", ca, NAMES, days=90, not_before=start, key=key)  # type: ignore[arg-type]
    (inst.root / "tls" / "cert.pem").write_bytes(cert.read_bytes())
    info = read_certificate(inst.root / "tls" / "cert.pem")
    acme = inst.root / "acme"
    acme.mkdir(mode=0o700, exist_ok=True)
    (acme / "issued.json").write_text(json.dumps({"fingerprint": info.fingerprint}))
    inst.give(inst.root / "tls")
    inst.give(acme)
    return info.fingerprint


def test_the_renewer_backs_off_on_429_and_500_keeps_the_old_certificate_then_renews(tmp_path: Path) -> None:
    inst = Installation(tmp_path / "mailroom")
    old = _aged_acme_certificate(inst, tmp_path)
    tlsa = tlsa_3_1_1((inst.root / "tls" / "key.pem").read_bytes())
    http = free_port()
    faults = [
        Fault("/order-plz", 429, method="POST", problem="rateLimited", retry_after="3",
              detail="too many new orders recently"),
        Fault("/order-plz", 500, method="POST", problem="serverInternal", detail="the CA is down"),
    ]
    with DNSServer({n: {"A": ["127.0.0.1"]} for n in NAMES}) as dns, \
            Pebble(http_port=http, dns=dns.address) as pebble, FaultyACME(pebble, faults) as front:
        inst.set("web", "http", f'"127.0.0.1:{http}"')
        inst.set("acme", "directory", f'"{front.directory}"')
        inst.set("acme", "directory_ca_file", f'"{pebble.ca_file}"')
        inst.set("acme", "retry_schedule", '["1s"]')
        inst.start()
        try:
            pids = {p: inst.program_pid(p) for p in ("mta", "msa", "web", "renew")}
            assert fingerprint(served(inst.ports["smtp"], STARTTLS)) == old

            wait_until(lambda: "renewal attempt 1 failed" in inst.log_text(), 60, "the first attempt")
            # Refused: the old certificate is still what the MTA serves.
            assert fingerprint(served(inst.ports["smtp"], STARTTLS)) == old
            roots = pebble.roots()
            wait_until(lambda: _issued_by_pebble(inst, roots), 90, "the renewed certificate to be served")
            renewed = read_certificate(inst.root / "tls" / "cert.pem")
            assert renewed.fingerprint != old
            assert renewed.tlsa == tlsa  # renewal kept the key: a TLSA 3 1 1 record stays true
            assert {p: inst.program_pid(p) for p in pids} == pids
        finally:
            inst.stop()
        orders = [s for s in front.requests if s.method == "POST" and "/order-plz" in s.path]
    log = inst.log_text()
    assert re.search(
        r"renew\[\d+\] -: renewal attempt 1 failed: rate limited by the ACME server \(rateLimited\): too many new "
        r"orders recently; it asks us to wait 3 s; the current certificate stays \(valid until [0-9-]+ [0-9:]+ UTC\); "
        r"next attempt in 3 s", log), log[-3000:]
    assert re.search(r"renewal attempt 2 failed: the ACME server refused \(serverInternal\): the CA is down; .*"
                     r"next attempt in 1 s", log), log[-3000:]
    assert "renewed; reloading the daemons" in log
    assert "Traceback" not in log
    assert [s.status for s in orders] == [429, 500, 201]
    # Retry-After said 3 s; the schedule alone would have waited 1 s.
    assert orders[1].time - orders[0].time >= 3.0, [o.time for o in orders]
    assert orders[2].time - orders[1].time >= 1.0


def _issued_by_pebble(inst: Installation, roots: bytes) -> bool:
    try:
        verified(inst.ports["smtp"], "mail.test", roots, STARTTLS)
    except OSError:  # ssl.SSLCertVerificationError: still the old one
        return False
    return True


def test_the_renewer_leaves_a_certificate_installed_by_hand_alone(tmp_path: Path) -> None:
    inst = Installation(tmp_path / "mailroom")
    before = (inst.root / "tls" / "cert.pem").read_bytes()
    inst.set("acme", "directory", '"https://127.0.0.1:9/dir"')  # never asked
    inst.start()
    try:
        wait_until(lambda: "nothing to renew" in inst.log_text(), 30, "the renewer's first look")
        time.sleep(1)
    finally:
        inst.stop()
    assert "was not issued by ACME here" in inst.log_text()
    assert "renewing" not in inst.log_text()
    assert (inst.root / "tls" / "cert.pem").read_bytes() == before
