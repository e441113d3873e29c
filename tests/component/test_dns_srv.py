"""`mailroom dns DOMAIN` prints the SRV records mail clients look for (RFC 6186, and
_submissions from RFC 8314), with the ports as configured, and ldns (a real zone-file
parser) reads them as written."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.suite import Installation

pytestmark = pytest.mark.timeout(60)


def _srv(inst: Installation) -> dict[str, tuple[int, int, int, str]]:
    r = inst.cli("dns", "example.org")
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if " IN SRV " in line]
    # ldns reads them as a zone file would hold them.
    ldns = shutil.which("ldns-read-zone")
    assert ldns, "ldns-read-zone is missing: .ci/install-peers installs ldnsutils"
    zone = inst.root / "srv.zone"
    zone.write_text("$TTL 3600\nexample.org. IN SOA ns.example.org. hostmaster.example.org. 1 3600 600 86400 60\n"
                    + "\n".join(lines) + "\n")
    parsed = subprocess.run([ldns, str(zone)], capture_output=True, text=True, timeout=30)
    assert parsed.returncode == 0, parsed.stderr
    found = {}
    for line in parsed.stdout.splitlines():
        fields = line.split()
        if fields[3] == "SRV":
            found[fields[0]] = (int(fields[4]), int(fields[5]), int(fields[6]), fields[7])
    return found


def test_dns_prints_the_srv_records_of_the_configured_listeners(tmp_path: Path) -> None:
    inst = Installation(tmp_path / "m")
    inst.set("imap", "enabled", "true")
    p = inst.ports
    assert _srv(inst) == {
        "_submissions._tcp.example.org.": (0, 1, p["submissions"], "mail.test."),
        "_submission._tcp.example.org.": (10, 1, p["submission"], "mail.test."),
        "_imaps._tcp.example.org.": (0, 1, p["imaps"], "mail.test."),
        "_imap._tcp.example.org.": (10, 1, p["imap"], "mail.test."),
        "_pop3s._tcp.example.org.": (20, 1, p["pop3s"], "mail.test."),
    }


def test_a_service_that_is_off_is_published_as_not_available(tmp_path: Path) -> None:
    """RFC 6186 3.4: the target "." says the service is decidedly not offered here."""
    inst = Installation(tmp_path / "m")
    inst.set("imap", "enabled", "true")
    inst.set("imap", "imap", '""')  # no STARTTLS IMAP
    got = _srv(inst)
    assert got["_imap._tcp.example.org."] == (0, 0, 0, ".")
    assert got["_imaps._tcp.example.org."][2] == inst.ports["imaps"]
    inst.set("imap", "enabled", "false")
    got = _srv(inst)
    assert {name: v for name, v in got.items() if re.match(r"_(imap|pop3)", name)} == {
        "_imaps._tcp.example.org.": (0, 0, 0, "."), "_imap._tcp.example.org.": (0, 0, 0, "."),
        "_pop3s._tcp.example.org.": (0, 0, 0, "."),
    }
    assert got["_submission._tcp.example.org."][2] == inst.ports["submission"]
