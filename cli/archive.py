"""The backup folder's format: encrypted, content-addressed objects and snapshot manifests.

A backup folder holds

    objects/ab/abcdef...   one piece of one file (at most CHUNK bytes), encrypted
    snapshots/NAME.snap    one snapshot: the list of its files and their pieces, encrypted

An object's name is an HMAC-SHA256 of its plain bytes under a key derived from
the backup key, so the same bytes are stored once however many snapshots (and
files) hold them: a Maildir message, which never changes, costs its space once
for all the backups that follow.  The name is keyed so that it says nothing
about the content to someone without the key (a plain hash would tell which
well-known message a mailbox holds).

Each object and each manifest is compressed (zlib) and then sealed with
AES-256-GCM (authenticated encryption: any changed, cut or swapped byte is
found): `MRB1 | nonce (12) | ciphertext+tag`, with the object's name (or the
snapshot's) as associated data, so an object cannot pass for another.
A manifest also carries, in clear, the id of the key that made it (the first 8
bytes of an HMAC), so a wrong key is told apart from a damaged file.

The backup key is 32 random bytes in a one-line text file
(`mailroom-backup-key-1:BASE64`), made by `mailroom backup init`; the two keys
used here are derived from it with HKDF.  Nothing here touches the mail system:
it reads and writes files in a folder.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MAGIC = b"MRB1"
NONCE = 12
KEY_ID = 8
KEY_PREFIX = "mailroom-backup-key-1:"
CHUNK = 4 * 1024 * 1024  # bytes of a file per object: an mbox that grows keeps its first pieces
_SNAPSHOT_NAME = re.compile(r"^\d{8}T\d{6}Z(?:-\d+)?$")


class ArchiveError(Exception):
    """The backup cannot be read: a wrong key, a damaged or missing file; the text says which."""


@dataclass(frozen=True)
class Key:
    """The backup key and what is derived from it."""

    secret: bytes

    @property
    def _seal(self) -> AESGCM:
        return AESGCM(_derive(self.secret, b"mailroom backup: encryption"))

    @property
    def _names(self) -> bytes:
        return _derive(self.secret, b"mailroom backup: object names")

    @property
    def text(self) -> str:
        """The key file's line."""
        return KEY_PREFIX + base64.b64encode(self.secret).decode() + "\n"

    @property
    def ident(self) -> bytes:
        return hmac.new(self._names, b"key id", hashlib.sha256).digest()[:KEY_ID]

    def object_name(self, data: bytes) -> str:
        return hmac.new(self._names, data, hashlib.sha256).hexdigest()

    def seal(self, data: bytes, label: bytes) -> bytes:
        nonce = secrets.token_bytes(NONCE)
        return MAGIC + nonce + self._seal.encrypt(nonce, zlib.compress(data, 6), label)

    def open(self, sealed: bytes, label: bytes, what: str) -> bytes:
        if len(sealed) < len(MAGIC) + NONCE + 16 or not sealed.startswith(MAGIC):
            raise ArchiveError(f"{what}: not a Mailroom backup file, or cut short")
        nonce = sealed[len(MAGIC):len(MAGIC) + NONCE]
        try:
            return zlib.decompress(self._seal.decrypt(nonce, sealed[len(MAGIC) + NONCE:], label))
        except (InvalidTag, zlib.error):
            raise ArchiveError(f"{what}: damaged or altered (authentication failed)") from None


def _derive(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def new_key_text() -> str:
    return KEY_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode() + "\n"


def read_key(path: Path) -> Key:
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise ArchiveError(f"backup key {path}: {exc.strerror or exc}") from None
    if not text.startswith(KEY_PREFIX):
        raise ArchiveError(f"backup key {path}: not a Mailroom backup key (made by `mailroom backup init`)")
    try:
        secret = base64.b64decode(text[len(KEY_PREFIX):], validate=True)
    except ValueError:
        secret = b""
    if len(secret) != 32:
        raise ArchiveError(f"backup key {path}: damaged (expected 32 bytes of base64)")
    return Key(secret)


# --- the folder --------------------------------------------------------------------


class Folder:
    """A backup folder, for writing (a backup) and reading (a restore, the listing)."""

    def __init__(self, root: Path, key: Key) -> None:
        self.root = root
        self.key = key
        self.objects = root / "objects"
        self.snapshots = root / "snapshots"
        self._touched: set[Path] = set()
        self.new_bytes = 0

    def prepare(self) -> None:
        for d in (self.root, self.objects, self.snapshots):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _object_path(self, name: str) -> Path:
        return self.objects / name[:2] / name

    def put(self, data: bytes) -> str:
        """Store one piece (once: an object of the same name is already these bytes); its name."""
        name = self.key.object_name(data)
        path = self._object_path(name)
        if path.exists():
            return name
        path.parent.mkdir(mode=0o700, exist_ok=True)
        _write_new(path, self.key.seal(data, b"object:" + name.encode()))
        self._touched.add(path.parent)
        self.new_bytes += len(data)
        return name

    def get(self, name: str) -> bytes:
        if not re.fullmatch(r"[0-9a-f]{64}", name):
            raise ArchiveError(f"object {name!r}: not an object name")
        try:
            sealed = self._object_path(name).read_bytes()
        except FileNotFoundError:
            raise ArchiveError(f"object {name}: missing from {self.objects} (the backup is incomplete)") from None
        data = self.key.open(sealed, b"object:" + name.encode(), f"object {name}")
        if not hmac.compare_digest(self.key.object_name(data), name):
            raise ArchiveError(f"object {name}: its content does not match its name")
        return data

    def sync(self) -> None:
        """Make the objects written so far durable (their folders' entries), before a manifest names them."""
        for d in sorted(self._touched):
            _fsync_dir(d)
        self._touched.clear()
        _fsync_dir(self.objects)

    def write_snapshot(self, name: str, manifest: dict[str, Any]) -> Path:
        sealed = self.key.seal(json.dumps(manifest, separators=(",", ":")).encode(), b"snapshot:" + name.encode())
        path = self.snapshots / f"{name}.snap"
        _write_new(path, MAGIC + self.key.ident + sealed)
        _fsync_dir(self.snapshots)
        return path

    def read_snapshot(self, path: Path) -> dict[str, Any]:
        name = path.name.removesuffix(".snap")
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ArchiveError(f"{path}: {exc.strerror or exc}") from None
        if not raw.startswith(MAGIC) or len(raw) < len(MAGIC) + KEY_ID:
            raise ArchiveError(f"{path}: not a Mailroom backup snapshot, or cut short")
        ident = raw[len(MAGIC):len(MAGIC) + KEY_ID]
        if ident != self.key.ident:
            raise ArchiveError(f"{path}: made with another backup key (key id {ident.hex()}; "
                               f"the key given is {self.key.ident.hex()})")
        data = self.key.open(raw[len(MAGIC) + KEY_ID:], b"snapshot:" + name.encode(), str(path))
        manifest: dict[str, Any] = json.loads(data)
        return manifest

    def snapshot_paths(self) -> list[Path]:
        """Every snapshot, oldest first."""
        if not self.snapshots.is_dir():
            return []
        return sorted(p for p in self.snapshots.iterdir()
                      if p.suffix == ".snap" and _SNAPSHOT_NAME.match(p.name.removesuffix(".snap")))

    def object_names(self) -> Iterator[Path]:
        if not self.objects.is_dir():
            return
        for sub in self.objects.iterdir():
            if sub.is_dir():
                yield from sub.iterdir()


def _write_new(path: Path, data: bytes) -> None:
    """Write a file whole or not at all: a temporary name, fsync, rename."""
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
