"""A certificate authority of the test's own: peer MX hosts and policy hosts with real certificates.

`TestCA(folder)` makes a root (and an intermediate, to test chains) and
issues server certificates for host names, written as PEM files a server
loads (`server_context(cert, key)`) and `ca_file` names for the client.
`Issued.der` and `Issued.spki_der` are what TLSA records are computed from;
`tlsa(usage, selector, matching)` writes one record's text.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Issued:
    cert: Path  # PEM chain: the certificate, then its issuers (without the root unless asked)
    key: Path
    der: bytes  # the certificate itself
    spki_der: bytes

    def tlsa(self, usage: int, selector: int, matching: int) -> str:
        return tlsa_text(usage, selector, matching, self.der if selector == 0 else self.spki_der)


def tlsa_text(usage: int, selector: int, matching: int, content: bytes) -> str:
    data = {0: content, 1: hashlib.sha256(content).digest(), 2: hashlib.sha512(content).digest()}[matching]
    return f"{usage} {selector} {matching} {data.hex()}"


def _general_name(name: str) -> x509.GeneralName:
    """A host name, or an IP address (a relayhost named by its address)."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _spki(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


class TestCA:
    __test__ = False  # not a test class, for pytest

    def __init__(self, folder: Path, name: str = "Mailroom Test Root") -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        now = dt.datetime.now(dt.UTC)
        self.root_key = ec.generate_private_key(ec.SECP256R1())
        self.root = self._ca_cert(name, self.root_key, _name(name), self.root_key, now)
        self.inter_key = ec.generate_private_key(ec.SECP256R1())
        self.inter = self._ca_cert(f"{name} Intermediate", self.inter_key, _name(name), self.root_key, now)
        self.ca_file = folder / "ca.pem"
        self.ca_file.write_bytes(self.root.public_bytes(serialization.Encoding.PEM))
        self.root_der = self.root.public_bytes(serialization.Encoding.DER)
        self.root_spki = _spki(self.root_key)
        self.inter_der = self.inter.public_bytes(serialization.Encoding.DER)

    @staticmethod
    def _ca_cert(cn: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name, issuer_key: ec.EllipticCurvePrivateKey,
                 now: dt.datetime) -> x509.Certificate:
        return (
            x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(issuer).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=2)).not_valid_after(now + dt.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
            .sign(issuer_key, hashes.SHA256())
        )

    def issue(self, *names: str, expired: bool = False, with_root: bool = False, label: str = "") -> Issued:
        """A server certificate for `names`, issued by the intermediate; its PEM file
        holds the chain the server sends (leaf, intermediate, and the root if asked)."""
        now = dt.datetime.now(dt.UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        start, end = (now - dt.timedelta(days=30), now - dt.timedelta(days=1)) if expired else (
            now - dt.timedelta(days=1), now + dt.timedelta(days=90))
        cert = (
            x509.CertificateBuilder().subject_name(_name(names[0])).issuer_name(self.inter.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.inter_key.public_key()),
                           critical=False)
            .sign(self.inter_key, hashes.SHA256())
        )
        stem = label or names[0].replace("*", "star")
        cert_path, key_path = self.folder / f"{stem}.pem", self.folder / f"{stem}.key"
        chain = [cert, self.inter] + ([self.root] if with_root else [])
        cert_path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return Issued(cert_path, key_path, cert.public_bytes(serialization.Encoding.DER), _spki(key))


def self_signed(folder: Path, name: str) -> Issued:
    """A certificate no CA vouches for (what anyone in the middle can make)."""
    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name)).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=90))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / f"self-{name}.pem", folder / f"self-{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return Issued(cert_path, key_path, cert.public_bytes(serialization.Encoding.DER), _spki(key))
