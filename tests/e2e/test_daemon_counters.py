"""What the daemons count in memory reaches /metrics: a failed login at the real MSA, connections
accepted and refused by the real MTA's per-client cap, and a delivery over STARTTLS to a scripted
remote host, all scraped from the real web program of a running suite.  At shutdown every daemon
saves its counters, so the files still hold them for the next start.
"""

from __future__ import annotations

import base64
import smtplib
import socket
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from common import counters
from common.tls import server_context
from tests.harness.peers import MX, mx_thread
from tests.support.suite import Installation, tls_client_context

pytestmark = pytest.mark.timeout(120)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def remote(installation: Installation) -> Iterator[MX]:
    """The remote host's side (STARTTLS with the installation's certificate): what it received."""
    cfg = installation.config
    with mx_thread(MX(), tls=server_context(cfg.resolve(cfg.tls.cert), cfg.resolve(cfg.tls.key))) as peer:
        yield peer


def scrape(inst: Installation) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{inst.ports['listen']}/metrics", timeout=10) as r:
        body = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(body) for s in f.samples}


def smtp_connection(port: int) -> socket.socket:
    """A client connection that has read its greeting (220, or the 421 of a refusal)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.recv(512)
    return s


def test_login_failures_connections_and_tls_out_reach_metrics(
    installation: Installation, remote: MX
) -> None:
    inst = installation
    peer = remote
    text = inst.config_path.read_text()
    text += "\n[smtp]\nmax_connections_per_client = 2\n"
    text = text.replace("[mta.transport]\n", f'[mta.transport]\n"remote.test" = "127.0.0.1:{peer.port}"\n', 1)
    inst.config_path.write_text(text)
    assert inst.config.smtp.max_connections_per_client == 2
    assert inst.config.mta.transport == {"remote.test": f"127.0.0.1:{peer.port}"}
    inst.start()
    try:
        # A wrong password at the submission port (587 role).
        with smtplib.SMTP("127.0.0.1", inst.ports["submission"], timeout=30) as c:
            c.starttls(context=tls_client_context())
            c.ehlo()
            plain = base64.b64encode(b"\0alice@example.org\0not the password").decode()
            assert c.docmd("AUTH", f"PLAIN {plain}")[0] == 535
        # The MTA's public listener takes two connections from one client; the third is refused.
        held = [smtp_connection(inst.ports["smtp"]) for _ in range(2)]
        refused = smtp_connection(inst.ports["smtp"])
        for s in (*held, refused):
            s.close()
        # A message to a remote domain goes out over STARTTLS.
        code, _ = inst.submit("alice@example.org", ["someone@remote.test"], b"Subject: out\r\n\r\nhi\r\n")
        assert code == 250
        inst.wait_for(lambda: len(peer.received) == 1, what="the remote delivery")
        assert [(g.recipients, g.tls) for g in peer.received] == [(["someone@remote.test"], True)]

        got: Samples = {}

        def counted() -> bool:
            got.clear()
            got.update(scrape(inst))
            return (
                got.get(("mailroom_login_failures_total", (("listener", "msa.submission"),))) == 1
                and got.get(("mailroom_connections_total", (("listener", "mta.smtp"), ("result", "refused")))) == 1
                and got.get(("mailroom_tls_sessions_total",
                             (("direction", "out"), ("hop", "qmgr"), ("tls", "yes")))) == 1
            )

        try:
            inst.wait_for(counted, timeout=30, what="the daemons' counters in /metrics")
        except AssertionError:
            ours = ("mailroom_login", "mailroom_conn", "mailroom_tls")
            mine = {k: v for k, v in got.items() if k[0].startswith(ours)}
            raise AssertionError(f"not counted: {mine}") from None
        # Ours, and the one connection the test harness made to see the port open.
        assert got[("mailroom_connections_total", (("listener", "mta.smtp"), ("result", "accepted")))] == 3
        # The MSA handed the message to the MTA's internal listener.
        assert got[("mailroom_connections_total", (("listener", "mta.internal"), ("result", "accepted")))] >= 1
        assert ("mailroom_tls_sessions_total", (("direction", "out"), ("hop", "qmgr"), ("tls", "no"))) not in got
        assert ("mailroom_login_failures_total", (("listener", "msa.submissions"),)) not in got
    finally:
        inst.stop()

    # Saved at shutdown: the next start carries on from these.
    folder = inst.config.run_dir / "metrics"
    msa: dict[str, Any] = {e["name"]: e for e in counters.read(folder / "msa.json")}
    assert msa[counters.LOGIN_FAILURES]["value"] == 1
    qmgr = counters.read(folder / "qmgr.json")
    assert [e for e in qmgr if e["name"] == counters.TLS_OUT] == [
        {"name": counters.TLS_OUT, "labels": {"hop": "qmgr", "tls": "yes"}, "value": 1.0}]
