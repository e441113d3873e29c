"""`[web] listen` takes one address or a list, as the daemons' listener settings do.

The web program runs as a real process (`python -m web`) with two loopback
addresses in its setting, and answers the autoconfig request on each; an
address it cannot bind stops it with one line that names the setting.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from common.db import Database
from tests.support.ports import free_port

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[2]
AUTOCONFIG = "/mail/config-v1.1.xml?emailaddress=alice%40example.org"


def _wait(host: str, port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the web program stopped"
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port}")


def _config(tmp_path: Path, listen: str) -> Path:
    db = Database(f"sqlite:///{tmp_path / 'mailroom.db'}", threads=1)
    db.create_schema()  # the daemons make it; the web program only reads
    db.close()
    path = tmp_path / "mailroom.toml"
    path.write_text(
        '[mailroom]\nhostname = "mail.example.org"\ndomains = ["example.org"]\n'
        f'database = "sqlite:///{tmp_path / "mailroom.db"}"\n[web]\nlisten = {listen}\n'
    )
    return path


def test_the_web_program_answers_on_every_address_of_a_list(tmp_path: Path) -> None:
    first, second = ("127.0.0.1", free_port("127.0.0.1")), ("127.0.0.2", free_port("127.0.0.2"))
    path = _config(tmp_path, f'["{first[0]}:{first[1]}", "{second[0]}:{second[1]}"]')
    with open(tmp_path / "web.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "web", "--config", str(path)],
                                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        for host, port in (first, second):
            _wait(host, port, proc)
            with urllib.request.urlopen(f"http://{host}:{port}{AUTOCONFIG}", timeout=10) as r:
                assert r.status == 200, (host, port)
                assert b"<emailProvider" in r.read()
    finally:
        proc.terminate()
        proc.wait(20)
    assert f"http on {first[0]}:{first[1]}, {second[0]}:{second[1]}" in (tmp_path / "web.log").read_text()


def test_an_address_in_use_stops_it_with_one_line_naming_the_setting(tmp_path: Path) -> None:
    taken = socket.create_server(("127.0.0.1", 0))
    try:
        busy = taken.getsockname()[1]
        free = free_port("127.0.0.1")
        path = _config(tmp_path, f'["127.0.0.1:{free}", "127.0.0.1:{busy}"]')
        done = subprocess.run([sys.executable, "-m", "web", "--config", str(path)],
                              capture_output=True, text=True, cwd=ROOT, timeout=30)
    finally:
        taken.close()
    assert done.returncode == 1
    assert done.stderr.strip() == f"web: [web] listen = 127.0.0.1:{busy}: address already in use"
