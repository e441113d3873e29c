"""Mail clients set themselves up from the real web program (`python -m web`, over HTTP on
loopback): Outlook's Autodiscover (POX, POSTed as Outlook does, and GET) and an Apple
configuration profile, both listing the servers of the config, as autoconfig does."""

from __future__ import annotations

import plistlib
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.ports import free_port
from tests.support.suite import wait_port
from web.autodiscover import OUTLOOK_SCHEMA, RESPONSE_NS

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[2]
NS = {"a": RESPONSE_NS, "o": OUTLOOK_SCHEMA}
REQUEST = """<?xml version="1.0" encoding="utf-8"?>
<Autodiscover xmlns="http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006">
  <Request>
    <EMailAddress>{address}</EMailAddress>
    <AcceptableResponseSchema>{schema}</AcceptableResponseSchema>
  </Request>
</Autodiscover>
"""


@pytest.fixture
def web(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    conf = tmp_path / "mailroom.toml"
    conf.write_text(
        '[mailroom]\nhostname = "mail.example.org"\ndomains = ["example.org", "example.net"]\n'
        'database = "sqlite:///mailroom.db"\n'
        '[msa]\nsubmission = "127.0.0.1:2587"\nsubmissions = "127.0.0.1:2465"\n'
        '[imap]\nenabled = true\nimap = "127.0.0.1:2143"\nimaps = "127.0.0.1:2993"\npop3s = "127.0.0.1:2995"\n'
        f'[web]\nlisten = "127.0.0.1:{port}"\n'
    )
    with open(tmp_path / "web.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "web", "--config", str(conf)], stdout=log,
                                stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        wait_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(20)


def _post(url: str, body: bytes, content_type: str = "text/xml") -> tuple[int, str, bytes]:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read()


def _get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read()


def _protocols(body: bytes) -> list[tuple[str | None, ...]]:
    root = ET.fromstring(body)
    assert root.tag == f"{{{RESPONSE_NS}}}Autodiscover"
    account = root.find("o:Response/o:Account", NS)
    assert account is not None, body
    assert (account.findtext("o:AccountType", namespaces=NS), account.findtext("o:Action", namespaces=NS)) == (
        "email", "settings")
    return [tuple(p.findtext(f"o:{f}", namespaces=NS) for f in ("Type", "Server", "Port", "SSL", "Encryption",
                                                              "LoginName", "AuthRequired"))
            for p in account.findall("o:Protocol", NS)]


EXPECTED = [
    ("IMAP", "mail.example.org", "2993", "on", None, "alice@example.net", "on"),
    ("IMAP", "mail.example.org", "2143", "on", "TLS", "alice@example.net", "on"),
    ("POP3", "mail.example.org", "2995", "on", None, "alice@example.net", "on"),
    ("SMTP", "mail.example.org", "2465", "on", None, "alice@example.net", "on"),
    ("SMTP", "mail.example.org", "2587", "on", "TLS", "alice@example.net", "on"),
]


@pytest.mark.parametrize("path", ["/autodiscover/autodiscover.xml", "/Autodiscover/Autodiscover.xml"])
def test_outlook_posts_its_request_and_reads_the_servers(web: str, path: str) -> None:
    status, ctype, body = _post(web + path, REQUEST.format(address="Alice@Example.NET", schema=OUTLOOK_SCHEMA)
                                .encode())
    assert status == 200 and ctype.startswith("application/xml"), (status, body)
    assert _protocols(body) == EXPECTED


def test_curl_posts_like_outlook_and_get_asks_the_same(web: str) -> None:
    curl = shutil.which("curl")
    assert curl, "curl is missing: .ci/install-peers installs it"
    r = subprocess.run([curl, "--silent", "--show-error", "--fail", "-H", "Content-Type: text/xml",
                        "--data-binary", REQUEST.format(address="alice@example.net", schema=OUTLOOK_SCHEMA),
                        web + "/autodiscover/autodiscover.xml"], capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert _protocols(r.stdout) == EXPECTED
    status, _, body = _get(web + "/autodiscover/autodiscover.xml?emailaddress=alice%40example.net")
    assert status == 200 and _protocols(body) == EXPECTED


def _error(body: bytes) -> str | None:
    return ET.fromstring(body).findtext("a:Response/a:Error/a:ErrorCode", namespaces=NS)


def test_bad_autodiscover_requests_get_autodiscover_errors_and_refusals(web: str) -> None:
    url = web + "/autodiscover/autodiscover.xml"
    # Not our domain: an error Outlook understands, never another host's settings.
    status, _, body = _post(url, REQUEST.format(address="bob@elsewhere.test", schema=OUTLOOK_SCHEMA).encode())
    assert status == 200 and _error(body) == "600"
    # The schema of ActiveSync (mobilesync) is not served.
    mobilesync = "http://schemas.microsoft.com/exchange/autodiscover/mobilesync/responseschema/2006"
    status, _, body = _post(url, REQUEST.format(address="alice@example.org", schema=mobilesync).encode())
    assert status == 200 and _error(body) == "601"
    status, _, body = _post(url, b"<Autodiscover>no address</Autodiscover>")
    assert status == 200 and _error(body) == "600"
    # An entity bomb is text to it, not XML to expand.
    bomb = ('<?xml version="1.0"?><!DOCTYPE a [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">]>'
            "<Autodiscover><Request><EMailAddress>&b;</EMailAddress></Request></Autodiscover>")
    status, _, body = _post(url, bomb.encode())
    assert status == 200 and _error(body) == "600"
    assert _post(url, b"x" * (16 * 1024 + 1))[0] == 413
    assert _post(web + "/mail/config-v1.1.xml", b"x")[0] == 405  # POST only where a client needs it
    # Without a Content-Length (curl sends chunked when told so).
    r = subprocess.run(["curl", "--silent", "-o", "/dev/null", "-w", "%{http_code}", "-H",
                        "Transfer-Encoding: chunked", "--data-binary", "x", url], capture_output=True, text=True,
                       timeout=30)
    assert r.stdout == "411", r.stdout
    # And it still answers.
    assert _get(web + "/autodiscover/autodiscover.xml?emailaddress=alice%40example.org")[0] == 200


def test_apple_profile_sets_up_the_account(web: str) -> None:
    status, ctype, body = _get(web + "/mail.mobileconfig?emailaddress=alice%40example.net")
    assert status == 200 and ctype == "application/x-apple-aspen-config", (status, body)
    profile = plistlib.loads(body)
    assert profile["PayloadType"] == "Configuration" and profile["PayloadVersion"] == 1
    assert "unverified" in profile["PayloadDescription"].lower()  # unsigned, and it says so
    [account] = profile["PayloadContent"]
    assert account["PayloadType"] == "com.apple.mail.managed"
    assert {k: account[k] for k in (
        "EmailAccountType", "EmailAddress", "IncomingMailServerHostName", "IncomingMailServerPortNumber",
        "IncomingMailServerUseSSL", "IncomingMailServerUsername", "OutgoingMailServerHostName",
        "OutgoingMailServerPortNumber", "OutgoingMailServerUseSSL", "OutgoingMailServerUsername",
        "OutgoingPasswordSameAsIncomingPassword")} == {
        "EmailAccountType": "EmailTypeIMAP", "EmailAddress": "alice@example.net",
        "IncomingMailServerHostName": "mail.example.org", "IncomingMailServerPortNumber": 2993,
        "IncomingMailServerUseSSL": True, "IncomingMailServerUsername": "alice@example.net",
        "OutgoingMailServerHostName": "mail.example.org", "OutgoingMailServerPortNumber": 2465,
        "OutgoingMailServerUseSSL": True, "OutgoingMailServerUsername": "alice@example.net",
        "OutgoingPasswordSameAsIncomingPassword": True,
    }
    assert not any("Password" in k and k != "OutgoingPasswordSameAsIncomingPassword" for k in account)
    # The same profile again: the same identifiers, so it replaces the installed one.
    again = plistlib.loads(_get(web + "/mail.mobileconfig?emailaddress=alice%40example.net")[2])
    assert (again["PayloadUUID"], again["PayloadContent"][0]["PayloadUUID"]) == (
        profile["PayloadUUID"], account["PayloadUUID"])
    # No address, or one that is not ours: the device asks for it.
    for query in ("", "?emailaddress=bob%40elsewhere.test"):
        [anyone] = plistlib.loads(_get(web + "/mail.mobileconfig" + query)[2])["PayloadContent"]
        assert "EmailAddress" not in anyone and "IncomingMailServerUsername" not in anyone
        assert anyone["IncomingMailServerHostName"] == "mail.example.org"
