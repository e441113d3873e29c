"""Hops between hosts: TLS with certificates from the installation's own CA.

On one host the MDA's LMTP listener and the MTA's internal listener are on
loopback or a Unix socket, and trust what they are told (a trace id, a relay
to anywhere).  When several hosts share the work (docs/cluster.md), the queue
manager of an MX host hands mail to the store's MDA, and an MSA may hand
submissions to an MTA on another host.  Those two hops then run over TLS from
the first byte (no plaintext greeting to strip), and both ends prove who they
are with a certificate signed by the installation's own CA (`mailroom cluster
ca`, `mailroom cluster cert NODE`): the server asks for the client's
certificate and takes no other CA, the client checks the server's against
the same CA and the address it dialled.  A client with no certificate, or one
from any other CA, fails the handshake; one whose node is not in
`[cluster] peers` (when that list is given) is refused at the greeting.

This module is the whole of it for both hops: the CA and node certificates,
the two TLS contexts, and the check a listener makes.  A Unix-socket address
of those settings stays as it was: only this host can reach it.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.config import Config
from common.endpoint import Endpoint
from common.smtp.handler import MailSession

# Node certificates serve both ends of a hop: the MTA or MDA as a server, the
# queue manager, MSA or MDA as a client.
_USAGES = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
_DAYS = 3650


@dataclass(frozen=True)
class HopTLS:
    """The contexts of one node, and which peers it takes."""

    server: ssl.SSLContext  # for a guarded listener: asks for and checks the client's certificate
    client: ssl.SSLContext  # for connecting to one: shows ours, checks the server's
    peers: tuple[str, ...] = ()  # node names taken; empty: every certificate the CA signed

    @classmethod
    def from_config(cls, cfg: Config) -> HopTLS | None:
        """The node's contexts from `[cluster]`; None when it is off (no CA).
        OSError or ssl.SSLError when a file cannot be read or does not fit."""
        c = cfg.cluster
        if not c.ca:
            return None
        ca, cert, key = cfg.resolve(c.ca), cfg.resolve(c.cert), cfg.resolve(c.key)
        return cls(server_context(ca, cert, key), client_context(ca, cert, key), tuple(c.peers))

    def guards(self, endpoint: Endpoint) -> bool:
        """Whether that address of a hop's listener speaks TLS with proven peers (TCP: yes)."""
        return not endpoint.is_unix

    def client_for(self, endpoint: Endpoint) -> ssl.SSLContext | None:
        """What a client of that address connects with (implicit TLS), or None (a Unix socket)."""
        return self.client if self.guards(endpoint) else None

    def admits(self, session: MailSession) -> bool:
        """Whether a session on a guarded listener comes from a peer we were told about:
        its certificate passed the handshake (our CA), and names an allowed node."""
        node = node_name(session.peer_certificate)
        return node is not None and (not self.peers or node in self.peers)


def split(
    socks: Sequence[socket.socket], hops: HopTLS | None
) -> tuple[list[socket.socket], list[socket.socket]]:
    """A hop listener's bound sockets as (served as before, guarded by TLS with proven
    peers): with `[cluster]` on, the TCP ones are guarded; a Unix socket never is."""
    if hops is None:
        return list(socks), []
    return [s for s in socks if s.family == socket.AF_UNIX], [s for s in socks if s.family != socket.AF_UNIX]


def node_name(certificate: dict[str, Any] | None) -> str | None:
    """The node a verified peer certificate names (its subject's common name), or None."""
    for rdn in (certificate or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def server_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """TLS 1.3 only (both ends are ours); the client must show a certificate of `ca`, and no other CA counts."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(str(cert), str(key))
    ctx.load_verify_locations(cafile=str(ca))  # not the system's CAs: only ours proves a peer
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """Shows this node's certificate; the server's must be of `ca` and name the address dialled."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(str(cert), str(key))
    ctx.load_verify_locations(cafile=str(ca))
    return ctx


# --- the installation's CA and its node certificates (`mailroom cluster`) ----------------------


def make_ca(cert: Path, key: Path, name: str) -> None:
    """A new CA for the installation: `cert` goes to every node, `key` stays with whoever issues."""
    private = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(private.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
        ), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(private.public_key()), critical=False)
        .sign(private, hashes.SHA256())
    )
    _write(key, _private_pem(private), private=True)
    _write(cert, certificate.public_bytes(serialization.Encoding.PEM))


def issue(ca_cert: Path, ca_key: Path, node: str, names: Sequence[str], cert: Path, key: Path) -> None:
    """A certificate for `node` (its common name), valid for the host names and
    addresses in `names`, which its peers dial (its LMTP or internal listener)."""
    authority = x509.load_pem_x509_certificate(ca_cert.read_bytes())
    signer = serialization.load_pem_private_key(ca_key.read_bytes(), None)
    if not isinstance(signer, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{ca_key}: not the key `mailroom cluster ca` makes")
    private = ec.generate_private_key(ec.SECP256R1())
    alt: list[x509.GeneralName] = []
    for n in dict.fromkeys([node, *names]):
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            alt.append(x509.DNSName(n))
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node)]))
        .issuer_name(authority.subject).public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(_USAGES), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False)
        .sign(signer, hashes.SHA256())
    )
    _write(key, _private_pem(private), private=True)
    _write(cert, certificate.public_bytes(serialization.Encoding.PEM))


def _private_pem(private: ec.EllipticCurvePrivateKey) -> bytes:
    return private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write(path: Path, data: bytes, *, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    if private:
        os.chmod(path, 0o600)  # an older file of another mode keeps its mode through O_TRUNC
