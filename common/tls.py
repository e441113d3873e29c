"""TLS contexts, the self-signed certificate `mailroom init` makes, and what a certificate says.

Between mail hosts TLS is opportunistic (RFC 3207): a self-signed certificate
still encrypts, and peers do not verify it unless told to.  Submission clients
(mutt, Thunderbird) will ask the user to accept it, or the operator replaces
the files with a real certificate (`mailroom cert request` gets one by ACME).

A certificate changes while the listeners serve (a renewal, then `mailroom
reload`): `ServerTLS` is the one context every listener of a process is
given, and it hands each new handshake the context loaded last (`reload`).
Sessions already in TLS keep the certificate they started with; no listener
closes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from common.config import KEY_TYPES


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


class ServerTLS:
    """The server TLS context of one process, whose certificate can be replaced while it serves.

    Listeners are given `context` once.  OpenSSL calls its SNI callback at the
    start of every handshake, whether or not the client named a server (most
    MTAs do not), and the callback hands the connection the context loaded
    last: so the next handshake uses a new certificate, while a session already
    in TLS keeps its own.  Swapping one Python object is atomic; nothing is locked.
    """

    def __init__(self, cert: Path, key: Path) -> None:
        self.cert, self.key = cert, key
        self._current = server_context(cert, key)
        self.context = server_context(cert, key)
        self.context.sni_callback = self._choose

    def _choose(self, conn: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, initial: ssl.SSLContext) -> None:
        conn.context = self._current

    def reload(self, cert: Path | None = None, key: Path | None = None) -> None:
        """Load the files (again; other paths when given) for the next handshakes.  On an
        error (OSError, ssl.SSLError: unreadable, or a key that does not match) nothing
        changes: the certificate served so far stays."""
        cert, key = cert or self.cert, key or self.key
        fresh = server_context(cert, key)
        self._current, self.cert, self.key = fresh, cert, key


@dataclass(frozen=True)
class CertificateInfo:
    """What `mailroom cert status`, `/metrics` and the renewer need to know of a certificate."""

    names: tuple[str, ...]  # its DNS names (subjectAltName), in order
    issuer: str
    not_before: dt.datetime  # UTC
    not_after: dt.datetime  # UTC
    self_signed: bool
    fingerprint: str  # SHA-256 of the DER, hex: which certificate exactly
    tlsa: str  # "3 1 1 <hex>": DANE-EE, SPKI, SHA-256 (RFC 7671 5.1) of its key

    def renewal_due(self) -> dt.datetime:
        """When two thirds of its lifetime have passed (a 90-day certificate: day 60)."""
        return self.not_before + (self.not_after - self.not_before) * 2 / 3

    def covers(self, names: list[str]) -> bool:
        return {n.lower() for n in names} <= {n.lower() for n in self.names}


def read_certificate(path: Path) -> CertificateInfo:
    """The first (leaf) certificate of a PEM file; OSError or ValueError when it cannot be read."""
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    try:
        alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = tuple(alt.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        names = tuple(str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME))
    return CertificateInfo(
        names=names, issuer=cert.issuer.rfc4514_string(),
        not_before=cert.not_valid_before_utc, not_after=cert.not_valid_after_utc,
        self_signed=cert.issuer == cert.subject,
        fingerprint=cert.fingerprint(hashes.SHA256()).hex(),
        tlsa=tlsa_3_1_1(cert.public_key()),
    )


def tlsa_3_1_1(public: object) -> str:
    """The TLSA record data `3 1 1 <hex>` for a public key (or a PEM private key's public half)."""
    if isinstance(public, bytes):
        private = serialization.load_pem_private_key(public, None)
        public = private.public_key()
    spki = public.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return f"3 1 1 {hashlib.sha256(spki).hexdigest()}"


def new_key(key_type: str) -> bytes:
    """A new private key as PKCS#8 PEM: ECDSA P-256 or RSA 2048 (`KEY_TYPES`)."""
    private: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    if key_type == "rsa-2048":
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif key_type == "ecdsa-p256":
        private = ec.generate_private_key(ec.SECP256R1())
    else:
        raise ValueError(f"unknown key type {key_type!r}; expected one of {', '.join(KEY_TYPES)}")
    return private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def key_type_of(pem: bytes) -> str:
    """"ecdsa-p256", "rsa-2048", or another description for a key of neither type."""
    private = serialization.load_pem_private_key(pem, None)
    if isinstance(private, ec.EllipticCurvePrivateKey):
        return "ecdsa-p256" if isinstance(private.curve, ec.SECP256R1) else f"ecdsa-{private.curve.name}"
    if isinstance(private, rsa.RSAPrivateKey):
        return f"rsa-{private.key_size}"
    return type(private).__name__


def client_context(verify: bool = False) -> ssl.SSLContext:
    """For our own SMTP client: opportunistic TLS does not check the peer's name."""
    ctx = ssl.create_default_context()
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def make_self_signed(cert: Path, key: Path, hostname: str) -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(hostname), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(private, hashes.SHA256())
    )
    cert.parent.mkdir(parents=True, exist_ok=True)
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    os.chmod(key, 0o600)
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
