"""Which certificate a listener serves to a new connection: SMTP with STARTTLS, or implicit TLS.

`served(port)` connects as a new client would and returns the leaf certificate
(unverified: what is served, whatever it is); `verified(port, name, roots)`
connects with verification against `roots` (PEM) for `name`, as a sender that
checks (MTA-STS, DANE's PKIX cousins, a mail client) would, and returns the
leaf, or raises ssl.SSLCertVerificationError.
"""

from __future__ import annotations

import smtplib
import socket
import ssl

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from tests.support.suite import tls_client_context

STARTTLS = "starttls"  # SMTP on the 25 and 587 roles
IMPLICIT = "implicit"  # 465, 993, 995, 443: TLS from the first byte


def served(port: int, kind: str = IMPLICIT, *, server_name: str | None = None) -> x509.Certificate:
    return _leaf(port, kind, tls_client_context(), server_name)


def verified(port: int, name: str, roots: bytes, kind: str = IMPLICIT) -> x509.Certificate:
    ctx = ssl.create_default_context(cadata=roots.decode())
    return _leaf(port, kind, ctx, name)


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def names(cert: x509.Certificate) -> list[str]:
    alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return list(alt.get_values_for_type(x509.DNSName))


def _leaf(port: int, kind: str, ctx: ssl.SSLContext, server_name: str | None) -> x509.Certificate:
    if kind == STARTTLS:
        client = smtplib.SMTP("127.0.0.1", port, timeout=15)
        try:
            client._host = server_name  # type: ignore[attr-defined]  # smtplib passes it as SNI to STARTTLS
            client.starttls(context=ctx)
            sock = client.sock
            assert isinstance(sock, ssl.SSLSocket)
            der = sock.getpeercert(binary_form=True)
        finally:
            client.close()
    else:
        with socket.create_connection(("127.0.0.1", port), timeout=15) as raw, \
                ctx.wrap_socket(raw, server_hostname=server_name) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)
