"""`mailroom backup`, `mailroom restore` and `mailroom check` on an installation at rest,
and everything a backup can meet that is not a good day: a changed, cut or missing
file, a wrong key, a folder that is not empty, a disk that is full.

(The backup taken while mail flows, and the restored suite delivering what was
queued, is tests/e2e/test_backup_under_load.py.)
"""

from __future__ import annotations

import datetime as dt
import json
import os
import pwd
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.suite import Installation, _reachable

pytestmark = pytest.mark.timeout(180)

MAILDIR_MESSAGE = b"Return-Path: <x@example.net>\nDelivered-To: alice@example.org\nSubject: one\n\nhello\n"


def _mail(inst: Installation) -> dict[str, bytes]:
    """Mailboxes as the MDA and a reader leave them: Maildir new/ and cur/ (with flags), a
    half-written file in tmp/, an mbox with its journal, a Dovecot index; as the Mailroom user's."""
    root = inst.config.mail_root
    alice = root / "example.org" / "alice"
    for sub in ("new", "cur", "tmp"):
        (alice / sub).mkdir(parents=True, exist_ok=True)
    files = {
        "example.org/alice/new/1700000000.M1R1.mail.test": MAILDIR_MESSAGE,
        "example.org/alice/cur/1700000001.M2R2.mail.test:2,S": MAILDIR_MESSAGE.replace(b"one", b"two"),
        "example.org/alice/dovecot.index.log": b"\x00index\x01",
        "example.org/bob.mbox": b"From a@example.net Mon Dec  1 10:00:00 2026\nSubject: a\n\n>From the start\n\n"
                                b"From b@example.net Mon Dec  1 10:01:00 2026\nSubject: b\n\nbye\n\n",
        "example.org/.bob.mbox.delivered": b"0123abcd 0 60\n",
    }
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    (alice / "tmp" / "1700000002.P1.half").write_bytes(b"Subject: half writ")
    inst.give()
    return files


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def backed_up(installation: Installation) -> Iterator[tuple[Installation, dict[str, bytes]]]:
    files = _mail(installation)
    r = installation.cli("backup", "init")
    assert r.returncode == 0, r.stderr
    assert "mailroom-backup-key-1:" in r.stdout
    r = installation.cli("backup")
    assert r.returncode == 0, r.stderr
    yield installation, files


def _restore(inst: Installation, into: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return inst.cli("restore", str(inst.root / "backup"), "--into", str(into),
                    "--key", str(inst.root / "backup.key"), *extra)


def test_restore_gives_back_the_whole_installation(backed_up: tuple[Installation, dict[str, bytes]],
                                                   tmp_path: Path) -> None:
    inst, files = backed_up
    into = _reachable(tmp_path / "restored")
    r = _restore(inst, into)
    assert r.returncode == 0, r.stdout + r.stderr
    mail = _tree(into / "mail")
    assert mail == files  # the half-written tmp/ file is not there; everything else is, byte for byte
    assert (into / "mail" / "example.org" / "alice" / "tmp").is_dir()
    for rel in ("mailroom.toml", "tls/cert.pem", "tls/key.pem"):
        assert (into / rel).read_bytes() == (inst.root / rel).read_bytes(), rel
    assert sorted(p.name for p in (into / "dkim").iterdir()) == sorted(p.name for p in (inst.root / "dkim").iterdir())
    assert (into / "backup.key").read_bytes() == (inst.root / "backup.key").read_bytes()
    assert (into / "run").is_dir() and not any((into / "run").iterdir())
    assert not (into / "backup").exists()  # the backups are not inside the backup
    users = sqlite3.connect(into / "mailroom.db").execute("SELECT address, store FROM users ORDER BY 1").fetchall()
    assert users == [("alice@example.org", "maildir"), ("bob@example.org", "mbox")]
    if os.getuid() == 0:  # the restored installation is its Mailroom user's, as init leaves one
        owner = pwd.getpwnam(inst.config.mailroom.user).pw_uid
        assert {p.stat().st_uid for p in [into, *into.rglob("*")]} == {owner}
    assert (into / "tls" / "key.pem").stat().st_mode & 0o077 == 0
    # The restored installation answers to its own config.
    listed = subprocess.run([sys.executable, "-m", "cli.main", "--config", str(into / "mailroom.toml"), "user", "list"],
                            capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2], timeout=60)
    assert f"{into}/mail/example.org/alice" in listed.stdout, listed.stdout + listed.stderr


def test_a_second_backup_stores_only_what_is_new(backed_up: tuple[Installation, dict[str, bytes]]) -> None:
    inst, _ = backed_up
    objects = inst.root / "backup" / "objects"
    before = {p.name for p in objects.rglob("*") if p.is_file()}
    again = inst.cli("backup")
    assert again.returncode == 0 and " 0 B new" in again.stdout, again.stdout
    assert {p.name for p in objects.rglob("*") if p.is_file()} == before
    new = inst.config.mail_root / "example.org" / "alice" / "new" / "1700000009.M9R9.mail.test"
    new.write_bytes(b"Subject: three\n\n" + os.urandom(3000).hex().encode())
    inst.give()
    third = inst.cli("backup")
    assert third.returncode == 0
    added = {p.name for p in objects.rglob("*") if p.is_file()} - before
    assert len(added) == 1  # only the new message: the other files were stored already
    status = json.loads((inst.config.run_dir / "backup.json").read_text())
    assert status["ok"] is True and status["new_bytes"] == len(new.read_bytes())


def test_snapshots_are_kept_by_day_and_week(backed_up: tuple[Installation, dict[str, bytes]]) -> None:
    from cli.backup import kept

    paths = [Path(f"{d}T120000Z.snap") for d in
             ("20261101", "20261108", "20261115", "20261122", "20261129", "20261130", "20261201", "20261202")]
    paths.append(Path("20261202T180000Z.snap"))
    now = dt.datetime(2026, 12, 2, 12, tzinfo=dt.UTC).timestamp()  # a Wednesday
    names = [p.name[:15] for p in kept(paths, keep_days=2, keep_weeks=2, now=now)]
    # the newest of today and yesterday, and of this week (Mon 30 Nov) and last week
    assert names == ["20261129T120000", "20261201T120000", "20261202T180000"]


def _one_object(inst: Installation) -> Path:
    return max((p for p in (inst.root / "backup" / "objects").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)


def _refused(inst: Installation, into: Path, text: str, *extra: str) -> None:
    r = _restore(inst, into, *extra)
    assert r.returncode == 1, r.stdout + r.stderr
    assert text in r.stderr and "nothing was restored" in r.stderr, r.stderr
    assert not into.exists() or not any(into.iterdir())
    assert not list(into.parent.glob(f".{into.name}.restoring-*"))  # nothing half-restored left beside it


def test_a_changed_object_is_refused(backed_up: tuple[Installation, dict[str, bytes]], tmp_path: Path) -> None:
    inst, _ = backed_up
    obj = _one_object(inst)
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 0x01
    obj.write_bytes(bytes(data))
    _refused(inst, tmp_path / "restored", "damaged or altered (authentication failed)")


def test_a_cut_object_is_refused(backed_up: tuple[Installation, dict[str, bytes]], tmp_path: Path) -> None:
    inst, _ = backed_up
    obj = _one_object(inst)
    obj.write_bytes(obj.read_bytes()[:-100])
    _refused(inst, tmp_path / "restored", "damaged or altered")


def test_a_missing_object_is_refused(backed_up: tuple[Installation, dict[str, bytes]], tmp_path: Path) -> None:
    inst, _ = backed_up
    _one_object(inst).unlink()
    _refused(inst, tmp_path / "restored", "the backup is incomplete")


def test_a_cut_or_changed_snapshot_is_refused(backed_up: tuple[Installation, dict[str, bytes]],
                                              tmp_path: Path) -> None:
    inst, _ = backed_up
    [snap] = (inst.root / "backup" / "snapshots").iterdir()
    whole = snap.read_bytes()
    snap.write_bytes(whole[: len(whole) // 2])
    _refused(inst, tmp_path / "restored", "damaged or altered")
    snap.write_bytes(whole[:10])
    _refused(inst, tmp_path / "restored", "cut short")
    # Another snapshot's name on it (a swap) does not pass either: the name is authenticated.
    snap.write_bytes(whole)
    snap.rename(snap.with_name("20000101T000000Z.snap"))
    _refused(inst, tmp_path / "restored", "damaged or altered")


def test_a_wrong_key_is_refused(backed_up: tuple[Installation, dict[str, bytes]], tmp_path: Path) -> None:
    inst, _ = backed_up
    other = tmp_path / "other.key"
    from cli.archive import new_key_text

    other.write_text(new_key_text())
    r = inst.cli("restore", str(inst.root / "backup"), "--into", str(tmp_path / "restored"), "--key", str(other))
    assert r.returncode == 1
    assert "made with another backup key" in r.stderr and "nothing was restored" in r.stderr
    assert not (tmp_path / "restored").exists()
    other.write_text("not a key\n")
    r = inst.cli("restore", str(inst.root / "backup"), "--into", str(tmp_path / "restored"), "--key", str(other))
    assert r.returncode == 1 and "not a Mailroom backup key" in r.stderr


def test_restore_only_into_an_empty_folder(backed_up: tuple[Installation, dict[str, bytes]], tmp_path: Path) -> None:
    inst, _ = backed_up
    into = tmp_path / "occupied"
    into.mkdir()
    (into / "precious").write_text("mine")
    r = _restore(inst, into)
    assert r.returncode == 1 and "is not empty" in r.stderr
    assert [p.name for p in into.iterdir()] == ["precious"]
    empty = _reachable(tmp_path / "empty")
    empty.mkdir()
    assert _restore(inst, empty).returncode == 0
    assert (empty / "mailroom.toml").exists()


@pytest.fixture
def small_disk(installation: Installation, tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (mounting needs root, as CI has), the Mailroom user's."""
    where = _reachable(tmp_path / "small")
    where.mkdir()
    owner = pwd.getpwnam(installation.config.mailroom.user)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size=1m,mode=0700,uid={owner.pw_uid},gid={owner.pw_gid}",
                    "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_backup_that_runs_out_of_disk_fails_cleanly(installation: Installation, small_disk: Path) -> None:
    inst = installation
    _mail(inst)
    box = inst.config.mail_root / "example.org" / "alice" / "new"
    for n in range(6):  # random, so it does not compress: 1.5 MiB that cannot fit in 1 MiB
        (box / f"17000001{n:02d}.M{n}R{n}.mail.test").write_bytes(os.urandom(256 * 1024))
    inst.give()
    assert inst.cli("backup", "init").returncode == 0
    r = inst.cli("backup", "--to", str(small_disk / "b"))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "the backup folder is full" in r.stderr and "no snapshot was made" in r.stderr, r.stderr
    assert not list((small_disk / "b" / "snapshots").iterdir())
    assert not list((small_disk / "b").rglob(".tmp-*")) and not list((small_disk / "b").glob(".db-snapshot-*"))
    status = json.loads((inst.config.run_dir / "backup.json").read_text())
    assert status["ok"] is False and "full" in status["error"]
    assert "backup: FAILED" in inst.cli("status").stdout
    # The mail system is untouched, and a backup with room succeeds and says so.
    assert inst.cli("backup").returncode == 0
    assert json.loads((inst.config.run_dir / "backup.json").read_text())["ok"] is True


def test_a_restore_that_runs_out_of_disk_leaves_nothing(installation: Installation, small_disk: Path) -> None:
    inst = installation
    box = inst.config.mail_root / "example.org" / "alice" / "new"
    box.mkdir(parents=True)
    for n in range(6):
        (box / f"17000001{n:02d}.M{n}R{n}.mail.test").write_bytes(os.urandom(256 * 1024))
    inst.give()
    assert inst.cli("backup", "init").returncode == 0
    assert inst.cli("backup").returncode == 0
    r = _restore(inst, small_disk / "restored")
    assert r.returncode == 1 and "No space left on device" in r.stderr and "nothing was restored" in r.stderr
    assert list(small_disk.iterdir()) == []


def test_check_finds_what_a_restore_lost(suite: Installation, tmp_path: Path) -> None:
    """Deliveries recorded in the database must have their files, with the message that was queued."""
    for n in range(3):
        assert suite.submit("alice@example.org", ["alice@example.org", "bob@example.org"],
                            f"Subject: {n}\r\n\r\nbody {n}\r\n".encode())[0] == 250
    box = suite.mailbox("alice@example.org")
    suite.wait_for(lambda: len(list((box / "new").iterdir())) == 3, what="delivery")
    suite.wait_for(lambda: suite.cli("queue", "--json").stdout.strip() == "[]", what="the queue to drain")
    good = suite.cli("check")
    assert good.returncode == 0, good.stdout
    assert "checked 6 deliveries: 6 ok" in good.stdout and "agree" in good.stdout
    first, second = sorted((box / "new").iterdir())[:2]
    first.rename(box / "cur" / (first.name + ":2,S"))  # a reader moved it: still found
    assert suite.cli("check").returncode == 0
    second.write_bytes(second.read_bytes().replace(b"body", b"BODY"))
    mbox = suite.mailbox("bob@example.org")
    mbox.write_bytes(mbox.read_bytes().replace(b"Subject: 2", b"Subject: 7"))
    (box / "cur" / (first.name + ":2,S")).unlink()
    bad = suite.cli("check")
    assert bad.returncode == 1
    lines = bad.stdout.splitlines()
    assert sum(line.startswith("missing ") for line in lines) == 1
    assert sum(line.startswith("different ") for line in lines) == 2, bad.stdout
    assert "disagree" in lines[-1]
