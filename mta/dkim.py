"""DKIM keys and signing (RFC 6376, RFC 8463) of mail leaving our domains.

Each domain has key sets named by a selector; a set is two keys, one RSA-2048
and one Ed25519, stored as `DOMAIN.SELECTOR.rsa.key` and
`DOMAIN.SELECTOR.ed25519.key` in the key folder, readable by their owner only.
Each key is published under its own DNS selector (`SELECTOR-rsa` and
`SELECTOR-ed25519`), because a receiver takes one key from one TXT record: so
a new set can be published and used while the old one is still in DNS.

Signing happens once, when the MTA queues the message, so a retry sends the
same bytes and never signs again.  `From` is over-signed (listed once more
than it occurs), so a second From added on the way breaks the signature.
This module never looks at the network: it signs bytes with files.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from common import headers

log = logging.getLogger("dkim")

ALGORITHMS = ("rsa", "ed25519")
_SIGNATURE_ALGORITHM = {"rsa": b"rsa-sha256", "ed25519": b"ed25519-sha256"}
_KEY_FILE = re.compile(r"^(?P<domain>[a-z0-9.-]+)\.(?P<selector>[a-z0-9-]+)\.(?P<alg>rsa|ed25519)\.key$")
# What is signed: the headers a reader sees and relies on (RFC 6376 5.4.1).
SIGNED_HEADERS = (
    "from", "to", "cc", "subject", "date", "message-id", "reply-to", "sender",
    "in-reply-to", "references", "mime-version", "content-type", "content-transfer-encoding",
    "list-id", "list-unsubscribe",
)


@dataclass(frozen=True)
class Key:
    domain: str
    selector: str  # the key set's name; the DNS selector is dns_selector
    algorithm: str  # "rsa" or "ed25519"
    private: bytes  # PEM (RSA) or the base64 Ed25519 seed, as dkimpy reads them
    mtime: float = 0.0

    @property
    def dns_selector(self) -> str:
        return f"{self.selector}-{self.algorithm}"

    @property
    def dns_name(self) -> str:
        return f"{self.dns_selector}._domainkey.{self.domain}"


def default_selector(now: float | None = None) -> str:
    """`mr202612`: a new name each month, so a rolled key gets a new selector."""
    return "mr" + time.strftime("%Y%m", time.gmtime(now if now is not None else time.time()))


def key_path(key_dir: Path, domain: str, selector: str, algorithm: str) -> Path:
    return key_dir / f"{domain}.{selector}.{algorithm}.key"


def generate(key_dir: Path, domain: str, selector: str) -> list[Key]:
    """Write a new RSA-2048 and Ed25519 key for `domain` under `selector` (owner-only files)."""
    domain = domain.lower().rstrip(".")
    if not re.fullmatch(r"[a-z0-9-]+", selector):
        raise ValueError(f"selector {selector!r}: use letters, digits and '-'")
    key_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(key_dir, 0o700)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_pem = rsa_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    seed = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    keys = [
        Key(domain, selector, "rsa", rsa_pem),
        Key(domain, selector, "ed25519", base64.b64encode(seed)),
    ]
    for k in keys:
        path = key_path(key_dir, domain, selector, k.algorithm)
        if path.exists():
            raise FileExistsError(f"{path} exists: choose another selector")
    for k in keys:
        path = key_path(key_dir, domain, selector, k.algorithm)
        # Created owner-only: the key is never readable by others, not even briefly.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(k.private)
            f.flush()
            os.fsync(f.fileno())
    return keys


def public_record(key: Key) -> str:
    """The TXT record text to publish at key.dns_name."""
    if key.algorithm == "rsa":
        private = serialization.load_pem_private_key(key.private, password=None)
        assert isinstance(private, rsa.RSAPrivateKey)
        der = private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"
    seed = base64.b64decode(key.private)
    public = ed25519.Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return f"v=DKIM1; k=ed25519; p={base64.b64encode(public).decode()}"


def load_keys(key_dir: Path) -> list[Key]:
    """Every key in the folder (files named DOMAIN.SELECTOR.ALG.key)."""
    keys: list[Key] = []
    if not key_dir.is_dir():
        return keys
    for path in sorted(key_dir.iterdir()):
        m = _KEY_FILE.match(path.name)
        if not m:
            continue
        keys.append(Key(m["domain"], m["selector"], m["alg"], path.read_bytes(), path.stat().st_mtime))
    return keys


def signing_keys(keys: list[Key], domain: str, selectors: dict[str, str]) -> list[Key]:
    """The key set `domain` signs with: the configured selector, else the newest set."""
    domain = domain.lower()
    mine = [k for k in keys if k.domain == domain]
    if not mine:
        return []
    chosen = selectors.get(domain)
    if chosen is None:
        chosen = max(mine, key=lambda k: (k.mtime, k.selector)).selector
    return [k for k in mine if k.selector == chosen]


class Signer:
    """The keys of one installation, read once (and again when the folder changes)."""

    def __init__(self, key_dir: Path, selectors: dict[str, str]) -> None:
        self.key_dir = key_dir
        self.selectors = selectors
        self._stamp: float | None = None
        self._keys: list[Key] = []

    def keys_for(self, domain: str) -> list[Key]:
        try:
            stamp = self.key_dir.stat().st_mtime
            if stamp != self._stamp:
                self._keys, self._stamp = load_keys(self.key_dir), stamp
        except FileNotFoundError:
            return []
        except OSError as exc:
            # Unsigned mail still goes out (it may be junked); stuck mail would help nobody.
            log.error("cannot read DKIM keys in %s: %s (they must belong to the mail user)", self.key_dir, exc)
            return []
        return signing_keys(self._keys, domain, self.selectors)

    def sign(self, message: bytes, domain: str) -> bytes:
        """The DKIM-Signature headers (RSA first, then Ed25519) for `message`; b"" without keys."""
        return sign(message, self.keys_for(domain))

    def seal(self, message: bytes, domain: str, authserv_id: str) -> bytes:
        return arc_seal(message, self.keys_for(domain), authserv_id)


def sign(message: bytes, keys: list[Key]) -> bytes:
    out = b""
    for key in sorted(keys, key=lambda k: ALGORITHMS.index(k.algorithm)):
        headers = _present_headers(message)
        include = [h for h in SIGNED_HEADERS if h in headers]
        # Over-sign From: one entry more than there are From fields (RFC 6376 8.15).
        include += ["from"]
        signer = dkim.DKIM(message, linesep=b"\r\n")
        out += signer.sign(
            key.dns_selector.encode(), key.domain.encode(), key.private,
            signature_algorithm=_SIGNATURE_ALGORITHM[key.algorithm],
            include_headers=[h.encode() for h in include],
        )
    return out


def arc_seal(message: bytes, keys: list[Key], authserv_id: str) -> bytes:
    """An ARC set (RFC 8617) for a message we forward; b"" without an RSA key.

    `message` must carry our Authentication-Results (authserv-id `authserv_id`):
    the seal records it, and its arc= result says whether the chain so far held.
    RSA only: Ed25519 ARC is not yet read by the receivers that matter.
    """
    rsa_keys = [k for k in keys if k.algorithm == "rsa"]
    if not rsa_keys:
        return b""
    key = rsa_keys[0]
    include = [h for h in SIGNED_HEADERS if h in _present_headers(message)]
    if "from" not in include:
        return b""
    headers = dkim.arc_sign(
        message, key.dns_selector.encode(), key.domain.encode(), key.private, authserv_id.encode(),
        include_headers=[h.encode() for h in include],
    )
    return b"".join(headers)


def _present_headers(message: bytes) -> set[str]:
    end = message.find(b"\r\n\r\n")
    head = message if end < 0 else message[: end + 2]
    return {m.group(1).decode("ascii").lower() for m in re.finditer(rb"(?m)^([!-9;-~]+):", head)}


def from_domain(message: bytes) -> str | None:
    """The domain of the single From: address, or None (none, several, or unparsable)."""
    return headers.from_domain(message)  # bounded: a stranger's From: is read in linear time


def outgoing_domain(
    message: bytes, *, trusted: bool, recipients: list[str], local_domains: list[str]
) -> str | None:
    """The domain to sign for, when this is mail from one of ours leaving for another domain."""
    if not trusted:
        return None
    if all(r.rsplit("@", 1)[-1].lower() in local_domains for r in recipients):
        return None
    domain = from_domain(message)
    return domain if domain in local_domains else None
