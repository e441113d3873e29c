"""The admin page from a test: the web program of an installation, and an HTTPS client with cookies.

`web_program(inst)` starts `python -m web` for the installation (as supervisord
would), waits for its admin listener and stops it afterwards.  `AdminClient`
speaks HTTPS to it (the installation's self-signed certificate is not checked),
keeps the cookies it is given, and takes each form's token from the last page
it read, as a browser submitting that page's form would.
"""

from __future__ import annotations

import contextlib
import http.client
import re
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

from tests.support.suite import Installation, wait_port

ROOT = Path(__file__).resolve().parents[2]
ADMIN, ADMIN_PASSWORD = "boss", "a long admin password"


@contextlib.contextmanager
def web_program(inst: Installation) -> Iterator[subprocess.Popen[bytes]]:
    log = open(inst.root.parent / f"{inst.root.name}-web.log", "ab")  # noqa: SIM115 - the child keeps it
    proc = subprocess.Popen([sys.executable, "-m", "web", "--config", str(inst.config_path)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    log.close()
    try:
        wait_port(inst.ports["admin"], 30)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def add_admin(inst: Installation, name: str = ADMIN, password: str = ADMIN_PASSWORD) -> None:
    r = inst.cli("admin", "add", name, "--password-stdin", stdin=password + "\n")
    assert r.returncode == 0, r.stderr


@dataclass
class Page:
    status: int
    headers: http.client.HTTPMessage
    body: str

    @property
    def location(self) -> str:
        return self.headers.get("Location", "")

    def csrf(self) -> str:
        m = re.search(r'name="csrf" value="([^"]*)"', self.body)
        assert m, self.body[:2000]
        return m.group(1)

    def text(self, ident: str) -> str:
        """The text of the element with this id (a flash line, the error, ...)."""
        m = re.search(rf'id="{re.escape(ident)}"[^>]*>(.*?)</', self.body, re.S)
        return m.group(1) if m else ""

    def flash(self) -> list[str]:
        return re.findall(r'class="flash">(.*?)</p>', self.body, re.S)


class AdminClient:
    def __init__(self, port: int, host: str = "127.0.0.1", *, source: str | None = None) -> None:
        """`source`: the loopback address to connect from (127.0.0.2, ...), for a client the
        page must tell apart from the others (its failed logins lock only it out)."""
        self.port, self.host, self.source = port, host, source
        self.cookies: dict[str, str] = {}
        self.last: Page | None = None
        self.tls = ssl.create_default_context()
        self.tls.check_hostname = False
        self.tls.verify_mode = ssl.CERT_NONE

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> Page:
        conn = http.client.HTTPSConnection(self.host, self.port, timeout=60, context=self.tls,
                                           source_address=(self.source, 0) if self.source else None)
        try:
            sent = dict(headers or {})
            if self.cookies:
                sent.setdefault("Cookie", "; ".join(f"{k}={v}" for k, v in self.cookies.items()))
            conn.request(method, path, body=body, headers=sent)
            r = conn.getresponse()
            page = Page(r.status, r.headers, r.read().decode("utf-8", "replace"))
        finally:
            conn.close()
        for cookie in page.headers.get_all("Set-Cookie") or []:
            name, _, rest = cookie.partition("=")
            value = rest.split(";", 1)[0]
            if "Max-Age=0" in cookie:
                self.cookies.pop(name, None)
            else:
                self.cookies[name] = value
        if page.status == 200:
            self.last = page
        return page

    def get(self, path: str) -> Page:
        page = self.request("GET", path)
        for _ in range(3):  # follow redirects, as a browser does
            if page.status != 303:
                break
            page = self.request("GET", page.location)
        return page

    def post(self, path: str, fields: dict[str, str], *, token: bool = True, follow: bool = True) -> Page:
        data = dict(fields)
        if token and "csrf" not in data:
            assert self.last is not None, "no page read yet to take the form's token from"
            data["csrf"] = self.last.csrf()
        page = self.request("POST", path, urlencode(data).encode(),
                            {"Content-Type": "application/x-www-form-urlencoded"})
        return self.get(page.location) if follow and page.status == 303 else page

    def login(self, name: str = ADMIN, password: str = ADMIN_PASSWORD) -> Page:
        self.get("/login")
        return self.post("/login", {"name": name, "password": password})
