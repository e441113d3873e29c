"""`mailroom` starts fast: building its parser imports no heavy library.

Every command parses its arguments first, and `mailroom --help` does nothing
else; each command imports the heavy libraries it needs (SQLAlchemy,
cryptography, dnspython, argon2...) only when it runs (cli/main.py says why).
Each case runs in a fresh Python: this one has imported everything already.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

# What `import cli.main` used to load through the command modules (alembic, acme
# and requests: never, and they must not start to).
HEAVY = {"sqlalchemy", "alembic", "cryptography", "argon2", "dns", "dkim", "nacl", "authres",
         "publicsuffixlist", "acme", "requests"}
# Mailroom's daemons and the web program: a command that needs one imports it.
DAEMONS = {"mta", "msa", "mda", "web"}

SHOW_IMPORTED = "import sys; print(' '.join(sorted({m.split('.')[0] for m in sys.modules})), file=sys.stderr)"


def imported_by(code: str) -> set[str]:
    """The top-level packages loaded once `code` has run in a new Python."""
    r = subprocess.run([sys.executable, "-c", f"{code}\n{SHOW_IMPORTED}"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return set(r.stderr.split())


def test_importing_the_command_loads_nothing_heavy() -> None:
    loaded = imported_by("import cli.main")
    assert "cli" in loaded
    assert loaded & (HEAVY | DAEMONS) == set()


@pytest.mark.parametrize("argv", [["--help"], ["user", "add", "--help"], ["dkim", "keygen", "--help"],
                                  ["lab", "send", "--help"], ["stop", "nothing"]])
def test_parsing_any_command_line_loads_nothing_heavy(argv: list[str]) -> None:
    loaded = imported_by(f"import contextlib, cli.main\nwith contextlib.suppress(SystemExit): cli.main.main({argv!r})")
    assert loaded & (HEAVY | DAEMONS) == set()


def test_what_a_command_needs_is_seen_when_it_is_loaded() -> None:
    # So that the tests above cannot pass by seeing nothing.
    assert {"sqlalchemy", "argon2"} <= imported_by("import cli.main, common.users")


def test_the_dummy_hash_is_made_at_the_first_password_check_not_at_import() -> None:
    code = """
import argon2
made = []
hash_ = argon2.PasswordHasher.hash
argon2.PasswordHasher.hash = lambda self, *a, **k: made.append(1) or hash_(self, *a, **k)
from common import users
assert not made, "hashed at import"
assert users.verify_hash("$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo", "x") is False
assert len(made) == 1, "a known account's check makes it too, so the first check costs the same for either"
assert users.check_password(None, "x") is False and users.verify_hash(None, "x") is False
assert len(made) == 1, "made once"
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
