"""Aliases: `mailroom alias add/list/del` and their expansion (local, outside, catch-all, loops)."""

from __future__ import annotations

import contextlib
import io
import subprocess
from pathlib import Path

import pytest

from cli.main import main as mailroom_main
from mta import aliases
from tests.harness.users import add_user
from tests.support.suite import Installation

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def inst(tmp_path_factory: pytest.TempPathFactory) -> Installation:
    inst = Installation(tmp_path_factory.mktemp("aliases") / "m")
    for user in ("alice@example.org", "bob@example.org"):
        add_user(inst, user)
    return inst


def _cli(inst: Installation, *args: str) -> subprocess.CompletedProcess[str]:
    """`mailroom ARGS` in this process (the real entry point, without a new interpreter)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = mailroom_main(["--config", str(inst.config_path), *args])
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def _expand(inst: Installation, address: str) -> aliases.Expansion | None:
    db = inst.db()
    try:
        with db.read() as s:
            return aliases.expand(s, address, local_domains=["example.org"], delimiter="+")
    finally:
        db.close()


def test_alias_cli_add_list_del(inst: Installation, tmp_path: Path) -> None:
    r = _cli(inst, "alias", "add", "Team@example.org", "alice@example.org", "BOB@example.org", "x@far.test")
    assert r.returncode == 0, r.stderr
    listed = _cli(inst, "alias", "list").stdout.splitlines()
    assert {"team@example.org -> alice@example.org", "team@example.org -> bob@example.org",
            "team@example.org -> x@far.test"} <= set(listed)
    assert _cli(inst, "alias", "add", "team@example.org", "alice@example.org").returncode == 0
    assert _cli(inst, "alias", "list").stdout.count("team@example.org -> alice@example.org") == 1  # no duplicate
    # Only local domains have aliases; targets must be addresses.
    r = _cli(inst, "alias", "add", "x@far.test", "alice@example.org")
    assert r.returncode == 1 and "local domain" in r.stderr
    r = _cli(inst, "alias", "add", "y@example.org", "justaname")
    assert r.returncode == 1 and "full address" in r.stderr
    # del one target, then the rest; deleting what is not there says so.
    assert _cli(inst, "alias", "del", "team@example.org", "x@far.test").returncode == 0
    assert "x@far.test" not in _cli(inst, "alias", "list").stdout
    assert _cli(inst, "alias", "del", "team@example.org").returncode == 0
    assert "team@" not in _cli(inst, "alias", "list").stdout
    r = _cli(inst, "alias", "del", "team@example.org")
    assert r.returncode == 1 and "no such alias" in r.stderr


def test_expansion_local_outside_and_keep_a_copy(inst: Installation) -> None:
    assert _cli(inst, "alias", "add", "sales@example.org", "alice@example.org", "rep@far.test").returncode == 0
    assert _cli(inst, "alias", "add", "bob@example.org", "bob@example.org", "bob@home.test").returncode == 0
    exp = _expand(inst, "sales@example.org")
    assert exp == aliases.Expansion(["alice@example.org"], ["rep@far.test"])
    exp = _expand(inst, "bob+tag@example.org")
    assert exp == aliases.Expansion(["bob@example.org"], ["bob@home.test"])  # a copy kept, one forwarded
    assert _expand(inst, "alice@example.org") == aliases.Expansion(["alice@example.org"], [])
    assert _expand(inst, "nobody@example.org") is None


def test_catch_all_and_nested(inst: Installation) -> None:
    assert _cli(inst, "alias", "add", "all@example.org", "sales@example.org", "bob@example.org").returncode == 0
    exp = _expand(inst, "all@example.org")
    assert exp is not None and sorted(exp.local) == ["alice@example.org", "bob@example.org"]
    assert "rep@far.test" in exp.remote
    assert _expand(inst, "whoever@example.org") is None
    assert _cli(inst, "alias", "add", "@example.org", "alice@example.org").returncode == 0
    try:
        assert _expand(inst, "whoever@example.org") == aliases.Expansion(["alice@example.org"], [])
        # A real user is not swallowed by the catch-all.
        assert _expand(inst, "bob@example.org") == aliases.Expansion(["bob@example.org"], ["bob@home.test"])
    finally:
        assert _cli(inst, "alias", "del", "@example.org").returncode == 0


def test_alias_loops_are_detected(inst: Installation) -> None:
    assert _cli(inst, "alias", "add", "ping@example.org", "pong@example.org").returncode == 0
    assert _cli(inst, "alias", "add", "pong@example.org", "ping@example.org").returncode == 0
    with pytest.raises(aliases.AliasLoop):
        _expand(inst, "ping@example.org")
    # Two branches reaching one user is not a loop.
    assert _cli(inst, "alias", "add", "both@example.org", "alice@example.org", "sales@example.org").returncode == 0
    assert _expand(inst, "both@example.org") == aliases.Expansion(["alice@example.org"], ["rep@far.test"])
