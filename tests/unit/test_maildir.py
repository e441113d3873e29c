"""Maildir writing (mda/maildir.py) and its Maildir++ quota (mda/quota.py), on real files."""

from __future__ import annotations

import errno
import os
import shutil
import time
from pathlib import Path

import pytest

from common.log import new_trace_id, trace_time_us
from mda import maildir, quota

pytestmark = pytest.mark.timeout(10)


def test_unique_name_is_deterministic_per_delivery_and_safe() -> None:
    trace = new_trace_id()
    a = maildir.unique_name(trace, "alice@example.org", "mail.test")
    assert a == maildir.unique_name(trace, "alice@example.org", "mail.test")
    assert a != maildir.unique_name(trace, "bob@example.org", "mail.test")
    assert a != maildir.unique_name(new_trace_id(), "alice@example.org", "mail.test")
    micros = trace_time_us(trace)
    assert a.startswith(f"{micros // 1_000_000}.M{micros % 1_000_000:06d}R")
    odd = maildir.unique_name(trace, "a@b", "host/with:colon")
    assert "/" not in odd and ":" not in odd and odd.endswith(".host\\057with\\072colon")


def test_deliver_links_into_new_and_leaves_tmp_empty(tmp_path: Path) -> None:
    box = tmp_path / "box"
    old = os.umask(0o077)  # the MDA's (common/privileges.py)
    try:
        path, stored = maildir.deliver(box, b"Subject: x\n\nbody\n", "1.M1R1.host")
    finally:
        os.umask(old)
    assert stored and path == box / "new" / "1.M1R1.host"
    assert path.read_bytes() == b"Subject: x\n\nbody\n"
    assert list((box / "tmp").iterdir()) == [] and list((box / "cur").iterdir()) == []
    assert oct(path.stat().st_mode & 0o777) == "0o600"


@pytest.mark.parametrize("how", ["unnamed", "refused", "named"])
def test_the_file_in_tmp_unnamed_or_named_ends_in_new_whole_and_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str,
) -> None:
    # Linux: an unnamed O_TMPFILE file linked through /proc/self/fd.  A filesystem
    # that refuses O_TMPFILE, or no /proc: a named file in tmp/, as qmail does.
    box = tmp_path / "box"
    opened: list[int] = []
    real_open = os.open

    def watch_open(path: os.PathLike[str] | str, flags: int, mode: int = 0o777) -> int:
        unnamed = flags & os.O_TMPFILE == os.O_TMPFILE
        opened.append(unnamed)
        if unnamed and how == "refused":
            raise OSError(errno.EOPNOTSUPP, "not on this filesystem")
        return real_open(path, flags, mode)

    monkeypatch.setattr(maildir.os, "open", watch_open)
    monkeypatch.setattr(maildir, "_unnamed_tmp", how != "named")
    path, stored = maildir.deliver(box, b"Subject: x\n\nbody\n", "1.M1R1.host")
    again, stored_again = maildir.deliver(box, b"other\n", "1.M1R1.host", look_in_cur=False)
    assert stored and not stored_again and again == path
    assert path.read_bytes() == b"Subject: x\n\nbody\n"
    assert os.listdir(box / "tmp") == [] and os.listdir(box / "new") == ["1.M1R1.host"]
    assert (True in opened) == (how != "named")
    assert maildir._unnamed_tmp == (how == "unnamed")  # a refusal is remembered


def test_a_second_delivery_under_the_same_name_stores_nothing(tmp_path: Path) -> None:
    box = tmp_path / "box"
    maildir.deliver(box, b"first\n", "1.M1R1.host")
    path, stored = maildir.deliver(box, b"second\n", "1.M1R1.host")
    assert not stored and path.read_bytes() == b"first\n"
    assert len(list((box / "new").iterdir())) == 1 and list((box / "tmp").iterdir()) == []


def test_clean_tmp_removes_only_files_older_than_36_hours(tmp_path: Path) -> None:
    box = tmp_path / "box"
    maildir.ensure(box)
    now = time.time()
    ages = {"old": 36 * 3600 + 1, "young": 36 * 3600 - 60, "new": 0}
    for name, age in ages.items():
        p = box / "tmp" / name
        p.write_bytes(b"x")
        os.utime(p, (now - age, now - age))
    read_recently = box / "tmp" / "read"  # written long ago but read an hour ago: in use
    read_recently.write_bytes(b"x")
    os.utime(read_recently, (now - 3600, now - 40 * 3600))
    (box / "tmp" / "adir").mkdir()
    os.utime(box / "tmp" / "adir", (now - 40 * 3600, now - 40 * 3600))
    assert maildir.clean_tmp(box, now) == 1
    assert sorted(p.name for p in (box / "tmp").iterdir()) == ["adir", "new", "read", "young"]
    assert maildir.clean_tmp(tmp_path / "missing", now) == 0


# --- quota ------------------------------------------------------------------------------


def test_no_quota_keeps_no_maildirsize(tmp_path: Path) -> None:
    box = tmp_path / "box"
    maildir.deliver(box, b"x" * 100, "1.M1R1.host")
    assert not (box / quota.SIZE_FILE).exists()


def test_quota_counts_without_scanning_and_refuses_what_does_not_fit(tmp_path: Path) -> None:
    box = tmp_path / "box"
    for i in range(3):
        maildir.deliver(box, b"x" * 300, f"{i}.M1R1.host", quota_limit=1000)
    assert (box / quota.SIZE_FILE).read_text() == "1000S\n0 0\n300 1\n300 1\n300 1\n"
    # A message planted behind the MDA's back is not seen: the running total is trusted.
    (box / "cur" / "planted:2,S").write_bytes(b"y" * 500)
    assert quota.maildir_usage(box, 1000)[0] == 900
    maildir.deliver(box, b"x" * 100, "3.M1R1.host", quota_limit=1000)  # exactly full
    with pytest.raises(quota.QuotaExceeded):
        maildir.deliver(box, b"x", "4.M1R1.host", quota_limit=1000)
    assert len(list((box / "new").iterdir())) == 4 and list((box / "tmp").iterdir()) == []


def test_quota_is_recounted_when_the_limit_changes_or_the_file_grows(tmp_path: Path) -> None:
    box = tmp_path / "box"
    maildir.ensure(box)
    (box / "new" / "a").write_bytes(b"x" * 200)
    (box / ".Sent" / "cur").mkdir(parents=True)
    (box / ".Sent" / "cur" / "b:2,S").write_bytes(b"x" * 50)  # Maildir++ folders share the quota
    (box / quota.SIZE_FILE).write_text("1000S\n999 1\n")
    assert quota.maildir_usage(box, 1000)[0] == 999
    assert quota.maildir_usage(box, 2000)[0] == 250  # new limit: recounted
    assert (box / quota.SIZE_FILE).read_text() == "2000S\n250 2\n"
    (box / quota.SIZE_FILE).write_text("2000S\n" + "1 1\n" * 1400)  # > 5120 bytes
    assert quota.maildir_usage(box, 2000)[0] == 250
    (box / quota.SIZE_FILE).write_text("2000S\nnonsense\n")
    assert quota.maildir_usage(box, 2000)[0] == 250


def test_a_stale_full_total_is_recounted_before_refusing(tmp_path: Path) -> None:
    box = tmp_path / "box"
    maildir.ensure(box)
    (box / quota.SIZE_FILE).write_text("1000S\n900 3\n")  # the reader deleted those three
    with pytest.raises(quota.QuotaExceeded):
        quota.check_maildir(box, 1000, 200)  # fresh figure: trusted
    old = time.time() - quota.STALE_OVER_QUOTA - 5
    os.utime(box / quota.SIZE_FILE, (old, old))
    quota.check_maildir(box, 1000, 200)  # old figure: recounted (0 bytes), fits
    assert (box / quota.SIZE_FILE).read_text() == "1000S\n0 0\n"


def test_a_quota_removed_and_set_again_starts_from_a_fresh_count(tmp_path: Path) -> None:
    box = tmp_path / "box"
    maildir.deliver(box, b"x" * 300, "0.M1R1.host", quota_limit=1000)
    maildir.deliver(box, b"x" * 300, "1.M1R1.host", quota_limit=0)  # unlimited meanwhile
    assert not (box / quota.SIZE_FILE).exists()
    maildir.deliver(box, b"x" * 300, "2.M1R1.host", quota_limit=1000)
    assert quota.maildir_usage(box, 1000)[0] == 900
    with pytest.raises(quota.QuotaExceeded):
        maildir.deliver(box, b"x" * 300, "3.M1R1.host", quota_limit=1000)


def test_a_retry_finds_a_copy_a_reader_moved_to_cur(tmp_path: Path) -> None:
    box = tmp_path / "Maildir"
    name = maildir.unique_name("0192F3A1B2C3D4E5F6", "alice@example.org", "mail.test")
    first, stored = maildir.deliver(box, b"Subject: x\n\nhello\n", name)
    assert stored
    moved = box / "cur" / (name + ":2,S")
    first.rename(moved)
    assert maildir.deliver(box, b"Subject: x\n\nhello\n", name, look_in_cur=True) == (moved, False)
    assert sorted(p.name for p in (box / "new").iterdir()) == []
    # A different message whose name starts the same is not taken for it.
    other = name[:-1] + "Z"
    assert maildir.deliver(box, b"Subject: y\n\n", other, look_in_cur=True)[1] is True


def test_a_maildir_removed_behind_our_back_is_made_again(tmp_path: Path) -> None:
    # The MDA remembers which Maildirs have their folders (no stat per delivery);
    # one removed since (by the operator, a reader) must not fail the next delivery.
    box = tmp_path / "box"
    maildir.deliver(box, b"first\n", "1.M1R1.host")
    shutil.rmtree(box)
    path, stored = maildir.deliver(box, b"second\n", "2.M1R1.host")
    assert stored and path.read_bytes() == b"second\n"
    shutil.rmtree(box / "new")  # only new/: the link fails, not the open in tmp/
    path, stored = maildir.deliver(box, b"third\n", "3.M1R1.host")
    assert stored and path.read_bytes() == b"third\n"
    assert list((box / "tmp").iterdir()) == []



def test_a_forked_child_links_its_own_unnamed_file(tmp_path: Path) -> None:
    # /proc/self/fd is opened once per process: a child must not link through its
    # parent's, where its descriptor number names another file (or none).
    box = tmp_path / "box"
    maildir.deliver(box, b"parent\n", "1.M1R1.host")  # the parent has opened its /proc/self/fd
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            path, stored = maildir.deliver(box, b"child\n", "2.M1R2.host")
            code = 0 if stored and path.read_bytes() == b"child\n" else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert (box / "new" / "2.M1R2.host").read_bytes() == b"child\n"
