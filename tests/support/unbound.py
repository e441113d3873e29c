"""A real validating resolver for tests: Debian's unbound, serving zones the test signs itself.

`ValidatingResolver(zones)` writes each zone to a file, signs the ones marked
`signed` with keys made on the spot (`ldns-keygen`, `ldns-signzone` from
ldnsutils), and starts unbound on a free loopback port, answering them from
its `auth-zone`s and validating every answer against the signed zones' own
keys (their DS records as its trust anchors; nothing reaches the Internet):

- a name in a signed zone: answers with the AD bit (secure);
- a name in an unsigned zone: answers without it (insecure, no anchor covers it);
- a zone marked `bogus`: signed, then one record changed after signing, so
  its signature no longer verifies: unbound answers SERVFAIL for that record.

Records are zone-file lines relative to the zone (`"mx A 127.0.0.50"`,
`"@ MX 10 mx"`, `'_mta-sts TXT "v=STSv1; id=1"'`).  `.address` is
"127.0.0.1:PORT", the form of `[dns] nameservers`.  Stopped (by its pid) when
the `with` block ends.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import dns.exception
import dns.flags
import dns.message
import dns.query

from tests.support.peers import require
from tests.support.ports import free_port


@dataclass
class Zone:
    origin: str  # "dane.test"
    records: list[str]
    signed: bool = False
    # (text in a record, what it becomes after signing): its signature no longer verifies
    bogus: tuple[str, str] | None = None
    keys: list[Path] = field(default_factory=list)


class ValidatingResolver:
    def __init__(self, folder: Path, zones: list[Zone]) -> None:
        self.folder = folder
        self.zones = zones
        self.port = free_port("127.0.0.1", udp=True)
        self.address = f"127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ValidatingResolver:
        unbound = require("unbound")
        keygen, signzone = require("ldns-keygen"), require("ldns-signzone")
        self.folder.mkdir(parents=True, exist_ok=True)
        anchors: list[str] = []
        auth: list[str] = []
        for zone in self.zones:
            origin = zone.origin.rstrip(".") + "."
            text = (f"$ORIGIN {origin}\n$TTL 60\n@ IN SOA ns.{origin} hostmaster.{origin} 1 3600 600 86400 60\n"
                    f"@ IN NS ns.{origin}\nns IN A 127.0.0.1\n" + "\n".join(zone.records) + "\n")
            path = self.folder / f"{origin}zone"
            path.write_text(text)
            if zone.signed:
                ksk = self._run([keygen, "-a", "ECDSAP256SHA256", "-k", origin])
                zsk = self._run([keygen, "-a", "ECDSAP256SHA256", origin])
                self._run([signzone, "-f", str(path) + ".signed", str(path), ksk, zsk])
                anchors.append((self.folder / f"{ksk}.ds").read_text().strip())
                path = Path(str(path) + ".signed")
                if zone.bogus is not None:
                    old, new = zone.bogus
                    signed_text = path.read_text()
                    assert old.lower() in signed_text.lower(), f"{old!r} not found in the signed zone"
                    path.write_text(signed_text.replace(old.lower(), new).replace(old.upper(), new))
            auth.append(f'auth-zone:\n  name: "{origin}"\n  zonefile: "{path}"\n  for-upstream: yes\n'
                        "  for-downstream: no\n  fallback-enabled: no\n")
        (self.folder / "anchors.ds").write_text("\n".join(anchors) + "\n")
        conf = self.folder / "unbound.conf"
        # test. is one of unbound's built-in empty zones (RFC 6761): switched off here.
        conf.write_text(
            "server:\n"
            f"  interface: 127.0.0.1@{self.port}\n  port: {self.port}\n"
            f'  username: ""\n  chroot: ""\n  directory: "{self.folder}"\n  pidfile: ""\n'
            f'  use-syslog: no\n  logfile: "{self.folder / "unbound.log"}"\n  verbosity: 1\n  val-log-level: 2\n'
            "  num-threads: 1\n  so-reuseport: no\n  do-ip6: no\n  do-not-query-localhost: no\n"
            '  module-config: "validator iterator"\n  local-zone: "test." nodefault\n'
            f'  trust-anchor-file: "{self.folder / "anchors.ds"}"\n'
            "  harden-dnssec-stripped: yes\n"
            + "".join(auth)
            + "remote-control:\n  control-enable: no\n"
        )
        self.process = subprocess.Popen([unbound, "-d", "-c", str(conf)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, start_new_session=True)
        self._wait_ready()
        return self

    def _run(self, argv: list[str]) -> str:
        done = subprocess.run(argv, cwd=self.folder, check=True, capture_output=True, text=True, timeout=60)
        return done.stdout.strip()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 15
        probe = self.zones[0].origin
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                log = (self.folder / "unbound.log").read_text() if (self.folder / "unbound.log").exists() else ""
                raise AssertionError(f"unbound exited: {err}{log}")
            try:
                q = dns.message.make_query(probe, "SOA")
                r = dns.query.udp(q, "127.0.0.1", port=self.port, timeout=0.5)
                if r.rcode() == 0:
                    return
            except (OSError, dns.exception.Timeout):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"unbound not answering on {self.address}")
            time.sleep(0.1)

    def validated(self, name: str, rdtype: str) -> bool:
        """Whether unbound answers `name` with the AD bit (a check of the fixture itself)."""
        q = dns.message.make_query(name, rdtype, want_dnssec=True)
        q.flags |= dns.flags.AD
        return bool(dns.query.udp(q, "127.0.0.1", port=self.port, timeout=2).flags & dns.flags.AD)

    def log(self) -> str:
        path = self.folder / "unbound.log"
        return path.read_text() if path.exists() else ""

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()
