"""The files Mailroom writes for Dovecot: the users file and dovecot.conf.

The users file must carry the argon2id hash as stored, each user's own mail
location from the users table, and the quota the MDA enforces; a rewrite must
be noticed by Dovecot even within the same second.  The generated dovecot.conf
must be one Dovecot itself accepts (`doveconf -n`, the real parser).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli import dovecot
from cli.main import main
from common import config
from common.db import Database
from common.models import User
from common.users import hash_password
from tests.support import peers


@pytest.fixture(autouse=True)
def _no_socket_folder_left(tmp_path: Path) -> Iterator[None]:
    """A long tmp_path sends Dovecot's socket folder to /tmp (see _base_dir): remove it after."""
    yield
    for found in tmp_path.rglob("mailroom.toml"):
        cfg = config.load(found)
        base = dovecot._base_dir(cfg)
        if not base.is_relative_to(tmp_path):
            shutil.rmtree(base, ignore_errors=True)


def make_config(tmp_path: Path, imap: str = "") -> config.Config:
    path = tmp_path / "mailroom.toml"
    path.write_text('[mailroom]\ndomains = ["example.org"]\nmail_root = "mail"\nrun_dir = "run"\n'
                    f"[imap]\nenabled = true\n{imap}")
    return config.load(path)


def user(address: str, store: str = "maildir", quota: int = 0, password: str = "pw") -> User:
    suffix = ".mbox" if store == "mbox" else ""
    return User(address=address, password_hash=hash_password(password) if password else "", store=store,
                mailbox="example.org/" + address.split("@")[0] + suffix, quota=quota)


def test_a_maildir_user_line_has_the_hash_the_location_and_the_quota(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    u = user("alice@example.org", quota=1_000_000)
    line = dovecot.user_line(cfg, u)
    assert line is not None
    name, password, uid, gid, gecos, home, shell, extra = line.split(":", 7)
    assert name == "alice@example.org"
    assert password == "{ARGON2ID}" + u.password_hash and u.password_hash.startswith("$argon2id$")
    assert (uid, gid, gecos, home, shell) == ("", "", "", "", "")
    fields = extra.split(" ")
    assert f"userdb_mail=maildir:{(tmp_path / 'mail' / 'example.org' / 'alice').resolve()}" in fields
    assert "userdb_quota=maildir:Mailbox" in fields and "userdb_quota_rule=*:bytes=1000000" in fields


def test_an_mbox_user_reads_the_file_the_mda_writes_and_keeps_folders_beside_it(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    line = dovecot.user_line(cfg, user("bob@example.org", "mbox"))
    assert line is not None
    box = (tmp_path / "mail" / "example.org" / "bob.mbox").resolve()
    extra = line.split(":", 7)[7]
    assert f"userdb_mail=mbox:{box}.folders:INBOX={box}" in extra.split(" ")


def test_a_user_without_a_password_is_left_out(tmp_path: Path) -> None:
    assert dovecot.user_line(make_config(tmp_path), user("nopw@example.org", password="")) is None


def test_the_users_file_is_private_and_every_rewrite_moves_its_mtime(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    db = Database(cfg.database_url, threads=1)
    db.create_schema()
    try:
        with db.write() as s:
            s.add(user("alice@example.org"))
            s.commit()
        path = dovecot.write_users(cfg, db)
        assert path.stat().st_mode & 0o077 == 0
        first = path.stat().st_mtime
        assert path.read_text().startswith("alice@example.org:{ARGON2ID}$argon2id$")
        # Same content, same size, same second: Dovecot would not re-read it by size.
        dovecot.write_users(cfg, db)
        assert path.stat().st_mtime > first
        with db.write() as s:
            s.add(user("carol@example.org"))
            s.commit()
        dovecot.write_users(cfg, db)
        assert [line.split(":")[0] for line in path.read_text().splitlines()] == [
            "alice@example.org", "carol@example.org"]
    finally:
        db.close()


def test_without_dovecot_or_when_off_it_says_why_in_one_line(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, 'dovecot = "/nonexistent/dovecot"\n')
    reason = dovecot.why_not(cfg)
    assert reason is not None and "not installed" in reason and "\n" not in reason
    off = make_config(tmp_path, "").imap
    assert off.enabled
    cfg2 = config.from_dict({"mailroom": {"domains": ["example.org"]}, "imap": {"enabled": False}}, tmp_path / "x.toml")
    assert "enabled = false" in (dovecot.why_not(cfg2) or "")


def test_init_turns_imap_on_when_it_finds_dovecot(tmp_path: Path) -> None:
    peers.require("dovecot")
    assert main(["init", "--dir", str(tmp_path / "inst"), "--domain", "example.org"]) == 0
    assert config.load(tmp_path / "inst" / "mailroom.toml").imap.enabled
    on = config.from_dict(_toml(config.render_default("example.org", "mail.test", imap=True)), tmp_path / "a")
    off = config.from_dict(_toml(config.render_default("example.org", "mail.test")), tmp_path / "b")
    assert on.imap.enabled and not off.imap.enabled
    assert (on.imap.imap, on.imap.imaps, on.imap.pop3s, on.web.listen) == (
        "127.0.0.1:2143", "127.0.0.1:2993", "127.0.0.1:2995", ["127.0.0.1:8025"])


def _toml(text: str) -> dict[str, object]:
    import tomllib

    return tomllib.loads(text)


def test_dovecot_accepts_the_generated_configuration(tmp_path: Path) -> None:
    doveconf = peers.require("doveconf")
    cfg = make_config(tmp_path, 'pop3s = ""\n')
    me = pwd.getpwuid(os.geteuid())
    ids = dovecot.MailIds(me.pw_uid, me.pw_gid, me.pw_name, as_root=False)
    (tmp_path / "tls").mkdir()
    from common.tls import make_self_signed

    make_self_signed(tmp_path / "tls" / "cert.pem", tmp_path / "tls" / "key.pem", "mail.test")
    conf = dovecot.render_config(cfg, ids)
    r = subprocess.run([doveconf, "-n", "-c", str(conf)], capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 0, r.stderr
    assert "ssl = required" in r.stdout and "disable_plaintext_auth" not in r.stdout  # yes is the default
    assert "port = 2993" in r.stdout and "port = 2143" in r.stdout
    assert "args = scheme=ARGON2ID " in r.stdout and "driver = passwd-file" in r.stdout


@pytest.mark.parametrize("length", [20, 200])
def test_dovecots_socket_folder_stays_short(tmp_path: Path, length: int) -> None:
    deep = tmp_path / ("d" * length)
    deep.mkdir()
    cfg = make_config(deep)
    base = dovecot._base_dir(cfg)
    assert len(str(base)) <= dovecot.MAX_BASE_DIR
    assert base.is_dir() and base.stat().st_uid == os.geteuid()


DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "dovecot-mailroom.conf"
# What the production file and the generated one must agree on (doveconf -n lines).
# (doveconf -n leaves out values that are Dovecot's defaults.)
SAME = (
    "ssl = required", "auth_mechanisms = plain login", "mbox_write_locks = dotlock fcntl",
    "mail_plugins = \" quota\"", "  mail_plugins = \" quota imap_quota\"", "  driver = passwd-file",
    "protocols = imap pop3 sieve", "  sieve_max_redirects = 4",
    # Failed logins, which the web program reads for /metrics (web/dovecot_stats.py).
    "  filter = event=auth_request_finished AND NOT success=yes", "  group_by = service",
)


def test_the_production_file_is_valid_and_says_what_the_generated_one_says(tmp_path: Path) -> None:
    doveconf = peers.require("doveconf")
    deploy = subprocess.run([doveconf, "-n", "-c", str(DEPLOY)], capture_output=True, text=True, timeout=30)
    assert deploy.returncode == 0, deploy.stderr
    for port in ("143", "993", "995"):
        assert f"    port = {port}\n" in deploy.stdout
    cfg = make_config(tmp_path)
    me = pwd.getpwuid(os.geteuid())
    generated_file = dovecot.render_config(cfg, dovecot.MailIds(me.pw_uid, me.pw_gid, me.pw_name, as_root=False))
    generated = subprocess.run([doveconf, "-n", "-c", str(generated_file)], capture_output=True, text=True,
                               timeout=30)
    assert generated.returncode == 0, generated.stderr
    for line in SAME:
        assert line + "\n" in deploy.stdout, line
        assert line + "\n" in generated.stdout, line
    assert "args = scheme=ARGON2ID /srv/mailroom/run/dovecot/users" in deploy.stdout


def test_a_mail_root_with_a_space_or_a_missing_user_turns_imap_off_with_one_line(tmp_path: Path) -> None:
    spaced = tmp_path / "with space"
    spaced.mkdir()
    reason = dovecot.why_not(make_config(spaced))
    assert reason is not None and "has a space" in reason and "\n" not in reason
    if os.geteuid() == 0:
        cfg = config.from_dict({"mailroom": {"domains": ["example.org"], "user": "no-such-user-here"},
                                "imap": {"enabled": True}}, tmp_path / "x.toml")
        assert "'no-such-user-here' does not exist" in (dovecot.why_not(cfg) or "")
