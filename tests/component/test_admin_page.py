"""The admin page over HTTPS, against the real web program of an installation (`python -m web`).

What a logged-in admin changes is what `mailroom user`/`alias` would change,
and is recorded with who did it; everything else is refused with a clear
answer and changes nothing: no login, a form without its token or with an old
one, a cookie from another installation, missing or oversized fields, a flood
of wrong passwords, plain HTTP.  A mail user gets only their own page.
"""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import ssl
import time
from collections.abc import Iterator
from urllib.parse import urlencode

import pytest

from common.tls import make_self_signed
from common.users import check_password
from tests.harness.users import add_user
from tests.support.admin import ADMIN, ADMIN_PASSWORD, AdminClient, add_admin, web_program
from tests.support.suite import Installation, free_port

pytestmark = pytest.mark.timeout(120)
ALICE = "alice@example.org"
USER_PASSWORD = "a song for the long evening"
NEW = "a new one, far longer"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installation]:
    """One installation and web program for the tests of the page itself: making an
    installation, its admin and starting `python -m web` cost more than most tests.
    So each test leaves the site usable for the next: what it locks out, removes or
    counts is its own (an admin of its own, a client address of its own, the admin
    events since it began)."""
    inst = Installation(tmp_path_factory.mktemp("admin") / "mailroom")
    add_user(inst, ALICE, "maildir")
    add_user(inst, "bob@example.org", "mbox")
    add_admin(inst)
    with web_program(inst):
        yield inst


@pytest.fixture
def page(site: Installation) -> tuple[Installation, AdminClient]:
    return site, AdminClient(site.ports["admin"])


def _admin_events(inst: Installation) -> list[str]:
    r = inst.cli("trace", "ADMIN", "--json")
    return [e["detail"] for e in json.loads(r.stdout)["events"]] if r.returncode == 0 else []


def _users(inst: Installation) -> str:
    return inst.cli("user", "list").stdout


def test_login_sets_a_host_only_secure_httponly_strict_cookie(page: tuple[Installation, AdminClient]) -> None:
    inst, c = page
    assert c.get("/admin").location == "" and c.last is not None and "Log in" in c.last.body  # sent to the login
    login = c.request("GET", "/login")
    cookie = login.headers["Set-Cookie"]
    token = login.csrf()
    done = c.request("POST", "/login", urlencode({"csrf": token, "name": ADMIN, "password": "a long admin password"})
                     .encode(), {"Content-Type": "application/x-www-form-urlencoded"})
    assert done.status == 303 and done.location == "/admin"
    session = done.headers["Set-Cookie"]
    assert session.startswith("__Host-mailroom-session=")
    for attribute in ("Path=/", "Secure", "HttpOnly", "SameSite=Strict"):
        assert attribute in session and attribute in cookie, (attribute, session, cookie)
    assert "Domain" not in session
    overview = c.get("/admin")
    assert overview.status == 200 and "Mailroom on mail.test" in overview.body
    for header in ("Content-Security-Policy", "X-Frame-Options", "Cache-Control"):
        assert overview.headers[header], header


def test_plain_http_on_the_admin_port_gets_no_page(page: tuple[Installation, AdminClient]) -> None:
    inst, _ = page
    with socket.create_connection(("127.0.0.1", inst.ports["admin"]), timeout=10) as s:
        s.sendall(b"GET /admin HTTP/1.1\r\nHost: x\r\n\r\n")
        got = b""
        try:
            while chunk := s.recv(4096):
                got += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    assert b"HTTP/1.1 200" not in got and b"<html" not in got


def test_users_and_aliases_change_as_the_command_would_and_each_change_says_who(
    page: tuple[Installation, AdminClient],
) -> None:
    inst, c = page
    before = len(_admin_events(inst))
    c.login()
    c.get("/admin/users")
    done = c.post("/admin/users", {"action": "add", "address": "Carol@Example.org", "password": "a quiet river at dawn",
                                   "store": "mbox", "quota": "5000000"})
    assert done.status == 200 and any("added carol@example.org (mbox at" in f for f in done.flash()), done.body
    assert "carol@example.org  mbox" in _users(inst) and "quota=5000000" in _users(inst)
    with sqlite3.connect(inst.config.database_url.removeprefix("sqlite:///")) as db:
        stored = db.execute("SELECT password_hash FROM users WHERE address = 'carol@example.org'").fetchone()[0]
    assert stored.startswith("$argon2id$")
    dovecot_users = (inst.config.run_dir / "dovecot" / "users").read_text()
    assert "carol@example.org:{ARGON2ID}$argon2id$" in dovecot_users  # IMAP knows at the next login
    again = c.post("/admin/users", {"action": "add", "address": "carol@example.org", "password": "x" * 12,
                                    "store": "maildir", "quota": "0"})
    assert again.text("error") == "carol@example.org exists"
    outside = c.post("/admin/users", {"action": "add", "address": "eve@elsewhere.test", "password": "x" * 12,
                                      "store": "maildir", "quota": "0"})
    assert "not in a local domain" in outside.text("error")
    c.get("/admin/aliases")
    c.post("/admin/aliases", {"action": "add", "source": "sales@example.org",
                              "targets": "alice@example.org, carol@example.org"})
    assert "sales@example.org -> alice@example.org" in inst.cli("alias", "list").stdout
    assert "sales@example.org -> carol@example.org" in inst.cli("alias", "list").stdout
    c.post("/admin/aliases", {"action": "del", "source": "sales@example.org", "targets": "carol@example.org"})
    assert "sales@example.org -> carol@example.org" not in inst.cli("alias", "list").stdout
    c.post("/admin/users", {"action": "quota", "address": "carol@example.org", "quota": "0"})
    assert "quota=" not in [line for line in _users(inst).splitlines() if line.startswith("carol@")][0]
    assert _admin_events(inst)[before:] == [
        "admin boss: user add carol@example.org (mbox, quota 5000000)",
        "admin boss: alias add sales@example.org alice@example.org carol@example.org",
        "admin boss: alias del sales@example.org carol@example.org",
        "admin boss: user quota carol@example.org 0",
    ]  # the refused ones changed nothing and are not there


def test_a_disabled_user_cannot_log_in_anywhere_until_enabled(page: tuple[Installation, AdminClient]) -> None:
    inst, c = page
    c.login()
    c.get("/admin/users")
    c.post("/admin/users", {"action": "passwd", "address": ALICE, "password": USER_PASSWORD})
    c.post("/admin/users", {"action": "disable", "address": ALICE})
    assert f"{ALICE}  maildir" in _users(inst) and "(logins disabled)" in _users(inst)
    assert f"{ALICE}:" not in (inst.config.run_dir / "dovecot" / "users").read_text()
    from common.db import Database
    from common.users import find_user

    db = Database(inst.config.database_url, threads=1)
    with db.read() as s:
        assert not check_password(find_user(s, ALICE), USER_PASSWORD)  # the MSA's check says no
    user = AdminClient(inst.ports["admin"])
    assert user.login(ALICE, USER_PASSWORD).text("error") == "Wrong name or password."
    c.post("/admin/users", {"action": "enable", "address": ALICE})
    with db.read() as s:
        assert check_password(find_user(s, ALICE), USER_PASSWORD)  # the same password again
    db.close()
    assert user.login(ALICE, USER_PASSWORD).status == 200


def test_forms_without_their_token_or_with_an_old_one_change_nothing(page: tuple[Installation, AdminClient]) -> None:
    inst, c = page
    c.login()
    c.get("/admin/users")
    old_token = c.last.csrf() if c.last else ""
    fields = {"action": "add", "address": "mallory@example.org", "password": "p" * 12, "store": "maildir", "quota": "0"}
    absent = c.post("/admin/users", fields, token=False, follow=False)
    assert absent.status == 403 and "stale or lacks its token" in absent.body
    c.post("/logout", {})
    c.login()  # a new session: the old page's token is stale
    stale = c.post("/admin/users", {**fields, "csrf": old_token}, follow=False)
    assert stale.status == 403
    foreign = c.request("POST", "/admin/users", urlencode({**fields, "csrf": c.get("/admin/users").csrf()}).encode(),
                        {"Content-Type": "application/x-www-form-urlencoded", "Origin": "https://evil.test"})
    assert foreign.status == 403 and "another site" in foreign.body
    assert "mallory" not in _users(inst)
    assert c.get("/admin/users").status == 200  # the session carries on


def test_missing_and_oversized_fields_are_refused_clearly(page: tuple[Installation, AdminClient]) -> None:
    inst, c = page
    before = _admin_events(inst)
    c.login()
    c.get("/admin/users")
    missing = c.post("/admin/users", {"action": "add", "address": "dave@example.org", "store": "maildir",
                                      "quota": "0"}, follow=False)
    assert missing.status == 400 and "the form lacks password" in missing.body
    long_address = c.post("/admin/users", {"action": "add", "address": "d" * 400 + "@example.org",
                                           "password": "p" * 12, "store": "maildir", "quota": "0"}, follow=False)
    assert long_address.status == 400 and "address is too long" in long_address.body
    bad_quota = c.post("/admin/users", {"action": "add", "address": "dave@example.org", "password": "p" * 12,
                                        "store": "maildir", "quota": "lots"}, follow=False)
    assert bad_quota.status == 400 and "quota: a number of bytes" in bad_quota.body
    token = c.get("/admin/users").csrf()
    huge = c.request("POST", "/admin/users", urlencode({"csrf": token, "action": "add", "pad": "x" * 70000}).encode(),
                     {"Content-Type": "application/x-www-form-urlencoded"})
    assert huge.status == 413
    twice = c.request("POST", "/admin/users", f"csrf={token}&action=add&action=passwd".encode(),
                      {"Content-Type": "application/x-www-form-urlencoded"})
    assert twice.status == 400 and "more than once" in twice.body
    other_type = c.request("POST", "/admin/users", b'{"action": "add"}', {"Content-Type": "application/json"})
    assert other_type.status == 415
    bad_id = c.post("/admin/queue", {"action": "hold", "id": "../../etc"}, follow=False)
    assert bad_id.status == 400
    assert "dave" not in _users(inst) and _admin_events(inst) == before
    assert c.get("/admin/users").status == 200


def test_a_session_cookie_from_another_installation_is_refused(
    page: tuple[Installation, AdminClient], tmp_path_factory: pytest.TempPathFactory,
) -> None:
    inst, c = page
    c.login()
    other = Installation(tmp_path_factory.mktemp("other") / "mailroom")
    add_admin(other)  # the same name and password, even
    with web_program(other):
        visitor = AdminClient(other.ports["admin"])
        visitor.cookies = dict(c.cookies)
        assert visitor.request("GET", "/admin").location == "/login"
        refused = visitor.request("POST", "/admin/users", urlencode({"csrf": c.get("/admin").csrf(), "action": "add",
                                  "address": "x@example.org", "password": "p" * 12, "store": "maildir",
                                  "quota": "0"}).encode(), {"Content-Type": "application/x-www-form-urlencoded"})
        assert refused.status == 403 and "not logged in" in refused.body
    assert "x@example.org" not in other.cli("user", "list").stdout


def test_failed_logins_lock_the_door(page: tuple[Installation, AdminClient]) -> None:
    inst, _ = page
    # The lockout is per client address and per name: an admin and an address of this
    # test's own, so the other tests on this site can still log in.
    add_admin(inst, "doorman")
    before = _admin_events(inst)
    c = AdminClient(inst.ports["admin"], source="127.0.0.2")
    for _ in range(5):
        assert c.login("doorman", "wrong").text("error") == "Wrong name or password."
    locked = c.login("doorman", ADMIN_PASSWORD)  # the right password, too late
    assert "Too many failed logins" in locked.text("error")
    assert c.get("/admin").location == "" and "Log in" in (c.last.body if c.last else "")
    assert _admin_events(inst) == before  # failed logins are not written to the database
    stale = AdminClient(inst.ports["admin"], source="127.0.0.2")
    stale.get("/login")
    wrong_token = stale.post("/login", {"name": ADMIN, "password": "x", "csrf": "forged"}, follow=False)
    assert wrong_token.status == 403 and "stale" in wrong_token.body


def test_a_user_changes_their_own_password_and_sees_nothing_else(page: tuple[Installation, AdminClient]) -> None:
    inst, c = page
    c.login()
    c.get("/admin/users")
    c.post("/admin/users", {"action": "passwd", "address": ALICE, "password": USER_PASSWORD})
    alice = AdminClient(inst.ports["admin"])
    mine = alice.login(ALICE, USER_PASSWORD)
    assert mine.status == 200 and "Your account" in mine.body
    assert "<h1>Your account</h1>" in alice.get("/admin/users").body  # admins' pages send her back to hers
    wrong = alice.post("/account", {"current": "not it", "new": NEW, "again": NEW})
    assert wrong.text("error") == "the current password is wrong"
    differ = alice.post("/account", {"current": USER_PASSWORD, "new": NEW, "again": "a new one, far longer!"})
    assert differ.text("error") == "the two new passwords differ"
    done = alice.post("/account", {"current": USER_PASSWORD, "new": NEW, "again": NEW})
    assert any("password changed for alice@example.org" in f for f in done.flash()), done.body
    assert alice.get("/account").status == 200  # her own session goes on
    assert AdminClient(inst.ports["admin"]).login(ALICE, USER_PASSWORD).text("error") == "Wrong name or password."
    assert AdminClient(inst.ports["admin"]).login(ALICE, NEW).status == 200
    assert _admin_events(inst)[-1] == "user alice@example.org: changed own password"
    assert f"{ALICE}:{{ARGON2ID}}" in (inst.config.run_dir / "dovecot" / "users").read_text()


def test_removing_an_admin_ends_their_session(page: tuple[Installation, AdminClient]) -> None:
    inst, c = page
    add_admin(inst, "leaving")  # not the admin the other tests log in as
    c.login("leaving")
    assert c.get("/admin").status == 200
    assert inst.cli("admin", "del", "leaving").returncode == 0
    assert c.request("GET", "/admin").location == "/login"


def test_the_queue_can_be_held_released_flushed_and_deleted(installation: Installation) -> None:
    """On the running suite (whose web program serves the admin page too): a message for a
    host that cannot be reached waits in the queue."""
    inst = installation
    inst.set("mta.transport", '"far.test"', f'"127.0.0.1:{free_port()}"')
    add_admin(inst)
    inst.start()
    try:
        code, reply = inst.submit(ALICE, ["someone@far.test"], b"Subject: wait\r\n\r\nhi\r\n")
        assert code == 250
        ident = reply.decode().rsplit(" ", 1)[-1]
        inst.wait_for(lambda: any(e["event"] == "deferred" for e in inst.trace(ident)["events"]),
                       what="the first attempt to fail")
        c = AdminClient(inst.ports["admin"])
        c.login()
        assert ident in c.get("/admin/queue").body
        held = c.post("/admin/queue", {"action": "hold", "id": ident})
        assert any(f.startswith(f"{ident} held: its 1 recipient(s) wait") for f in held.flash()), held.flash()
        assert json.loads(inst.cli("queue", "--json").stdout)[0]["held"] is True
        c.post("/admin/queue", {"action": "release", "id": ident})
        assert json.loads(inst.cli("queue", "--json").stdout)[0]["held"] is False
        flushed = c.post("/admin/queue", {"action": "flush", "id": ident})
        assert any(f.startswith("1 recipient(s) due now") for f in flushed.flash()), flushed.flash()
        shown = c.get(f"/admin/queue/show?id={ident}")
        assert shown.status == 200 and ">held<" in shown.body and ">released<" in shown.body
        c.get("/admin/queue")
        c.post("/admin/queue", {"action": "delete", "id": ident})
        assert json.loads(inst.cli("queue", "--json").stdout) == []
        gone = c.post("/admin/queue", {"action": "hold", "id": ident})
        assert gone.text("error") == f"{ident}: not in the queue"
        assert c.get("/admin/deliveries").body.count("deferred") >= 1
        assert _admin_events(inst) == [f"admin boss: queue {a} {ident}" for a in ("hold", "release", "flush",
                                                                                   "delete")]
    finally:
        inst.stop()


def _served_certificate(port: int) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="mail.test") as tls:
        cert = tls.getpeercert(binary_form=True)
    assert cert is not None
    return cert


def test_a_renewed_certificate_is_served_after_a_reload(installation: Installation) -> None:
    """As after `mailroom cert` renews it: new files in place, then SIGHUP (`mailroom
    reload`); the admin page's next handshake has the new certificate, and it still answers."""
    inst = installation
    add_admin(inst)
    with web_program(inst) as proc:
        port = inst.ports["admin"]
        before = _served_certificate(port)
        cert, key = inst.config.resolve(inst.config.tls.cert), inst.config.resolve(inst.config.tls.key)
        make_self_signed(cert, key, "mail.test")
        inst.give(cert.parent)
        renewed = ssl.PEM_cert_to_DER_cert(cert.read_text())
        assert renewed != before
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while _served_certificate(port) == before and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _served_certificate(port) == renewed
        assert AdminClient(port).login().status == 200
