"""Pebble, Let's Encrypt's ACME test server (Debian package pebble), on loopback ports.

`Pebble(http_port=..., dns=...)` writes pebble's config JSON and starts
`/usr/bin/pebble -config FILE -dnsserver DNS` in a temporary folder:

- pebble's own HTTPS (the ACME API) uses a certificate for 127.0.0.1 and
  localhost signed by a small test CA made here; `ca_file` is that CA's PEM,
  which the client under test trusts through `[acme] directory_ca_file`;
- HTTP-01 challenges are validated by connecting to `http_port` (pebble's
  `httpPort`) on the address pebble resolves the name to, through the DNS
  server `dns` ("127.0.0.1:PORT", tests/support/dns_server.py), so the test maps
  each name it asks a certificate for to 127.0.0.1;
- `PEBBLE_VA_NOSLEEP=1` (no random wait before validating) and
  `PEBBLE_WFE_NONCEREJECT=0` (no nonces rejected at random: the client's retry
  of a bad nonce is the library's, not ours to test) keep runs quick and steady.

`directory` is the ACME directory URL; `roots()` fetches the root certificate
that pebble signs with (new at every start), so a test can verify what it issued.

A missing pebble fails the test (tests/support/peers.require), never skips it.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Self

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support.peers import require, wait_for_port
from tests.support.ports import free_port


def make_ca(folder: Path, name: str = "Mailroom test CA") -> tuple[Path, Path]:
    """A self-signed CA certificate and key in `folder`: (cert, key) paths."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
        ), critical=True)
        .sign(key, hashes.SHA256())
    )
    return _write(folder, "ca", cert, key)


def issue(
    folder: Path, stem: str, ca: tuple[Path, Path], names: list[str], *, days: int = 30,
    not_before: dt.datetime | None = None, key: ec.EllipticCurvePrivateKey | None = None,
) -> tuple[Path, Path]:
    """A server certificate for `names` (DNS names or IP addresses) signed by `ca`: (cert, key),
    valid `days` from `not_before` (default: five minutes ago), with `key` or a new one."""
    ca_cert = x509.load_pem_x509_certificate(ca[0].read_bytes())
    ca_key = serialization.load_pem_private_key(ca[1].read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = key or ec.generate_private_key(ec.SECP256R1())
    alt: list[x509.GeneralName] = []
    for n in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            alt.append(x509.DNSName(n))
    start = not_before or dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    return _write(folder, stem, cert, key)


def _write(folder: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / f"{stem}.pem", folder / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ))
    key_path.chmod(0o600)
    return cert_path, key_path


class Pebble:
    """pebble in a subprocess; a context manager that stops it and removes its folder."""

    def __init__(self, *, http_port: int, dns: str, tls_port: int | None = None, start_timeout: float = 20.0) -> None:
        self.binary = require("pebble")
        self.http_port = http_port
        self.tls_port = tls_port or free_port()
        self.dns = dns
        self.port = free_port()
        self.management_port = free_port()
        self.start_timeout = start_timeout
        self.dir = Path(tempfile.mkdtemp(prefix="mailroom-pebble-"))
        self.ca_file, self.ca_key = make_ca(self.dir, "pebble's HTTPS test CA")
        self._https = issue(self.dir, "https", (self.ca_file, self.ca_key), ["127.0.0.1", "localhost"])
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.dir / "pebble.log"

    @property
    def directory(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def start(self) -> Self:
        config = {
            "pebble": {
                "listenAddress": f"127.0.0.1:{self.port}",
                "managementListenAddress": f"127.0.0.1:{self.management_port}",
                "certificate": str(self._https[0]),
                "privateKey": str(self._https[1]),
                "httpPort": self.http_port,
                "tlsPort": self.tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": False,
            }
        }
        conf = self.dir / "pebble-config.json"
        conf.write_text(json.dumps(config))
        env = {**os.environ, "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0"}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [self.binary, "-config", str(conf), "-dnsserver", self.dns],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.dir, start_new_session=True,
            )
        try:
            wait_for_port(self.port, self.start_timeout)
            wait_for_port(self.management_port, self.start_timeout)
        except TimeoutError:
            self.stop()
            raise AssertionError(f"pebble did not start:\n{self.log()}") from None
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _get(self, port: int, path: str) -> bytes:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        with urllib.request.urlopen(f"https://127.0.0.1:{port}{path}", context=ctx, timeout=10) as r:
            body: bytes = r.read()
            return body

    def roots(self) -> bytes:
        """PEM of the root pebble issues under (with its intermediate, as a trust bundle)."""
        return self._get(self.management_port, "/roots/0") + self._get(self.management_port, "/intermediates/0")

    def stop(self) -> None:
        if self.proc is not None:
            proc, self.proc = self.proc, None
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def wait_until(predicate: object, timeout: float = 20.0, what: str = "condition") -> float:
    """Poll `predicate()` until true; returns the seconds it took (AssertionError on timeout)."""
    assert callable(predicate)
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
