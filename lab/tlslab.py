"""The lab's outbound-TLS Internet: a lab CA, an MTA-STS policy host, and a DNSSEC-signed zone for DANE.

Two scenarios need more than MX hosts (lab/scenarios.py):

- `mta-sts-wrong-cert`: sts.test publishes an MTA-STS policy in `enforce`
  mode, served over HTTPS by the lab's policy host (127.0.0.20, at
  `[outbound_tls] mta_sts_port`) with a certificate from the lab's own CA;
  its MX host presents a certificate from the same CA, but for another name.
  The queue manager trusts the lab CA (`[outbound_tls] ca_file`), so the only
  thing wrong is the name, and the mail must wait.
- `dane`: dane.test is a zone the lab signs itself (dnspython, a new key at
  each start) and serves through a validating resolver, unbound, started here
  on `[lab] dnssec` with that key as its trust anchor; every other lab name it
  asks of the lab's DNS server, unsigned.  The MX host's certificate is
  self-signed, and its key is published in a TLSA record (3 1 1): DANE needs
  no CA.  The queue manager believes unbound's AD bit
  (`[outbound_tls] dnssec_resolvers`).

The CA and certificates live in RUN_DIR/lab/tls and are made once.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import logging
import os
import shutil
import signal
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import dns.dnssec
import dns.dnssectypes
import dns.name
import dns.zone
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger("lab.tls")

WRONG_NAME = "mx.wrong-name.test"  # what the sts.test MX host's certificate names instead of itself
POLICY_PATH = "/.well-known/mta-sts.txt"
SIGNED_ZONE = "dane.test"


@dataclass(frozen=True)
class Files:
    folder: Path

    @property
    def ca(self) -> Path:
        return self.folder / "ca.pem"

    def cert(self, name: str) -> Path:
        return self.folder / f"{name}.pem"

    def key(self, name: str) -> Path:
        return self.folder / f"{name}.key"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def prepare(run_dir: Path, *, names: dict[str, str], self_signed: list[str]) -> Files:
    """The lab CA and the certificates: `names` maps a file name to the name its
    certificate carries (issued by the CA); `self_signed` are names with a
    certificate of their own.  Made once; kept across restarts."""
    files = Files(run_dir / "lab" / "tls")
    files.folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    if not files.ca.exists():
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = (
            x509.CertificateBuilder().subject_name(_name("Mailroom Lab CA")).issuer_name(_name("Mailroom Lab CA"))
            .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        _write_key(files.folder / "ca.key", ca_key)
        files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    ca = x509.load_pem_x509_certificate(files.ca.read_bytes())
    loaded = serialization.load_pem_private_key((files.folder / "ca.key").read_bytes(), None)
    assert isinstance(loaded, ec.EllipticCurvePrivateKey)
    ca_key = loaded
    for stem, dns_name in [*names.items(), *((n, n) for n in self_signed)]:
        if files.cert(stem).exists():
            continue
        key = ec.generate_private_key(ec.SECP256R1())
        issuer, signer = (_name(dns_name), key) if stem in self_signed else (ca.subject, ca_key)
        builder = (
            x509.CertificateBuilder().subject_name(_name(dns_name)).issuer_name(issuer).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=825))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns_name)]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        )
        _write_key(files.key(stem), key)
        files.cert(stem).write_bytes(builder.sign(signer, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    return files


def context(files: Files, stem: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(files.cert(stem)), str(files.key(stem)))
    return ctx


def tlsa_3_1_1(files: Files, stem: str) -> str:
    """The DANE-EE record naming that certificate's key: usage 3, selector 1 (SPKI), SHA-256."""
    cert = x509.load_pem_x509_certificate(files.cert(stem).read_bytes())
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return f"3 1 1 {hashlib.sha256(spki).hexdigest()}"


# --- the MTA-STS policy host ----------------------------------------------------


async def serve_policies(address: str, port: int, tls: ssl.SSLContext, policies: dict[str, str]) -> asyncio.Server:
    """HTTPS on address:port answering GET /.well-known/mta-sts.txt by Host (`policies`: host -> text)."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).decode("iso-8859-1")
            request, *lines = head.split("\r\n")
            path = request.split(" ")[1] if request.count(" ") >= 2 else ""
            host = next((v.strip() for k, _, v in (line.partition(":") for line in lines)
                         if k.strip().lower() == "host"), "").split(":")[0].lower()
            text = policies.get(host) if path == POLICY_PATH else None
            status, body = ("200 OK", text.encode()) if text is not None else ("404 Not Found", b"not here\n")
            log.info("policy host: GET https://%s%s -> %s", host, path, status)
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
                         "Connection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(answer, address, port, ssl=tls, limit=8192)


# --- the signed zone and its validating resolver -------------------------------


def signed_zone(records: dict[str, dict[str, list[str]]], folder: Path) -> tuple[Path, str]:
    """Sign the records under dane.test with a new key: (the zone file, its DS record as a trust anchor)."""
    origin = dns.name.from_text(SIGNED_ZONE)
    lines = [f"@ 60 IN SOA ns.{SIGNED_ZONE}. hostmaster.{SIGNED_ZONE}. 1 3600 600 86400 60",
             f"@ 60 IN NS ns.{SIGNED_ZONE}.", "ns 60 IN A 127.0.0.1"]
    for name, types in records.items():
        if name == SIGNED_ZONE or name.endswith("." + SIGNED_ZONE):
            owner = f"{name}."
            lines += [f"{owner} 60 IN {rdtype} {value}" for rdtype, values in types.items() for value in values]
    zone = dns.zone.from_text("\n".join(lines) + "\n", origin=origin, relativize=False)
    key = ec.generate_private_key(ec.SECP256R1())
    dnskey = dns.dnssec.make_dnskey(key.public_key(), dns.dnssectypes.Algorithm.ECDSAP256SHA256, flags=257)
    dns.dnssec.sign_zone(zone, keys=[(key, dnskey)], lifetime=30 * 86400)
    path = folder / f"{SIGNED_ZONE}.zone"
    path.write_text(zone.to_text(relativize=False))
    return path, f"{SIGNED_ZONE}. IN DS {dns.dnssec.make_ds(origin, dnskey, 'SHA256')}"


def start_resolver(
    address: str, lab_dns: str, zone_file: Path, anchor: str, folder: Path,
) -> subprocess.Popen[bytes] | None:
    """unbound on `address`: the signed zone from its file, everything else of test. from the
    lab's DNS server; None (and one log line) when unbound is not installed."""
    unbound = shutil.which("unbound", path="/usr/sbin:/usr/local/sbin:/usr/bin:/sbin")
    if unbound is None:
        log.warning("unbound is not installed: the DANE scenario has no validating resolver (apt install unbound)")
        return None
    host, _, port = address.rpartition(":")
    dns_host, _, dns_port = lab_dns.rpartition(":")
    (folder / "anchor.ds").write_text(anchor + "\n")
    conf = folder / "unbound.conf"
    conf.write_text(
        "server:\n"
        f"  interface: {host}@{port}\n  port: {port}\n  username: \"\"\n  chroot: \"\"\n"
        f"  directory: \"{folder}\"\n  pidfile: \"\"\n  use-syslog: no\n  logfile: \"\"\n  log-time-ascii: yes\n"
        # Quiet but for validation failures; and no QNAME minimisation, so the lab DNS
        # log shows the questions the queue manager asked, not unbound's probes.
        "  verbosity: 0\n  qname-minimisation: no\n"
        "  num-threads: 1\n  do-ip6: no\n  do-not-query-localhost: no\n  so-reuseport: no\n"
        "  module-config: \"validator iterator\"\n  local-zone: \"test.\" nodefault\n"
        f"  trust-anchor-file: \"{folder / 'anchor.ds'}\"\n  val-log-level: 2\n"
        # The lab's names change with each start: nothing may be served from an old answer for long.
        "  cache-max-ttl: 60\n  cache-max-negative-ttl: 5\n"
        f"auth-zone:\n  name: \"{SIGNED_ZONE}.\"\n  zonefile: \"{zone_file}\"\n  for-upstream: yes\n"
        "  for-downstream: no\n"
        f"stub-zone:\n  name: \"test.\"\n  stub-addr: {dns_host}@{dns_port}\n"
        "remote-control:\n  control-enable: no\n"
    )
    _stop_stale(folder / "unbound.pid", conf)
    process = subprocess.Popen([unbound, "-d", "-c", str(conf)], stdin=subprocess.DEVNULL)
    (folder / "unbound.pid").write_text(f"{process.pid}\n")
    log.info("validating resolver (unbound, pid %d) on %s: %s signed, its key the trust anchor",
             process.pid, address, SIGNED_ZONE)
    return process


def _stop_stale(pid_file: Path, conf: Path) -> None:
    """An unbound an earlier lab process started and could not stop (it was killed): stopped,
    so that the address is free again.  Only a process running our own config file."""
    try:
        pid = int(pid_file.read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return
    if str(conf).encode() in cmdline:
        log.info("stopping the validating resolver an earlier lab left running (pid %d)", pid)
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
            for _ in range(50):
                os.kill(pid, 0)
                time.sleep(0.1)


def stop_resolver(process: subprocess.Popen[bytes] | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(5)
