"""`mailroom restore FROM --into DIR`: a whole installation back from a backup, or nothing.

FROM is a backup folder (its newest snapshot, or `--snapshot NAME`) or one
snapshot file (`.../snapshots/NAME.snap`).  DIR must be empty or not exist:
a restore never mixes with what is there.  Everything is written to a folder
beside DIR first and checked as it is written: every piece's authentication tag
(AES-GCM) and its name (the HMAC of its bytes), every file's size.  Only when
all of it is there does that folder become DIR, with one rename.  A wrong key,
a changed, cut or missing file, a full disk: the command says which, removes
what it wrote, and DIR stays as it was.

The restored folder is a complete installation: the config (with any path that
pointed outside the old installation folder now pointing inside DIR), the TLS
and DKIM keys, the database (SQLite; a PostgreSQL dump is put beside it, to
load with pg_restore), the mail root, an empty run folder with the SRS secret,
and the backup key used, so it can go on making backups.  Then `mailroom
--config DIR/mailroom.toml check` compares its database and its mailboxes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import sys
from pathlib import Path, PurePosixPath
from typing import Any

from cli.archive import ArchiveError, Folder, Key, read_key
from common import config as configmod


class RestoreError(Exception):
    """The restore cannot be done; the text says why."""


def run(args: argparse.Namespace) -> int:
    try:
        key = _key(args)
        folder, snapshot = _source(Path(args.source).absolute(), key, args.snapshot)
        into = Path(args.into).absolute()
        manifest = folder.read_snapshot(snapshot)
        written = restore(folder, manifest, into, key)
    except (ArchiveError, RestoreError) as exc:
        print(f"mailroom restore: {exc}; nothing was restored", file=sys.stderr)
        return 1
    config = into / manifest["config"]
    print(f"restored snapshot {manifest['name']} of {manifest['hostname']} into {into}: {written} files")
    if manifest["database"]["kind"] == "pg_dump":
        print(f"the database is a PostgreSQL dump: load it into the database the config names with\n"
              f"  pg_restore --no-owner --clean --if-exists --dbname=URL {into / manifest['database']['path']}")
    for setting, value in sorted(manifest.get("relocate", {}).items()):
        print(f"note: {setting} was outside the installation folder; it is now {value!r} in {config}")
    print(f"next: mailroom --config {config} check   (database and mailboxes agree?)")
    print(f"then: mailroom --config {config} run")
    return 0


def _key(args: argparse.Namespace) -> Key:
    if args.key:
        return read_key(Path(args.key))
    try:
        cfg = configmod.load(args.config)
    except configmod.ConfigError:
        raise RestoreError("no --key FILE, and no config (--config) naming a [backup] key") from None
    return read_key(cfg.resolve(cfg.backup.key))


def _source(source: Path, key: Key, name: str | None) -> tuple[Folder, Path]:
    if source.is_file() or source.suffix == ".snap":
        if name:
            raise RestoreError("--snapshot goes with a backup folder, not with a snapshot file")
        return Folder(source.parent.parent, key), source
    folder = Folder(source, key)
    snapshots = folder.snapshot_paths()
    if not source.is_dir() or not snapshots:
        raise RestoreError(f"{source}: no snapshots there (a backup folder has snapshots/ and objects/)")
    if name:
        wanted = folder.snapshots / f"{name.removesuffix('.snap')}.snap"
        if wanted not in snapshots:
            raise RestoreError(f"{source}: no snapshot {name} (`mailroom backup list --to {source}`)")
        return folder, wanted
    return folder, snapshots[-1]


def _safe(rel: str) -> PurePosixPath:
    """A path from the manifest that stays inside the restored folder (the manifest is
    authenticated, but a restore must not write elsewhere even so)."""
    p = PurePosixPath(rel)
    if p.is_absolute() or not p.parts or any(part in ("..", "") for part in p.parts):
        raise RestoreError(f"the snapshot names an unsafe path {rel!r}")
    return p


def restore(folder: Folder, manifest: dict[str, Any], into: Path, key: Key) -> int:
    """Write the snapshot into `into` (absent or empty), all of it or nothing; files written."""
    if into.exists() and (not into.is_dir() or any(into.iterdir())):
        raise RestoreError(f"{into} is not empty: restore into an empty or new folder")
    into.parent.mkdir(parents=True, exist_ok=True)
    stage = into.parent / f".{into.name}.restoring-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(mode=0o700)
    try:
        written = _write_all(folder, manifest, stage, key)
        if into.exists():
            into.rmdir()  # empty, checked above
        os.rename(stage, into)
        _fsync_dir(into.parent)
    except BaseException as exc:
        shutil.rmtree(stage, ignore_errors=True)
        if isinstance(exc, OSError):
            raise RestoreError(f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")) from None
        raise
    _give(into, manifest)
    return written


def _write_all(folder: Folder, manifest: dict[str, Any], stage: Path, key: Key) -> int:
    modes: list[tuple[Path, int]] = []
    for d in manifest["dirs"]:
        path = stage / _safe(d["p"])
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        modes.append((path, int(d["m"])))
    for f in manifest["files"]:
        path = stage / _safe(f["p"])
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            size = 0
            for name in f["c"]:
                data = folder.get(name)  # checked: tag and name
                size += len(data)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            if size != f["s"]:
                raise RestoreError(f"{f['p']}: {size} bytes where the snapshot says {f['s']}")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(path, int(f["m"]) & 0o7777)
    run_dir = stage / _safe(manifest["run_dir"])
    run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if manifest.get("backup_key"):
        key_path = stage / _safe(manifest["backup_key"])
        key_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        key_path.write_text(key.text)
        os.chmod(key_path, 0o600)
    _relocate(stage / _safe(manifest["config"]), manifest.get("relocate", {}))
    if manifest["database"]["kind"] == "sqlite":
        _release_claims(stage / _safe(manifest["database"]["path"]))
    for path, mode in sorted(modes, key=lambda pm: len(pm[0].parts), reverse=True):
        os.chmod(path, mode & 0o7777)
    return len(manifest["files"])


def _release_claims(db: Path) -> None:
    """The snapshot's in-flight deliveries go back to the queue (mta/queue.py, release_restored)."""
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from mta import queue

    engine = create_engine(f"sqlite:///{db}")
    try:
        with Session(engine) as s:
            queue.release_restored(s)
            s.commit()
    finally:
        engine.dispose()


def _relocate(config: Path, settings: dict[str, str]) -> None:
    """Point the settings that named places outside the old installation folder at the restored copies."""
    if not settings:
        return
    text = config.read_text()
    for setting, value in settings.items():
        section, key = setting.split(".", 1)
        line = f'{key} = "{value}"'
        pattern = re.compile(rf"(?m)^(\[{re.escape(section)}\]\n(?:(?!\[).*\n)*?){re.escape(key)}\s*=.*$")
        if pattern.search(text):
            text = pattern.sub(lambda m, line=line: m.group(1) + line, text, count=1)  # type: ignore[misc]
        elif f"[{section}]\n" in text:
            text = text.replace(f"[{section}]\n", f"[{section}]\n{line}\n", 1)
        else:
            text = text.rstrip("\n") + f"\n\n[{section}]\n{line}\n"
    config.write_text(text)


def _give(into: Path, manifest: dict[str, Any]) -> None:
    """As root: the restored installation becomes its config's Mailroom user's, as `mailroom init` leaves it."""
    if os.getuid() != 0:
        return
    import pwd

    try:
        cfg = configmod.load(into / manifest["config"])
        pw = pwd.getpwnam(cfg.mailroom.user)
    except (configmod.ConfigError, KeyError):
        return
    for folder, dirs, files in os.walk(into):
        os.chown(folder, pw.pw_uid, pw.pw_gid)
        for name in dirs + files:
            with contextlib.suppress(FileNotFoundError):
                os.chown(os.path.join(folder, name), pw.pw_uid, pw.pw_gid, follow_symlinks=False)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
