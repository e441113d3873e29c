"""The web program's HTTP server, in process on a loopback port: autoconfig and refusals."""

from __future__ import annotations

import asyncio
import socket
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from common import config
from web import server

pytestmark = pytest.mark.timeout(30)


def make_config(tmp_path: Path) -> config.Config:
    path = tmp_path / "mailroom.toml"
    path.write_text(
        '[mailroom]\nhostname = "mail.example.org"\ndomains = ["example.org", "example.net"]\n'
        '[msa]\nsubmission = "127.0.0.1:2587"\nsubmissions = "127.0.0.1:2465"\n'
        '[imap]\nenabled = true\nimap = "127.0.0.1:2143"\nimaps = "127.0.0.1:2993"\npop3s = ""\n'
    )
    return config.load(path)


async def exchange(cfg: config.Config, request: bytes) -> tuple[int, dict[str, str], bytes]:
    sock = socket.create_server(("127.0.0.1", 0))
    sock.setblocking(False)
    port = sock.getsockname()[1]
    srv = await server.serve(cfg, sock)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
        writer.close()
    finally:
        srv.close()
        await srv.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def get(
    cfg: config.Config, target: str, host: str = "mail.example.org", method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    return asyncio.run(exchange(cfg, f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()))


@pytest.mark.parametrize("path", ["/.well-known/autoconfig/mail/config-v1.1.xml", "/mail/config-v1.1.xml"])
def test_autoconfig_lists_the_configured_servers(tmp_path: Path, path: str) -> None:
    status, headers, body = get(make_config(tmp_path), path + "?emailaddress=alice%40example.net")
    assert status == 200 and headers["Content-Type"].startswith("application/xml")
    assert int(headers["Content-Length"]) == len(body)
    root = ET.fromstring(body)
    provider = root.find("emailProvider")
    assert provider is not None and provider.get("id") == "example.net"
    servers = [(s.tag, s.get("type"), s.findtext("hostname"), s.findtext("port"), s.findtext("socketType"))
               for s in provider if s.tag.endswith("Server")]
    assert servers == [
        ("incomingServer", "imap", "mail.example.org", "2993", "SSL"),
        ("incomingServer", "imap", "mail.example.org", "2143", "STARTTLS"),
        ("outgoingServer", "smtp", "mail.example.org", "2465", "SSL"),
        ("outgoingServer", "smtp", "mail.example.org", "2587", "STARTTLS"),
    ]


def test_the_domain_comes_from_the_autoconfig_host_name(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    _, _, body = get(cfg, "/mail/config-v1.1.xml", host="autoconfig.example.net:8025")
    assert ET.fromstring(body).findtext("emailProvider/domain") == "example.net"
    # A domain we do not serve gets the first local domain, never the foreign name.
    _, _, body = get(cfg, "/mail/config-v1.1.xml?emailaddress=x%40elsewhere.example", host="elsewhere.example")
    assert ET.fromstring(body).findtext("emailProvider/domain") == "example.org"


def test_unknown_paths_other_methods_and_garbage_are_refused(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    assert get(cfg, "/etc/passwd")[0] == 404
    status, headers, _ = get(cfg, "/mail/config-v1.1.xml", method="POST")
    assert status == 405 and headers["Allow"] == "GET, HEAD"
    status, headers, body = get(cfg, "/mail/config-v1.1.xml", method="HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0
    assert asyncio.run(exchange(cfg, b"\x16\x03\x01 not http\r\n\r\n"))[0] == 400
    assert asyncio.run(exchange(cfg, b"GET / HTTP/1.1\r\n" + b"X: " + b"a" * 10000 + b"\r\n\r\n"))[0] == 400
