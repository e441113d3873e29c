"""A throwaway rspamd (Debian package rspamd) on loopback ports, for filter and DKIM interop tests.

It runs Debian's stock configuration with a private LOCAL_CONFDIR whose
override.d moves the normal worker (the HTTP scanner Mailroom asks) and the
controller to free loopback ports, turns the proxy and fuzzy workers off,
points rspamd's DNS at the given test DNS server (so its SPF, DKIM and DMARC
code reads the records the test publishes) and keeps its files in a temporary
folder.  `scan()` posts a message the way an MTA does and returns rspamd's
JSON answer (action, score, symbols).  A missing rspamd fails the test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from tests.support.suite import free_port, wait_port

RSPAMD = "/usr/bin/rspamd"


class RspamdServer:
    def __init__(self, dns: str, *, actions: dict[str, float | str] | None = None) -> None:
        self.dns = dns
        self.actions = actions or {}
        self.dir = Path(tempfile.mkdtemp(prefix="mailroom-rspamd-"))
        self.port = free_port()
        self.controller_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Self:
        if not os.access(RSPAMD, os.X_OK):
            raise AssertionError(f"{RSPAMD} missing: install the Debian package rspamd (.ci/install-peers)")
        d = self.dir
        for sub in ("override.d", "local.d", "db", "run", "log"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        (d / "override.d" / "worker-normal.inc").write_text(f'bind_socket = "127.0.0.1:{self.port}";\ncount = 1;\n')
        (d / "override.d" / "worker-controller.inc").write_text(
            f'bind_socket = "127.0.0.1:{self.controller_port}";\ncount = 1;\n'
        )
        (d / "override.d" / "worker-proxy.inc").write_text("enabled = false;\n")
        (d / "override.d" / "worker-fuzzy.inc").write_text("enabled = false;\n")
        (d / "override.d" / "logging.inc").write_text(
            f'type = "file";\nfilename = "{d}/log/rspamd.log";\nlevel = "info";\n'
        )
        (d / "override.d" / "options.inc").write_text(
            f'dns {{\n  nameserver = ["{self.dns}"];\n  timeout = 1s;\n  retransmits = 1;\n}}\n'
            'local_addrs = [];\n'
        )
        # Everything here comes from loopback, which rspamd would otherwise trust unchecked.
        for module in ("dkim", "spf", "dmarc", "arc"):
            (d / "override.d" / f"{module}.conf").write_text("check_local = true;\ncheck_authed = true;\n")
        if self.actions:
            (d / "override.d" / "actions.conf").write_text(
                "".join(f"{name} = {score};\n" for name, score in self.actions.items())
            )
        cmd = [
            RSPAMD, "-f", "-i", "-c", "/etc/rspamd/rspamd.conf",
            "--var", f"LOCAL_CONFDIR={d}", "--var", f"DBDIR={d}/db", "--var", f"RUNDIR={d}/run",
            "--var", f"LOGDIR={d}/log", "-p", f"{d}/run/rspamd.pid",
        ]
        self._out = open(d / "log" / "stdout.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_port(self.port, timeout=60)
            self._wait_ready()
        except (TimeoutError, AssertionError):
            log = self.log()
            self.stop()
            raise AssertionError(f"rspamd did not start:\n{log[-4000:]}") from None
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError("rspamd exited")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ping", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError("rspamd does not answer /ping")

    def scan(self, message: bytes, *, ip: str, helo: str, mail_from: str, rcpt: str) -> dict[str, Any]:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/checkv2", data=message, method="POST",
            headers={"IP": ip, "Helo": helo, "From": mail_from, "Rcpt": rcpt},
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            return dict(json.loads(r.read()))

    def log(self) -> str:
        parts = []
        for name in ("rspamd.log", "stdout.log"):
            p = self.dir / "log" / name
            if p.exists():
                parts.append(p.read_text(errors="replace"))
        return "\n".join(parts)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        if hasattr(self, "_out"):
            self._out.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
