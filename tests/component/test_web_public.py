"""The web program's listeners for the Internet (web/public.py), in a real `python -m web` process.

`[web] http` (port 80 role) answers ACME HTTP-01 requests from the challenge
files and nothing that is not a token; `[web] https` (443 role) serves the
MTA-STS policy only to a Host of mta-sts.DOMAIN of a local domain; SIGHUP
makes a changed policy served at once, by the same process.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import ssl
from collections.abc import Iterator

import pytest

from tests.support.pebble import wait_until
from tests.support.ports import free_port
from tests.support.suite import Daemons, Installation, wait_port

pytestmark = pytest.mark.timeout(90)

TOKEN = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA"


class Web:
    def __init__(self, inst: Installation, daemons: Daemons, http: int, https: int) -> None:
        self.inst, self.daemons, self.http, self.https = inst, daemons, http, https

    def get(self, path: str, host: str = "mail.test") -> tuple[int, bytes, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.http, timeout=10)
        return _ask(conn, path, host)

    def get_tls(self, path: str, host: str) -> tuple[int, bytes, str]:
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # the installation's self-signed one
        conn = http.client.HTTPSConnection("127.0.0.1", self.https, timeout=10, context=ctx)
        return _ask(conn, path, host)


def _ask(conn: http.client.HTTPConnection, path: str, host: str) -> tuple[int, bytes, str]:
    try:
        conn.request("GET", path, headers={"Host": host})
        r = conn.getresponse()
        return r.status, r.read(), r.getheader("Content-Type") or ""
    finally:
        conn.close()


@pytest.fixture
def web(installation: Installation) -> Iterator[Web]:
    http, https = free_port(), free_port()
    installation.set("web", "http", f'"127.0.0.1:{http}"')
    installation.set("web", "https", f'"127.0.0.1:{https}"')
    daemons = Daemons(installation)
    daemons.start("web")
    try:
        for port in (http, https, installation.ports["listen"]):
            wait_port(port)
        yield Web(installation, daemons, http, https)
    finally:
        daemons.stop()


def test_http_answers_acme_challenges_from_the_files_and_nothing_else(web: Web) -> None:
    challenges = web.inst.root / "acme" / "challenges"
    challenges.mkdir(parents=True)
    (challenges / TOKEN).write_text(f"{TOKEN}.thumbprint")
    (web.inst.root / "acme" / "account.key").write_text("secret")
    web.inst.give(web.inst.root / "acme")

    status, body, kind = web.get(f"/.well-known/acme-challenge/{TOKEN}")
    assert (status, body) == (200, f"{TOKEN}.thumbprint".encode())
    assert kind == "application/octet-stream"
    assert web.get("/.well-known/acme-challenge/" + "A" * 43)[0] == 404  # no such token
    for bad in ("../account.key", "..%2faccount.key", "%2e%2e/account.key", ".." + "/" * 20 + "account.key",
                "short", "a" * 300, TOKEN + "/x"):
        status, body, _ = web.get(f"/.well-known/acme-challenge/{bad}")
        assert status == 404 and b"secret" not in body, bad
    # Not the operator's pages, nor the policy (HTTPS only, RFC 8461 3.3).
    assert web.get("/metrics")[0] == 404
    assert web.get("/.well-known/mta-sts.txt", "mta-sts.example.org")[0] == 404
    status, body, _ = web.get("/mail/config-v1.1.xml?emailaddress=alice@example.org", "autoconfig.example.org")
    assert status == 200 and b"<emailProvider" in body


def test_https_serves_the_policy_to_mta_sts_hosts_of_local_domains_only(web: Web) -> None:
    status, body, kind = web.get_tls("/.well-known/mta-sts.txt", "mta-sts.example.org")
    assert status == 200 and kind.startswith("text/plain")
    assert body == b"version: STSv1\r\nmode: testing\r\nmx: mail.test\r\nmax_age: 604800\r\n"
    assert web.get_tls("/.well-known/mta-sts.txt", "mta-sts.elsewhere.test")[0] == 404
    assert web.get_tls("/.well-known/mta-sts.txt", "mail.test")[0] == 404
    assert web.get_tls(f"/.well-known/acme-challenge/{TOKEN}", "mail.test")[0] == 404  # port 80's job
    # A client that is not TLS at all costs a closed connection, and the listener serves on.
    with socket.create_connection(("127.0.0.1", web.https), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        answer = s.recv(100)  # a TLS alert, or the end: never an HTTP answer in the clear
        assert not answer.startswith(b"HTTP/"), answer
    assert web.get_tls("/.well-known/mta-sts.txt", "mta-sts.example.org")[0] == 200


def test_sighup_serves_a_changed_policy_from_the_same_process(web: Web) -> None:
    proc = web.daemons.procs["web"]
    web.inst.set("mta_sts", "mode", '"enforce"')
    web.inst.set("mta_sts", "max_age", '"1d"')
    os.kill(proc.pid, signal.SIGHUP)
    wait_until(lambda: b"mode: enforce" in web.get_tls("/.well-known/mta-sts.txt", "mta-sts.example.org")[1],
               15, "the new policy")
    assert web.get_tls("/.well-known/mta-sts.txt", "mta-sts.example.org")[1] == (
        b"version: STSv1\r\nmode: enforce\r\nmx: mail.test\r\nmax_age: 86400\r\n")
    assert proc.poll() is None
    log = web.daemons.log("web")
    assert "reloaded (MTA-STS policy id" in log
    assert "Traceback" not in log


def test_mailroom_run_names_a_public_web_port_already_taken(installation: Installation) -> None:
    from cli import supervise

    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        installation.set("web", "https", f'"127.0.0.1:{port}"')
        assert supervise.preflight(installation.config) == f"[web] https = 127.0.0.1:{port}: address already in use"
