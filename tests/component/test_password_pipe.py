"""`echo PASSWORD | mailroom user add ADDRESS`: the pipe is the password, no --password-stdin needed.

Without a terminal there is nobody to prompt (twice); the command used to end
in getpass's EOFError traceback.  An empty pipe is one line, not a traceback.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from common.users import check_password, find_user
from tests.support.suite import Installation

pytestmark = pytest.mark.timeout(120)


def test_a_password_piped_without_the_flag_is_read_from_the_pipe(tmp_path: Path) -> None:
    inst = Installation(tmp_path / "mailroom")
    r = inst.cli("user", "add", "carol@example.org", stdin="a piped password 42\n")
    assert (r.returncode, r.stderr) == (0, ""), r.stderr
    assert r.stdout.startswith("added carol@example.org (maildir at ")
    r = inst.cli("user", "passwd", "carol@example.org", stdin="another piped one 43\n")
    assert (r.returncode, r.stderr) == (0, ""), r.stderr
    db = inst.db()
    try:
        with db.read() as s:
            user = find_user(s, "carol@example.org")
            assert check_password(user, "another piped one 43") and not check_password(user, "a piped password 42")
    finally:
        db.close()

    r = inst.cli("user", "add", "dave@example.org", stdin="")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "EOFError" not in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and "password" in r.stderr, r.stderr
