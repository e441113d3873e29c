"""The pure parts of spam filtering and users' filters: the verdict fields, folder names, the
Sieve interpreter, vacation rules, and rspamd's generated configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli import rspamd
from common import config as configmod
from common import verdict
from mda import folders, sieve, vacation

SPAM_HEAD = b"X-Spam-Flag: YES\r\nX-Spam-Status: Yes, score=9\r\n\tfolded\r\nSubject: x\r\n\r\nX-Spam-Flag: body\r\n"


def test_verdict_fields_are_stripped_from_the_header_only() -> None:
    out = verdict.strip(SPAM_HEAD)
    assert out == b"Subject: x\r\n\r\nX-Spam-Flag: body\r\n"
    assert verdict.is_spam(SPAM_HEAD) and not verdict.is_spam(out)
    assert not verdict.is_spam(b"Subject: x\n\nX-Spam-Flag: YES\n")


@pytest.mark.parametrize("name", ["../..", "..", ".", "a/../b", ".hidden", "Lists..x", "", "a\x00b", "INBOX.sub"])
def test_folder_names_that_would_leave_the_mailbox_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(folders.BadFolder):
        folders.path(tmp_path / "alice", "maildir", name)


def test_folder_paths_follow_dovecots_layout(tmp_path: Path) -> None:
    assert folders.path(tmp_path / "a", "maildir", "Lists.dev") == tmp_path / "a" / ".Lists.dev"
    assert folders.path(tmp_path / "b", "mbox", "Lists/dev") == tmp_path / "b.folders" / "Lists" / "dev"
    assert folders.encode_mutf7("Café & co") == "Caf&AOk- &- co"
    folders.subscribe(tmp_path / "a", "maildir", "Lists.dev")
    folders.subscribe(tmp_path / "a", "maildir", "Lists.dev")
    assert (tmp_path / "a" / "subscriptions").read_text() == "V\t2\n\nLists\tdev\n"


def run(script: str, message: bytes = b"From: carol@example.net\nTo: alice@example.org\nSubject: hi\n\nhello\n",
        sender: str = "carol@example.net") -> sieve.Result:
    envelope = sieve.Envelope(sender, "alice@example.org")
    return sieve.compile_script(script.encode()).run(sieve.Message(message), envelope)


def test_sieve_actions() -> None:
    r = run('require ["fileinto", "copy"];\nfileinto "A";\nredirect :copy "x@example.net";\n')
    assert [f.folder for f in r.fileinto] == ["A"] and r.redirects == ["x@example.net"] and not r.keep
    r = run('require ["ereject", "envelope"];\nif envelope :domain :is "from" "example.net" { ereject "no"; }\n')
    assert r.reject == "no" and r.ereject and not r.keep
    r = run('require ["imap4flags", "body"];\nif body :contains "hello" { addflag "\\\\Flagged"; }\n')
    assert r.keep and r.keep_flags == {"\\Flagged"}
    r = run('require ["variables", "fileinto"];\nif header :matches "subject" "*" { set :upper "s" "${1}"; }\n'
            'fileinto "S-${s}";\n')
    assert r.fileinto[0].folder == "S-HI"
    r = run('require "vacation";\nvacation :days 400 :subject "away" "gone";\n')
    assert r.vacation is not None and r.vacation.days == 365 and r.keep


def test_sieve_errors_keep_the_message() -> None:
    with pytest.raises(sieve.ScriptError):
        sieve.compile_script(b'require "enotify";')
    with pytest.raises(sieve.ScriptError):
        sieve.compile_script(b"if {")
    r = run("".join(f'redirect "a{i}@example.net";\n' for i in range(6)))
    assert r.error and r.keep and not r.redirects
    r = run('if header :matches "subject" "' + "*a" * 40 + '" { discard; }\n')
    assert r.error and r.keep


@pytest.mark.parametrize(("head", "why"), [
    ("Auto-Submitted: auto-generated\n", "automatic"), ("Precedence: list\n", "bulk"),
    ("List-Id: <x.example.net>\n", "mailing list"),
])
def test_vacation_rules(head: str, why: str) -> None:
    msg = sieve.Message(f"From: carol@example.net\nTo: alice@example.org\n{head}\nhi\n".encode())
    assert why in (vacation.why_not(msg, "carol@example.net", ["alice@example.org"]) or "")
    plain = sieve.Message(b"From: carol@example.net\nTo: alice@example.org\n\nhi\n")
    assert vacation.why_not(plain, "carol@example.net", ["alice@example.org"]) is None
    assert vacation.why_not(plain, "", ["alice@example.org"]) is not None
    assert vacation.why_not(plain, "carol@example.net", ["bob@example.org"]) is not None


def _cfg(tmp_path: Path, extra: str) -> configmod.Config:
    p = tmp_path / "mailroom.toml"
    p.write_text('[mailroom]\ndomains = ["example.org"]\n' + extra)
    return configmod.load(p)


def test_dnsbl_only_behind_a_local_resolver(tmp_path: Path) -> None:
    local = _cfg(tmp_path, '[filter]\nrspamd = "supervised"\n[dns]\nnameservers = ["127.0.0.1:53"]\n')
    public = _cfg(tmp_path, '[filter]\nrspamd = "supervised"\n[dns]\nnameservers = ["9.9.9.9"]\n')
    elsewhere = _cfg(tmp_path, '[filter]\nrspamd = "127.0.0.1:11333"\n[dns]\nnameservers = ["127.0.0.1:53"]\n')
    assert rspamd.dnsbl_active(local) and not rspamd.dnsbl_active(public) and not rspamd.dnsbl_active(elsewhere)


def test_rspamd_asks_the_supervised_unbound_when_the_daemons_do(tmp_path: Path) -> None:
    forwarding = _cfg(tmp_path, '[dns]\nresolver = "unbound"\nunbound_listen = "127.0.0.1:2153"\n'
                                'nameservers = ["9.9.9.9"]\n')
    assert rspamd.resolvers(forwarding) == ["127.0.0.1:2153"]
    assert rspamd.resolvers(_cfg(tmp_path, '[dns]\nnameservers = ["9.9.9.9"]\n')) == ["9.9.9.9:53"]


def test_generated_rspamd_configuration_passes_configtest(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, '[filter]\nrspamd = "supervised"\n[dns]\nnameservers = ["9.9.9.9"]\n')
    assert rspamd.prepare(cfg, None) is None
    d = rspamd.conf_dir(cfg)
    assert (d / "override.d" / "rbl.conf").read_text().endswith("enabled = false;\n")
    controller = (d / "override.d" / "worker-controller.inc").read_text()
    assert "secure_ip = [];" in controller and rspamd.secret(cfg, "controller") not in controller
    assert (d / "controller.secret").stat().st_mode & 0o777 == 0o600
    redis = (rspamd.redis_dir(cfg) / "redis.conf").read_text()
    assert "bind 127.0.0.1\n" in redis and f"requirepass {rspamd.secret(cfg, 'redis')}" in redis
    (d / "local.d" / "redis.conf").write_text("servers = {{{\n")
    assert "configtest" in (rspamd.check(cfg) or "")


def test_init_runs_rspamd_when_it_is_installed() -> None:
    assert 'rspamd = "supervised"' in configmod.render_default("example.org", "mail.example.org", rspamd=True)
    assert 'rspamd = ""' in configmod.render_default("example.org", "mail.example.org", rspamd=False)
    assert rspamd.installed()  # Debian's rspamd and redis-server (.ci/install-peers)
