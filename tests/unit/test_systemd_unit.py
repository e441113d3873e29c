"""deploy/mailroom.service is sandboxed: systemd's own analysis rates it OK or better, and it verifies.

`systemd-analyze security --offline=yes` scores a unit file without a running
systemd (0 is perfect, 10 is "UNSAFE"; the plain unit of old scored 9.6).
`systemd-analyze verify` checks every directive, and that ExecStart exists:
the test gives it a stand-in executable at a path of its own.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "mailroom.service"
EXEC = "/opt/mailroom/.venv/bin/mailroom"
GOOD_ENOUGH = ("PERFECT", "SAFE", "OK")


@pytest.fixture
def unit(tmp_path: Path) -> Path:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing (Debian package systemd; .ci/install-peers installs it)")
    stand_in = tmp_path / "mailroom"
    stand_in.write_text("#!/bin/sh\nexit 0\n")
    stand_in.chmod(0o755)
    text = UNIT.read_text()
    assert f"ExecStart={EXEC} run" in text
    out = tmp_path / "mailroom.service"
    out.write_text(text.replace(EXEC, str(stand_in)))
    return out


def test_the_unit_is_rated_ok_or_better_by_systemd_analyze_security(unit: Path) -> None:
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit)],
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for mailroom\.service: (\d+\.\d) (\w+)", r.stdout)
    assert m, r.stdout + r.stderr
    assert m.group(2) in GOOD_ENOUGH and float(m.group(1)) < 5.0, r.stdout


def test_the_unit_verifies(unit: Path) -> None:
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr


def test_the_unit_keeps_only_the_capabilities_binding_and_the_switch_need() -> None:
    caps = re.search(r"^CapabilityBoundingSet=(.*)$", UNIT.read_text(), re.M)
    assert caps
    assert set(caps.group(1).split()) <= {
        "CAP_NET_BIND_SERVICE", "CAP_SETUID", "CAP_SETGID", "CAP_CHOWN", "CAP_FOWNER", "CAP_DAC_OVERRIDE",
    }
    for line in ("NoNewPrivileges=yes", "ProtectSystem=strict", "ReadWritePaths=/srv/mailroom",
                 "ProtectHome=yes", "PrivateTmp=yes", "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
                 "UMask=0077"):
        assert re.search(rf"^{re.escape(line)}$", UNIT.read_text(), re.M), line
