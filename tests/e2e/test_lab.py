"""The lab Internet (`mailroom lab`), with the real processes: every scenario's message is sent
with `mailroom lab send` and followed to its end in the trace, the lab MX hosts' stores and the
sender's Maildir.

The lab runs at 3600x: five lab minutes (the first retry) pass in a twelfth of a second, and
the queue lifetime, 12 lab hours here, in 12 real seconds.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.exception
import dns.message
import dns.query
import dns.resolver
import pytest

from lab import scenarios
from tests.harness.users import add_user
from tests.support.suite import PASSWORD, Installation, free_port, maildir_messages

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[2]


def _wait_tcp(host: str, port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port}")


def _wait_dns(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if dns.query.udp(dns.message.make_query("dane.test", "MX"), "127.0.0.1", port=port, timeout=0.5).answer:
                return
        except (OSError, dns.exception.Timeout):
            pass
        time.sleep(0.1)
    raise TimeoutError(f"no DNS answer on 127.0.0.1:{port}")


class Lab:
    def __init__(self, inst: Installation, mx_port: int, dns_port: int) -> None:
        self.inst = inst
        self.mx_port = mx_port
        self.dns_port = dns_port
        self.traces: dict[str, str] = {}
        self.sent: dict[str, str] = {}  # scenario -> what `lab send` printed

    def send(self, name: str) -> str:
        r = self.inst.cli("lab", "send", name)
        assert r.returncode == 0, (r.stdout, r.stderr)
        m = re.search(r"queued as ([0-9A-F]{18})", r.stdout)
        assert m, r.stdout
        self.sent[name] = r.stdout
        self.traces[name] = m.group(1)
        return m.group(1)

    def events(self, name: str) -> list[dict[str, Any]]:
        return list(self.inst.trace(self.traces[name])["events"])

    def final(self, name: str, timeout: float = 40.0) -> dict[str, Any]:
        """The queue manager's last word on the scenario's recipient: delivered, bounced or expired."""
        found: list[dict[str, Any]] = []

        def done() -> bool:
            found[:] = [e for e in self.events(name)
                        if e["hop"] == "qmgr" and e["event"] in ("delivered", "bounced", "expired")]
            return bool(found)

        self.inst.wait_for(done, timeout=timeout, what=f"the end of scenario {name}")
        return found[-1]

    def stored(self, host: str, scenario: str) -> list[bytes]:
        """What lab MX host `host` stored of the scenario's message (swaks may have left others)."""
        folder = self.inst.config.run_dir / "lab" / host
        found = [p.read_bytes() for p in sorted(folder.glob("*.eml"))] if folder.is_dir() else []
        return [m for m in found if f"Subject: lab scenario {scenario}\r\n".encode() in m]

    def sender_mail(self) -> list[bytes]:
        return [p.read_bytes() for p in maildir_messages(self.inst.mailbox("alice@example.org"))]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    inst = Installation(tmp_path_factory.mktemp("lab") / "mailroom")
    add_user(inst, "alice@example.org", "maildir")
    dns_port = free_port(udp=True)
    mx_port = free_port()
    dnssec_port = free_port(udp=True)
    policy_port = free_port(scenarios.POLICY_HOST)
    since = dt.datetime.now(dt.UTC).replace(tzinfo=None, microsecond=0).isoformat()
    inst.set("dns", "nameservers", json.dumps([f"127.0.0.1:{dns_port}"]))
    inst.set("dns", "timeout", '"2s"')
    inst.set("mta", "remote_port", str(mx_port))
    inst.set("mta", "connect_timeout", '"2s"')
    inst.set("mta", "max_queue_lifetime", '"12h"')
    inst.set("mta", "delay_warning", '"2h"')
    inst.config_path.write_text(inst.config_path.read_text() + f"""
[lab]
enabled = true
dns = "127.0.0.1:{dns_port}"
time_warp = 3600
time_warp_since = "{since}"
sender = "alice@example.org"
sender_password = "{PASSWORD}"
slow_reply = "1s"
dnssec = "127.0.0.1:{dnssec_port}"

[outbound_tls]
mta_sts_port = {policy_port}
ca_file = "run/lab/tls/ca.pem"
dnssec_resolvers = ["127.0.0.1:{dnssec_port}"]
""")
    inst.start()
    try:
        for host in scenarios.listening_hosts():
            _wait_tcp(host.address, mx_port)
        _wait_tcp(scenarios.POLICY_HOST, policy_port)
        _wait_dns(dnssec_port)  # the validating resolver: before it answers, every attempt would wait
        lab = Lab(inst, mx_port, dns_port)
        for s in scenarios.SCENARIOS:
            lab.send(s.name)
        yield lab
    finally:
        inst.stop()


def _delivered_via(lab: Lab, name: str, address: str) -> dict[str, Any]:
    last = lab.final(name)
    assert last["event"] == "delivered", last
    assert last["detail"].startswith("250 ") and f"(via {address})" in last["detail"], last
    return last


def _dsn_about(lab: Lab, recipient: str, status: str, *, count: int = 1) -> list[bytes]:
    """The sender's DSNs (RFC 3464) that name `recipient` with `status`, once `count` have arrived."""
    found: list[bytes] = []

    def arrived() -> bool:
        found[:] = [m for m in lab.sender_mail()
                    if f"Final-Recipient: rfc822; {recipient}".encode() in m and f"Status: {status}".encode() in m]
        return len(found) >= count

    lab.inst.wait_for(arrived, timeout=40, what=f"a DSN about {recipient} ({status})")
    return found


def test_help_lists_every_scenario(lab: Lab) -> None:
    r = lab.inst.cli("lab", "--help")
    assert r.returncode == 0
    for s in scenarios.SCENARIOS:
        assert s.name in r.stdout and s.recipient in r.stdout


def test_lab_dns_answers_mx_null_mx_and_nxdomain(lab: Lab) -> None:
    r = dns.resolver.Resolver(configure=False)
    r.nameservers = ["127.0.0.1"]
    r.port = lab.dns_port
    r.lifetime = 5
    assert sorted(rr.to_text() for rr in r.resolve("backup.test", "MX")) == [
        "10 mx1.backup.test.", "20 mx2.backup.test."]
    assert [rr.to_text() for rr in r.resolve("mx2.backup.test", "A")] == ["127.0.0.17"]
    assert [rr.to_text() for rr in r.resolve("nullmx.test", "MX")] == ["0 ."]
    with pytest.raises(dns.resolver.NXDOMAIN):
        r.resolve("nowhere.test", "MX")
    with pytest.raises(dns.resolver.NoAnswer):  # exists, but has no address of its own
        r.resolve("accepts.test", "A")
    # And over TCP, where a client goes when a UDP answer is truncated.
    q = dns.message.make_query("accepts.test", "MX")
    assert dns.query.tcp(q, "127.0.0.1", port=lab.dns_port, timeout=5).answer[0][0].to_text() == "10 mx.accepts.test."


def _peer(name: str, package: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is missing: .ci/install-peers installs {package}"
    return path


@pytest.mark.interop
def test_dig_asks_the_lab_dns(lab: Lab) -> None:
    def dig(*args: str) -> str:
        r = subprocess.run([_peer("dig", "bind9-dnsutils"), "@127.0.0.1", "-p", str(lab.dns_port), *args],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        return r.stdout

    answer = [line.split() for line in dig("backup.test", "MX", "+noall", "+answer", "+additional").splitlines()]
    assert sorted(answer) == [
        ["backup.test.", "60", "IN", "MX", "10", "mx1.backup.test."],
        ["backup.test.", "60", "IN", "MX", "20", "mx2.backup.test."],
        ["mx1.backup.test.", "60", "IN", "A", "127.0.0.16"],
        ["mx2.backup.test.", "60", "IN", "A", "127.0.0.17"],
    ]
    assert dig("nullmx.test", "MX", "+noall", "+answer").split() == ["nullmx.test.", "60", "IN", "MX", "0", "."]
    full = dig("nowhere.test", "MX")
    assert "status: NXDOMAIN" in full and "flags: qr aa" in full
    assert "status: NOERROR" in dig("greylist.test", "MX", "+tcp")


@pytest.mark.interop
def test_swaks_meets_greylisting_and_required_tls(lab: Lab) -> None:
    def swaks(address: str, to: str, *extra: str) -> str:
        r = subprocess.run([_peer("swaks", "swaks"), "--server", f"{address}:{lab.mx_port}", "--from",
                            "learner@example.org", "--to", to, "--helo", "laptop.test", *extra],
                           capture_output=True, text=True, timeout=60)
        return r.stdout

    first = swaks("127.0.0.12", "swaks@greylist.test")
    assert "<** 451 4.7.1 Greylisted" in first and "stored as" not in first
    assert "<-  250 2.0.0 Ok: stored as" in swaks("127.0.0.12", "swaks@greylist.test")
    plain = swaks("127.0.0.15", "swaks@tls.test")
    assert "<** 530 5.7.0 Must issue a STARTTLS command first" in plain
    assert "<~  250 2.0.0 Ok: stored as" in swaks("127.0.0.15", "swaks@tls.test", "--tls")


def test_accepts(lab: Lab) -> None:
    _delivered_via(lab, "accepts", "127.0.0.11")
    [stored] = lab.stored("mx.accepts.test", "accepts")
    assert b"X-Lab-Envelope-To: <someone@accepts.test>" in stored


def test_greylists_then_accepts(lab: Lab) -> None:
    _delivered_via(lab, "greylists", "127.0.0.12")
    qmgr = [e for e in lab.events("greylists") if e["hop"] == "qmgr"]
    assert qmgr[0]["event"] == "deferred" and qmgr[0]["detail"].startswith("451 4.7.1 Greylisted"), qmgr
    # The retry came after the first wait of the schedule (5 lab minutes), in lab time.
    first, last = (dt.datetime.fromisoformat(e["time"]) for e in (qmgr[0], qmgr[-1]))
    assert last - first >= dt.timedelta(minutes=5)
    assert len(lab.stored("mx.greylist.test", "greylists")) == 1


def test_refuses_bounces_at_once(lab: Lab) -> None:
    last = lab.final("refuses")
    assert last["event"] == "bounced" and last["detail"].startswith("550 5.1.1 No such user here"), last
    assert not lab.stored("mx.refuses.test", "refuses")
    [dsn] = _dsn_about(lab, "someone@refuses.test", "5.1.1")
    assert b"Content-Type: multipart/report; report-type=delivery-status" in dsn


def test_slow_host_is_waited_for(lab: Lab) -> None:
    _delivered_via(lab, "slow", "127.0.0.14")
    assert len(lab.stored("mx.slow.test", "slow")) == 1


def test_needs_tls(lab: Lab) -> None:
    _delivered_via(lab, "needs-tls", "127.0.0.15")
    assert len(lab.stored("mx.tls.test", "needs-tls")) == 1
    # Without STARTTLS the host refuses the transaction (RFC 3207 4).
    with smtplib.SMTP("127.0.0.15", lab.mx_port, timeout=10) as c:
        c.ehlo("learner")
        assert c.has_extn("starttls")
        code, text = c.mail("x@example.org")
        assert (code, text[:5]) == (530, b"5.7.0"), (code, text)


def test_backup_mx_takes_over(lab: Lab) -> None:
    _delivered_via(lab, "backup-mx", "127.0.0.17")
    assert len(lab.stored("mx2.backup.test", "backup-mx")) == 1
    # The primary was tried first (RFC 5321 5.1: lowest preference first) and refused the connection.
    assert f"127.0.0.16:{lab.mx_port}" in lab.inst.log_text()


def test_null_mx_bounces_without_a_connection(lab: Lab) -> None:
    last = lab.final("null-mx")
    assert last["event"] == "bounced" and last["detail"].startswith("556 5.1.10"), last
    _dsn_about(lab, "someone@nullmx.test", "5.1.10")


def test_no_such_domain_bounces(lab: Lab) -> None:
    last = lab.final("no-such-domain")
    assert last["event"] == "bounced" and last["detail"].startswith("550 5.1.2"), last
    _dsn_about(lab, "someone@nowhere.test", "5.1.2")


def test_unreachable_is_retried_warned_about_and_expires(lab: Lab) -> None:
    last = lab.final("unreachable", timeout=60)
    assert last["event"] == "expired", last
    events = lab.events("unreachable")
    deferred = [e for e in events if e["event"] == "deferred"]
    assert len(deferred) >= 3 and all(e["detail"].startswith("451 4.4.1") for e in deferred)
    dsns = [e["detail"] for e in events if e["event"] == "dsn"]
    assert any(d.startswith("delay") for d in dsns) and any(d.startswith("bounce") for d in dsns), dsns
    # Lab time: the recipient was given up after the queue lifetime (12 lab hours), not 12 real seconds.
    received = min(dt.datetime.fromisoformat(e["time"]) for e in events if e["hop"] == "mta")
    assert dt.datetime.fromisoformat(last["time"]) - received >= dt.timedelta(hours=12)
    _dsn_about(lab, "someone@unreachable.test", "4.4.1")  # the delay warning
    mails = [m for m in lab.sender_mail() if b"someone@unreachable.test" in m]
    assert len(mails) == 2, [m[:300] for m in mails]


def test_send_refuses_a_non_lab_installation(tmp_path: Path) -> None:
    inst = Installation(tmp_path / "plain")
    r = inst.cli("lab", "send", "accepts")
    assert r.returncode == 1 and "not a lab installation" in r.stderr


def test_lab_start_makes_a_lab_installation(tmp_path: Path) -> None:
    from cli import lab as labcmd
    from common import config as configmod

    base = tmp_path / "var-lab"
    assert labcmd.create(base, 600) == 0
    cfg = configmod.load(base / "mailroom.toml")
    assert cfg.lab.enabled and cfg.lab.time_warp == 600 and cfg.lab.time_warp_since
    assert cfg.dns.nameservers == [cfg.lab.dns] and cfg.mta.remote_port == labcmd.LAB_MX_PORT
    r = subprocess.run([sys.executable, "-m", "cli.main", "--config", str(base / "mailroom.toml"), "user", "list"],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.stdout.startswith(labcmd.LAB_SENDER), r.stdout
    conf = (base / "mailroom.toml").read_text()
    assert f'sender_password = "{cfg.lab.sender_password}"' in conf


def test_mta_sts_enforce_with_the_wrong_certificate_keeps_the_mail(lab: Lab) -> None:
    """sts.test's policy (enforce, mx: mx.sts.test) is fetched over HTTPS; its MX host's
    certificate, from the same CA, names another host: every try is deferred, nothing
    reaches the host, and the message expires with a DSN at the end of its lifetime."""
    last = lab.final("mta-sts-wrong-cert", timeout=60)
    assert last["event"] == "expired", last
    deferred = [e for e in lab.events("mta-sts-wrong-cert") if e["event"] == "deferred"]
    assert deferred and all(e["detail"].startswith("451 4.7.5") and "certificate verify failed" in e["detail"]
                            for e in deferred), deferred
    assert not lab.stored("mx.sts.test", "mta-sts-wrong-cert")
    log = lab.inst.log_text()
    assert "MTA-STS: policy of sts.test (id lab1): mode enforce, mx mx.sts.test" in log
    assert "mx.sts.test (127.0.0.19): MTA-STS enforce: TLS with" in log
    _dsn_about(lab, "someone@sts.test", "4.7.5")


def test_dane_delivers_to_the_certificate_its_tlsa_record_names(lab: Lab) -> None:
    _delivered_via(lab, "dane", "127.0.0.21")
    assert len(lab.stored("mx.dane.test", "dane")) == 1
    assert "mx.dane.test (127.0.0.21): TLS, certificate matched the DANE TLSA records" in lab.inst.log_text()
