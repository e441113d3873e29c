"""The pure parts of spam filtering and users' filters: the verdict fields, folder names, the
Sieve interpreter, vacation rules, and rspamd's generated configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli import dovecot_sieve, rspamd
from common import config as configmod
from common import verdict
from mda import folders, sieve, vacation
from mta.auth.checks import DKIMResult, Verdict
from mta.auth.dmarc import DMARCResult
from mta.auth.spf import SPFResult

SPAM_HEAD = b"X-Spam-Flag: YES\r\nX-Spam-Status: Yes, score=9\r\n\tfolded\r\nSubject: x\r\n\r\nX-Spam-Flag: body\r\n"


def test_verdict_fields_are_stripped_from_the_header_only() -> None:
    out = verdict.strip(SPAM_HEAD)
    assert out == b"Subject: x\r\n\r\nX-Spam-Flag: body\r\n"
    assert verdict.is_spam(SPAM_HEAD) and not verdict.is_spam(out)
    assert not verdict.is_spam(b"Subject: x\n\nX-Spam-Flag: YES\n")


def test_a_verdict_field_last_in_the_header_goes_with_its_whole_line_end() -> None:
    # On the wire (CRLF) a CR was left behind, and the stored message got a second empty line.
    assert verdict.strip(b"Subject: x\r\nX-Spam-Flag: YES\r\n\r\nbody\r\n") == b"Subject: x\r\n\r\nbody\r\n"
    assert verdict.strip(b"Subject: x\nX-Spam-Status : Yes\n\nbody\n") == b"Subject: x\n\nbody\n"
def _results(spf: str, dkim: list[tuple[str, str]], mail_from: str = "bob@news.example.net") -> bytes:
    """Our MTA's own Authentication-Results field, as it writes it (mta/auth/checks.py)."""
    return Verdict(
        "mx.example.org", SPFResult(spf, "mailfrom", mail_from.rpartition("@")[2]),
        [DKIMResult(r, d, "s1", "rsa-sha256", "abcdefgh") for r, d in dkim], DMARCResult("none", "example.net"),
        "none", mail_from=mail_from, helo="mail.example.net", client_ip="192.0.2.1",
    ).header()


@pytest.mark.parametrize(("field", "sender", "verified"), [
    (_results("pass", []), "bob@news.example.net", True),
    (_results("pass", []), "BOB@News.Example.NET", True),
    (_results("softfail", []), "bob@news.example.net", False),
    (_results("pass", [], "x@other.example"), "bob@news.example.net", False),  # SPF passed for another domain
    (_results("fail", [("pass", "example.net")]), "bob@news.example.net", True),  # the parent domain signed
    (_results("fail", [("pass", "mail.news.example.net")]), "bob@news.example.net", True),  # a child signed
    (_results("fail", [("pass", "ample.net")]), "bob@news.example.net", False),  # not a parent: a suffix only
    (_results("fail", [("fail", "news.example.net")]), "bob@news.example.net", False),
    (_results("pass", []).replace(b"mx.example.org", b"mx.elsewhere.example"), "bob@news.example.net", False),
    (b"", "bob@news.example.net", False),
    (_results("pass", []), "", False),
])
def test_a_sender_is_verified_only_by_our_own_results_for_its_domain(field: bytes, sender: str, verified: bool) -> None:
    message = field + b"Received: from x\r\nFrom: bob@news.example.net\r\n\r\nhello\r\n"
    assert verdict.sender_verified(message, sender, "mx.example.org") is verified




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


def test_imap_moves_teach_rspamd_only_on_a_node_that_runs_it(tmp_path: Path) -> None:
    # rspamd goes with the mta role; learning reaches it over a Unix socket of this host.
    every_role = _cfg(tmp_path, '[filter]\nrspamd = "supervised"\n')
    store = _cfg(tmp_path, 'roles = ["mda", "imap", "web"]\n[filter]\nrspamd = "supervised"\n')  # in [mailroom]
    assert dovecot_sieve.learning_on(every_role)  # Debian's rspamd and dovecot-sieve are installed (peers)
    assert not dovecot_sieve.learning_on(store)


def test_init_runs_rspamd_when_it_is_installed() -> None:
    assert 'rspamd = "supervised"' in configmod.render_default("example.org", "mail.example.org", rspamd=True)
    assert 'rspamd = ""' in configmod.render_default("example.org", "mail.example.org", rspamd=False)
    assert rspamd.installed()  # Debian's rspamd and redis-server (.ci/install-peers)
