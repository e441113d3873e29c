"""The shared secret of the internal hop, for when the MSA reaches the MTA over TCP.

The MTA's internal listener relays anywhere, signs with our DKIM keys and keeps
the trace id it is given, so only our MSA may use it.  By default it is a Unix
socket in the private run folder (`[mta] internal = "unix:run/internal.sock"`):
the socket file is the Mailroom user's with mode 0600 inside a 0700 folder, and
the MTA also asks the kernel who connected (SO_PEERCRED) and turns away any
other uid.  Where it must be TCP (`internal = "127.0.0.1:10025"`), any local
process can connect, so the MTA takes MAIL only after AUTH PLAIN with this
secret, which the MSA reads from the same installation.

The secret is 256 random bits in `<run_dir>/internal.secret`, mode 0600, made
by whichever daemon needs it first (the MSA and the MTA start together: it is
written to a temporary file and linked into place, so neither reads half of
it).  It travels in the clear over loopback, where only root can watch, and
root can read the file anyway.  To change it, delete the file and restart.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import secrets
from pathlib import Path

FILE = "internal.secret"
# The AUTH identity the MSA gives; only the secret is checked.
LOGIN = "msa"


def load(run_dir: Path) -> str:
    """The installation's internal-hop secret, made (owner-only) on first use."""
    path = run_dir / FILE
    try:
        return _read(path)
    except FileNotFoundError:
        pass
    run_dir.mkdir(parents=True, exist_ok=True)
    temp = run_dir / f".{FILE}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileExistsError):  # never replaces: a file another daemon linked first wins
            os.link(temp, path)
    finally:
        os.unlink(temp)
    return _read(path)


def _read(path: Path) -> str:
    text = path.read_text().strip()
    if len(text) < 32:
        raise ValueError(f"{path}: too short to be the internal hop's secret; delete it and restart")
    return text


def matches(given: str, secret: str) -> bool:
    """Whether `given` is the secret (in constant time: no timing tells how much was right)."""
    return bool(secret) and hmac.compare_digest(given.encode(), secret.encode())
