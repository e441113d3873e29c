"""`mailroom cert request | renew [--force] [--new-key] | status`: the certificate every listener serves.

The certificate and its key are the `[tls] cert` and `[tls] key` files that
the MTA, the MSA, the web program and Dovecot all read.  `request` asks the
ACME server (`[acme] directory`) for one naming `[mailroom] hostname` and, for
each local domain, `mta-sts.DOMAIN` and `autoconfig.DOMAIN` (the names the web
program answers for); `renew` asks again when two thirds of its lifetime have
passed (`--force`: now).  Both write the files only once the new chain is in
hand, then tell the running daemons to reload (`mailroom reload`): new
connections get the new certificate, sessions in progress keep theirs.

**The key and DANE.**  A TLSA `3 1 1` record (RFC 7672) names the key, not the
certificate, so renewal keeps the key and the record stays true.  To change
keys without a moment where the record is false, a *next* key waits in
`[acme] dir`/next-key.pem from the first request on; `mailroom dns` prints a
TLSA record for it beside the current one, and `renew --new-key` (once both
records have been published for a few TTLs) moves to it and makes the next one.

Files (`[acme] dir`, owner-only, the Mailroom user's): `account.key` (the ACME
account), `next-key.pem`, `issued.json` (the fingerprint of the certificate
ACME gave us: the renewer renews that one only, never a certificate the
operator put in place by hand), `last-attempt.json` (the outcome of the last
attempt, for `status` and the renewer's back-off), `challenges/` (HTTP-01
answers while an order is open) and `lock` (one order at a time, whether from
this command or the renewer).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from common import config as configmod
from common import privileges
from common.tls import CertificateInfo, key_type_of, new_key, read_certificate, tlsa_3_1_1

if TYPE_CHECKING:
    from cli import acme_order

# cli.acme_order (the acme library, requests) is loaded only by the commands that talk to
# the server: `status`, `mailroom status` and the renewer's schedule do without it.


# --- what the files are --------------------------------------------------------


@dataclass(frozen=True)
class Files:
    cert: Path
    key: Path
    acme_dir: Path

    @classmethod
    def of(cls, cfg: configmod.Config) -> Files:
        return cls(cfg.resolve(cfg.tls.cert), cfg.resolve(cfg.tls.key), cfg.resolve(cfg.acme.dir))

    @property
    def account_key(self) -> Path:
        return self.acme_dir / "account.key"

    @property
    def next_key(self) -> Path:
        return self.acme_dir / "next-key.pem"

    @property
    def issued(self) -> Path:
        return self.acme_dir / "issued.json"

    @property
    def last_attempt(self) -> Path:
        return self.acme_dir / "last-attempt.json"


def wanted_names(cfg: configmod.Config) -> list[str]:
    """The host name, then mta-sts.DOMAIN and autoconfig.DOMAIN for each local domain."""
    names = [cfg.mailroom.hostname.lower().rstrip(".")]
    for domain in cfg.mailroom.domains:
        names += [f"mta-sts.{domain}", f"autoconfig.{domain}"]
    return list(dict.fromkeys(names))


def acme_server(cfg: configmod.Config) -> acme_order.Server:
    from cli import acme_order

    files = Files.of(cfg)
    ca = cfg.acme.directory_ca_file
    return acme_order.Server(
        directory=cfg.acme.directory, ca_file=cfg.resolve(ca) if ca else None, email=cfg.acme.email,
        account_key=files.account_key, challenges=files.acme_dir / "challenges",
    )


def issued_by_acme(files: Files, info: CertificateInfo) -> bool:
    """Is the certificate in [tls] cert the one ACME last gave us?"""
    try:
        return bool(json.loads(files.issued.read_text()).get("fingerprint") == info.fingerprint)
    except (OSError, ValueError):
        return False


def last_attempt(files: Files) -> dict[str, object]:
    try:
        data = json.loads(files.last_attempt.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# --- getting one ------------------------------------------------------------------


@dataclass(frozen=True)
class Issued:
    info: CertificateInfo
    new_key: bool  # the key changed (a first key of this type, or --new-key)
    seconds: float  # how long the ACME exchange took


def issue(cfg: configmod.Config, *, rollover: bool = False) -> Issued:
    """Get a certificate for `wanted_names` and put it and its key in place;
    acme_order.ACMEError (files untouched) when the server will not give one."""
    from cli import acme_order

    files = Files.of(cfg)
    owner = _owner(cfg)
    _private_dir(files.acme_dir, owner)
    # Made here rather than by the library's glue, so that they are the Mailroom user's:
    # the web program, which reads the challenges, serves as that user.
    _private_dir(files.acme_dir / "challenges", owner)
    if not files.account_key.exists():
        _write_private(files.account_key, new_key("ecdsa-p256"), owner)
    with _locked(files.acme_dir / "lock"):
        key_pem, changed = _choose_key(cfg, files, rollover=rollover)
        names = wanted_names(cfg)
        started = time.monotonic()
        try:
            chain = acme_order.obtain(acme_server(cfg), names, key_pem)
        except acme_order.ACMEError as exc:
            _record_attempt(files, owner, ok=False, error=str(exc), retry_after=exc.retry_after)
            raise
        seconds = time.monotonic() - started
        if changed:
            _write_private(files.key, key_pem, owner)
        _write_private(files.cert, chain.encode(), owner, mode=0o644)
        info = read_certificate(files.cert)
        if changed:
            # The next key is now the current one: make a new next key to publish.
            _write_private(files.next_key, new_key(cfg.acme.key_type), owner)
        _write_private(files.issued, json.dumps({
            "fingerprint": info.fingerprint, "names": names, "directory": cfg.acme.directory,
            "issued": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }).encode(), owner)
        _record_attempt(files, owner, ok=True, error="", retry_after=None)
        return Issued(info, changed, seconds)


def _choose_key(cfg: configmod.Config, files: Files, *, rollover: bool) -> tuple[bytes, bool]:
    """(key, whether it differs from the one in [tls] key).  Renewal keeps the key, so a
    TLSA 3 1 1 record stays true; a new key comes from next-key.pem, published beforehand."""
    wanted = cfg.acme.key_type
    owner = _owner(cfg)
    if not _usable(files.next_key, wanted):
        _write_private(files.next_key, new_key(wanted), owner)
    current = files.key.read_bytes() if _usable(files.key, wanted) else None
    if current is not None and not rollover:
        return current, False
    return files.next_key.read_bytes(), True


def _usable(path: Path, key_type: str) -> bool:
    try:
        return key_type_of(path.read_bytes()) == key_type
    except (OSError, ValueError, TypeError):
        return False


def _record_attempt(files: Files, owner: privileges.Account | None, *, ok: bool, error: str,
                    retry_after: float | None) -> None:
    _write_private(files.last_attempt, json.dumps({
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "ok": ok, "error": error,
        "retry_after": retry_after,
    }).encode(), owner)


def _owner(cfg: configmod.Config) -> privileges.Account | None:
    """As root: the Mailroom user, who must own what the daemons read after dropping root."""
    if os.getuid() != 0:
        return None
    try:
        return privileges.account(cfg)
    except privileges.StartError:
        return None


def _private_dir(path: Path, owner: privileges.Account | None) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    if owner is not None:
        os.chown(path, owner.uid, owner.gid)


def _write_private(path: Path, data: bytes, owner: privileges.Account | None, *, mode: int = 0o600) -> None:
    """Replace `path` at once (a reader sees the old file or the new one, never half of it),
    owner-only unless `mode` says otherwise, owned by the Mailroom user when we are root."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        if owner is not None:
            os.chown(tmp, owner.uid, owner.gid)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):
        dirfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# --- the commands -------------------------------------------------------------------


def due(cfg: configmod.Config) -> tuple[dt.datetime | None, str]:
    """When the renewer should renew, and why: None when it has nothing to renew (no ACME
    certificate yet, or one the operator put there by hand)."""
    files = Files.of(cfg)
    try:
        info = read_certificate(files.cert)
    except (OSError, ValueError) as exc:
        return None, f"cannot read {files.cert}: {exc}"
    if not issued_by_acme(files, info):
        return None, f"{files.cert} was not issued by ACME here (`mailroom cert request` gets one)"
    if not info.covers(wanted_names(cfg)):
        missing = sorted(set(wanted_names(cfg)) - {n.lower() for n in info.names})
        return dt.datetime.now(dt.UTC), f"the certificate does not name {', '.join(missing)}"
    if not _usable(files.key, cfg.acme.key_type):
        return dt.datetime.now(dt.UTC), f"the key is not {cfg.acme.key_type}"
    return info.renewal_due(), f"two thirds of its lifetime pass at {_when(info.renewal_due())}"


def cmd_request(cfg: configmod.Config, *, rollover: bool = False, reload: bool = True) -> int:
    from cli import acme_order

    if not cfg.acme.directory:
        print("mailroom cert: [acme] directory is empty: name the ACME server's directory URL "
              "(https://acme-v02.api.letsencrypt.org/directory)", file=sys.stderr)
        return 1
    names = wanted_names(cfg)
    if not cfg.web.http:
        print("note: [web] http is off; the ACME server validates each name over HTTP on port 80, "
              "so something else must serve /.well-known/acme-challenge/ from "
              f"{acme_server(cfg).challenges}", file=sys.stderr)
    print(f"asking {cfg.acme.directory} for {', '.join(names)}", flush=True)
    try:
        got = issue(cfg, rollover=rollover)
    except acme_order.ACMEError as exc:
        print(f"mailroom cert: {exc}; the certificate in {cfg.resolve(cfg.tls.cert)} is unchanged", file=sys.stderr)
        return 1
    except OSError as exc:  # a folder or file this command may not write: said, not a traceback
        print(f"mailroom cert: {exc}; the certificate in {cfg.resolve(cfg.tls.cert)} is unchanged", file=sys.stderr)
        return 1
    info = got.info
    print(f"issued in {got.seconds:.1f}s: {', '.join(info.names)}, valid until {_when(info.not_after)} "
          f"(renewal from {_when(info.renewal_due())})")
    if got.new_key:
        print(f"new key: TLSA {info.tlsa}; publish the next key's record now: `mailroom dns DOMAIN`")
    if reload:
        from cli import supervise

        supervise.reload(cfg)
    return 0


def cmd_renew(cfg: configmod.Config, *, force: bool, rollover: bool, reload: bool) -> int:
    when, why = due(cfg)
    if not (force or rollover):
        if when is None:
            print(f"nothing to renew: {why}")
            return 0
        if when > dt.datetime.now(dt.UTC):
            print(f"not due: {why}")
            return 0
    return cmd_request(cfg, rollover=rollover, reload=reload)


def cmd_status(cfg: configmod.Config) -> int:
    for line in status_lines(cfg):
        print(line)
    return 0


def status_lines(cfg: configmod.Config) -> list[str]:
    files = Files.of(cfg)
    try:
        info = read_certificate(files.cert)
    except (OSError, ValueError) as exc:
        return [f"certificate {files.cert}: cannot read it: {exc}"]
    now = dt.datetime.now(dt.UTC)
    left = info.not_after - now
    source = "ACME" if issued_by_acme(files, info) else ("self-signed" if info.self_signed else "installed by hand")
    lines = [
        f"certificate {files.cert} ({source})",
        f"  names:   {', '.join(info.names) or '-'}",
        f"  issuer:  {info.issuer}",
        f"  expires: {_when(info.not_after)} ({_days(left)})",
    ]
    when, why = due(cfg)
    if cfg.acme.directory:
        lines.append(f"  renewal: {'due now' if when is not None and when <= now else why}")
        missing = sorted(set(wanted_names(cfg)) - {n.lower() for n in info.names})
        if missing:
            lines.append(f"  missing: {', '.join(missing)} (`mailroom cert request` adds them)")
    else:
        lines.append("  renewal: [acme] directory is empty: renewed by hand")
    last = last_attempt(files)
    if last and not last.get("ok"):
        lines.append(f"  last attempt {last.get('time')} failed: {last.get('error')}")
    lines.append(f"  TLSA:    {info.tlsa} (current key)")
    with contextlib.suppress(OSError, ValueError, TypeError):
        lines.append(f"           {tlsa_3_1_1(files.next_key.read_bytes())} (next key)")
    return lines


def expiry_line(cfg: configmod.Config) -> str:
    """One line for `mailroom status`."""
    path = cfg.resolve(cfg.tls.cert)
    try:
        info = read_certificate(path)
    except (OSError, ValueError) as exc:
        return f"certificate {path}: cannot read it: {exc}"
    return (f"certificate {', '.join(info.names[:1]) or path} expires {_when(info.not_after)} "
            f"({_days(info.not_after - dt.datetime.now(dt.UTC))})")


def _when(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%d %H:%M UTC")


def _days(left: dt.timedelta) -> str:
    days = left.total_seconds() / 86400
    return f"expired {-days:.0f} days ago" if days < 0 else f"in {days:.0f} days"


def run(args: argparse.Namespace, cfg: configmod.Config) -> int:
    if args.action == "status":
        return cmd_status(cfg)
    if args.action == "request":
        return cmd_request(cfg, reload=not args.no_reload)
    return cmd_renew(cfg, force=args.force, rollover=args.new_key, reload=not args.no_reload)
