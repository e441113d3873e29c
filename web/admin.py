"""The admin page (`/admin` on `[web] admin`, TLS only) and each user's own page (`/account`).

What an administrator does here is what the `mailroom` command does, through
the same functions: users and aliases (cli/accounts.py: the first user's
postmaster role, Dovecot's users file), the queue (cli/queue.py, over
mta/queue.py's operator actions: hold, release, delete, flush), the status
checks (cli/checks.py, as `mailroom status-checks`).  So the page and the
command cannot drift apart.  It imports the operator's command, never a daemon
(tests/unit/test_layers.py).

Who may: admin accounts (`mailroom admin add NAME`), and mail users on their
own page only, to change their password.  Logins, sessions, form tokens and the
lockout are web/adminauth.py's; the HTTP over TLS web/adminhttp.py's; the HTML
web/adminpages.py's.  Every change is written to the events table under the
trace id `ADMIN` (`mailroom trace ADMIN` lists them), with who made it.
"""

from __future__ import annotations

import functools
import importlib
import logging
import re
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from importlib import resources
from typing import Any

from sqlalchemy import desc, func, select

from cli import accounts, checks
from cli import backup as backupcmd
from cli import queue as queuecmd
from cli import trace as tracecmd
from common import privileges
from common.config import Config
from common.daemon import bind_all
from common.db import Database
from common.events import EventName, Hop
from common.log import is_trace_id
from common.models import Admin, Alias, Event, User, add_event
from common.tls import ServerTLS
from common.users import find_user, is_disabled, verify_hash
from web import adminhttp
from web import adminpages as pg
from web.adminauth import COOKIE, LOGIN_COOKIE, Lockout, Session, Sessions, fingerprint, same
from web.adminhttp import BadRequest, Request, Response, redirect

log = logging.getLogger("web.admin")

AUDIT_TRACE = "ADMIN"  # the trace id every change made here is recorded under
MAX_NAME = 320
MAX_PASSWORD = 1024
MAX_TARGETS = 4000  # the alias targets field: many addresses, separated by commas or spaces
MAX_QUOTA = 20
MAX_TOKEN = 100
# Modules loaded late by what the pages call (the checks, the queue's bounce, DNS), loaded before
# the switch to the Mailroom user: after it Python's own library may not be readable.
PRELOAD = ("cli.dns", "mta.auth.checks", "mta.auth.dkim", "mta.bounce", "mta.aliases", "cryptography.x509",
           "cryptography.hazmat.primitives.serialization", "concurrent.futures.thread")


@dataclass(frozen=True)
class Route:
    handler: Callable[[AdminSite, Request, Session], Response]
    kind: str  # who may: "admin", "user" (a mail user, on their own page) or "any"


@functools.cache
def stylesheet() -> bytes:
    """The pages' CSS, read once (by bind, as root perhaps: the package may not be readable later)."""
    return resources.files("web").joinpath("static/admin.css").read_bytes()


def bind(cfg: Config) -> list[socket.socket]:
    """Before the switch to the Mailroom user: bind `[web] admin` (it may need root; BindError
    names the address) and load what the pages import or read late."""
    socks = bind_all({"web.admin": cfg.endpoints("web.admin")})["web.admin"]
    for name in PRELOAD:
        importlib.import_module(name)
    privileges.preload()
    stylesheet()
    return socks


class AdminSite:
    """The pages, served over TLS on the sockets bind() made, with the certificate the web
    program loaded before the switch (a reload replaces it for the next handshakes)."""

    def __init__(self, cfg: Config, db: Database, socks: list[socket.socket], tls: ServerTLS) -> None:
        self.cfg = cfg
        self.db = db
        self.socks, self.tls = socks, tls
        self.sessions = Sessions()
        self.lockout = Lockout()
        self.css = stylesheet()

    # --- the way in ---------------------------------------------------------------------

    def respond(self, r: Request) -> Response:
        method = "GET" if r.method == "HEAD" else r.method
        if method not in ("GET", "POST"):
            raise BadRequest(HTTPStatus.METHOD_NOT_ALLOWED, "GET and POST only")
        if r.path == "/admin.css" and method == "GET":
            return Response(HTTPStatus.OK, self.css, "text/css; charset=utf-8")
        if method == "POST":
            self._same_origin(r)
        if r.path == "/login":
            return self.login_form(r) if method == "GET" else self.login(r)
        if r.path == "/":
            return redirect("/admin")
        route = ROUTES.get((method, r.path))
        if route is None:
            raise BadRequest(HTTPStatus.NOT_FOUND, "no such page")
        session = self._session(r)
        if session is None:
            if method == "POST":
                raise BadRequest(HTTPStatus.FORBIDDEN, "not logged in (or the session ended): log in again")
            return redirect("/login")
        if method == "POST" and not same(r.form.get("csrf", "")[:MAX_TOKEN], session.csrf):
            raise BadRequest(HTTPStatus.FORBIDDEN, "this form is stale or lacks its token: load the page again")
        if route.kind not in ("any", session.kind):
            return redirect("/account" if session.kind == "user" else "/admin")
        return route.handler(self, r, session)

    def _same_origin(self, r: Request) -> None:
        """A form posted from another site is refused (SameSite=Strict keeps the cookie away too)."""
        origin = r.headers.get("origin", "")
        if origin and origin != "null" and origin != f"https://{r.headers.get('host', '')}":
            raise BadRequest(HTTPStatus.FORBIDDEN, "a form from another site")

    def _session(self, r: Request) -> Session | None:
        token = r.cookies.get(COOKIE, "")
        session = self.sessions.get(token) if token else None
        if session is None:
            return None
        # The account must still be there, with the password it logged in with.
        with self.db.read() as s:
            if session.kind == "admin":
                admin = s.scalars(select(Admin).where(Admin.name == session.who)).first()
                current = admin.password_hash if admin is not None else None
            else:
                user = find_user(s, session.who)
                current = user.password_hash if user is not None and not is_disabled(user) else None
        if current is None or fingerprint(current) != session.fingerprint:
            self.sessions.end(token)
            return None
        return session

    def login_form(self, r: Request, error: str = "", status: HTTPStatus = HTTPStatus.OK) -> Response:
        token = secrets.token_urlsafe(32)
        cookie = f"{LOGIN_COOKIE}={token}; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=3600"
        return Response(status, pg.login(token, error), headers=[("Set-Cookie", cookie)])

    def login(self, r: Request) -> Response:
        if not same(r.form.get("csrf", "")[:MAX_TOKEN], r.cookies.get(LOGIN_COOKIE, "")):
            return self.login_form(r, "This login form is stale or lacks its token: try again.", HTTPStatus.FORBIDDEN)
        name = r.field("name", MAX_NAME).strip().lower()
        password = r.field("password", MAX_PASSWORD)
        keys = (f"ip:{r.client}", f"name:{name}")
        wait = self.lockout.locked(*keys)
        if wait > 0:
            log.warning("admin login refused for %s from %s: locked out for %.0f s more", name, r.client, wait)
            return self.login_form(r, f"Too many failed logins: try again in {wait / 60:.0f} minutes.",
                                   HTTPStatus.TOO_MANY_REQUESTS)
        with self.db.read() as s:
            admin = s.scalars(select(Admin).where(Admin.name == name)).first()
            user = find_user(s, name) if admin is None and "@" in name else None
        stored = admin.password_hash if admin is not None else user.password_hash if user is not None else None
        if not verify_hash(stored, password) or stored is None:
            self.lockout.failed(*keys)
            log.warning("admin login failed for %s from %s", name, r.client)
            return self.login_form(r, "Wrong name or password.", HTTPStatus.UNAUTHORIZED)
        self.lockout.succeeded(*keys)
        kind = "admin" if admin is not None else "user"
        token, _ = self.sessions.start(name, kind, stored)
        log.info("%s %s logged in from %s", kind, name, r.client)
        return redirect("/admin" if kind == "admin" else "/account",
                        ("Set-Cookie", f"{COOKIE}={token}; Path=/; Secure; HttpOnly; SameSite=Strict"))

    def logout(self, r: Request, session: Session) -> Response:
        self.sessions.end(r.cookies.get(COOKIE, ""))
        return redirect("/login", ("Set-Cookie", f"{COOKIE}=; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=0"))

    # --- changes --------------------------------------------------------------------------

    def _record(self, session: Session, what: str) -> None:
        with self.db.write() as s:
            add_event(s, AUDIT_TRACE, Hop.ADMIN, EventName.CHANGED, detail=f"{session.kind} {session.who}: {what}")
            s.commit()
        log.info("%s %s: %s", session.kind, session.who, what)

    def _change(self, session: Session, back: str, what: str, change: Callable[[], accounts.Done | str]) -> Response:
        """Make a change, record who made it, say how it went on the next page."""
        try:
            done = change()
        except accounts.Refused as exc:
            session.flash.append(f"error: {exc}")
            return redirect(back)
        self._record(session, what)
        if isinstance(done, str):
            session.flash.append(done)
        else:
            session.flash += done.lines + [f"warning: {w}" for w in done.warnings]
        return redirect(back)

    def _page(self, session: Session, title: str, body: str) -> Response:
        flash, session.flash = session.flash, []
        errors = [f[len("error: "):] for f in flash if f.startswith("error: ")]
        return Response(HTTPStatus.OK, pg.page(title, body, csrf=session.csrf, who=session.who,
                                               nav=session.kind == "admin",
                                               flash=[f for f in flash if not f.startswith("error: ")],
                                               error=" ".join(errors)))

    # --- pages ----------------------------------------------------------------------------

    def overview(self, r: Request, session: Session) -> Response:
        with self.db.read() as s:
            users = s.scalar(select(func.count()).select_from(User)) or 0
            aliases = s.scalar(select(func.count()).select_from(Alias)) or 0
        queued = queuecmd.listing(self.db)
        held = sum(1 for m in queued if m["held"])
        rows = [[pg.e("users"), pg.e(users)], [pg.e("aliases"), pg.e(aliases)],
                [pg.e("messages in the queue"), pg.e(f"{len(queued)} ({held} held)")],
                [pg.e("backup"), pg.e(backupcmd.status_line(self.cfg).removeprefix("backup: "))]]
        body = pg.table(["", ""], rows, ident="overview") + \
            '<p><a href="/admin/status">Run the status checks</a> (DNS, certificate, backup, blocklists).</p>'
        return self._page(session, f"Mailroom on {self.cfg.mailroom.hostname}", body)

    def users(self, r: Request, session: Session) -> Response:
        c = session.csrf
        with self.db.read() as s:
            found = list(s.scalars(select(User).order_by(User.address)))
        rows = []
        for u in found:
            a = pg.hidden("address", u.address)
            off = is_disabled(u)
            rows.append([
                f'<span class="mono">{pg.e(u.address)}</span>', pg.e(u.store), pg.e(u.quota or "none"),
                pg.e("disabled" if off else "yes"),
                pg.form("/admin/users", c, a + pg.field("password", "", kind="password", maxlength=MAX_PASSWORD,
                                                           size=12) + pg.button("Set password", "passwd"))
                + pg.form("/admin/users", c, a + pg.field("quota", "", value=str(u.quota), maxlength=MAX_QUOTA, size=10)
                          + pg.button("Set quota", "quota"))
                + pg.form("/admin/users", c, a + pg.button("Enable" if off else "Disable", "enable" if off else
                                                            "disable")),
            ])
        add = pg.form("/admin/users", c, pg.field("address", "Address") + pg.field(
            "password", "Password", kind="password", maxlength=MAX_PASSWORD) + pg.select(
            "store", "Store", [self.cfg.mda.default_store, *({"maildir", "mbox"} - {self.cfg.mda.default_store})])
            + pg.field("quota", "Quota (bytes, 0: none)", value="0", maxlength=MAX_QUOTA, size=10)
            + pg.button("Add user", "add"), cls="block")
        body = "<h2>Add a user</h2>" + add + pg.table(["address", "store", "quota", "may log in", "change"], rows,
                                                      ident="users", row_ids=[u.address for u in found])
        return self._page(session, "Users", body)

    def change_user(self, r: Request, session: Session) -> Response:
        action = r.field("action", 20)
        address = r.field("address", MAX_NAME).strip().lower()
        cfg, db = self.cfg, self.db
        if action == "add":
            password = r.field("password", MAX_PASSWORD)
            store = r.field("store", 10)
            if store not in ("maildir", "mbox"):
                raise BadRequest(HTTPStatus.BAD_REQUEST, "store: maildir or mbox")
            quota = _quota(r)
            return self._change(session, "/admin/users", f"user add {address} ({store}, quota {quota})",
                                lambda: accounts.add_user(cfg, db, address, password, store=store, quota=quota))
        if action == "passwd":
            password = r.field("password", MAX_PASSWORD)
            return self._change(session, "/admin/users", f"user passwd {address}",
                                lambda: accounts.set_password(cfg, db, address, password))
        if action == "quota":
            quota = _quota(r)
            return self._change(session, "/admin/users", f"user quota {address} {quota}",
                                lambda: accounts.set_quota(cfg, db, address, quota))
        if action in ("disable", "enable"):
            return self._change(session, "/admin/users", f"user {action} {address}",
                                lambda: accounts.set_login(cfg, db, address, enabled=action == "enable"))
        raise BadRequest(HTTPStatus.BAD_REQUEST, "action: add, passwd, quota, disable or enable")

    def aliases(self, r: Request, session: Session) -> Response:
        c = session.csrf
        with self.db.read() as s:
            found = [(a.source, a.target) for a in s.scalars(select(Alias).order_by(Alias.source, Alias.id))]
        rows = [[f'<span class="mono">{pg.e(src)}</span>', f'<span class="mono">{pg.e(dst)}</span>',
                 pg.form("/admin/aliases", c, pg.hidden("source", src) + pg.hidden("targets", dst)
                         + pg.button("Remove", "del"))] for src, dst in found]
        add = pg.form("/admin/aliases", c, pg.field("source", "Address (or @domain for a catch-all)")
                      + pg.field("targets", "Delivers to (addresses, separated by commas)", maxlength=MAX_TARGETS,
                                 size=40) + pg.button("Add alias", "add"), cls="block")
        body = "<h2>Add an alias</h2>" + add + pg.table(["alias", "delivers to", ""], rows, ident="aliases",
                                                        row_ids=[f"{s}>{t}" for s, t in found])
        return self._page(session, "Aliases", body)

    def change_alias(self, r: Request, session: Session) -> Response:
        action = r.field("action", 20)
        source = r.field("source", MAX_NAME).strip().lower()
        targets = [t for t in re.split(r"[\s,;]+", r.field("targets", MAX_TARGETS, required=action == "add")) if t]
        cfg, db = self.cfg, self.db
        if action == "add":
            return self._change(session, "/admin/aliases", f"alias add {source} {' '.join(targets)}",
                                lambda: accounts.add_alias(cfg, db, source, targets))
        if action == "del":
            return self._change(session, "/admin/aliases", f"alias del {source} {' '.join(targets)}".rstrip(),
                                lambda: accounts.delete_alias(cfg, db, source, targets))
        raise BadRequest(HTTPStatus.BAD_REQUEST, "action: add or del")

    def queue(self, r: Request, session: Session) -> Response:
        c = session.csrf
        items = queuecmd.listing(self.db)
        rows = []
        for m in items:
            ident = pg.hidden("id", m["id"])
            actions = "".join(pg.form("/admin/queue", c, ident + pg.button(label, act)) for label, act in (
                ("Release", "release") if m["held"] else ("Hold", "hold"), ("Try now", "flush"), ("Delete", "delete")))
            rcpts = "<br>".join(f'{pg.e(x["address"])} ({pg.e(x["state"])}, {x["attempts"]} tries)'
                                + (f'<br><small>{pg.e(x["last_reply"])}</small>' if x["last_reply"] else "")
                                for x in m["recipients"])
            rows.append([f'<a class="mono" href="/admin/queue/show?id={pg.e(m["id"])}">{pg.e(m["id"])}</a>',
                         pg.e("held" if m["held"] else "waiting"), pg.e(f'<{m["sender"]}>'), rcpts,
                         pg.e(m["received"]), actions])
        flush_all = pg.form("/admin/queue", c, pg.hidden("id", "") + pg.button("Try everything now", "flush"))
        body = flush_all + pg.table(["id", "state", "from", "to", "received", ""], rows, ident="queue",
                                    row_ids=[m["id"] for m in items], row_classes=["held" if m["held"] else ""
                                                                                    for m in items])
        return self._page(session, "Queue", body)

    def queue_show(self, r: Request, session: Session) -> Response:
        ident = r.query.get("id", "").upper()
        if not is_trace_id(ident):
            raise BadRequest(HTTPStatus.BAD_REQUEST, "id: a trace id (18 hex digits)")
        found = tracecmd.find(self.db, ident)
        if found is None:
            raise BadRequest(HTTPStatus.NOT_FOUND, "no such message")
        rows = [[pg.e(e["time"]), pg.e(e["hop"]), pg.e(e["event"]), pg.e(e["recipient"]), pg.e(e["detail"])]
                for e in found["events"]]
        waiting = queuecmd.listing(self.db, ident)
        state = "in the queue" + (" (held)" if waiting and waiting[0]["held"] else "") if waiting else "not queued"
        body = (f'<p>From <span class="mono">{pg.e(found["sender"] or "<>")}</span>, '
                f'Message-ID <span class="mono">{pg.e(found["message_id"])}</span>: {pg.e(state)}</p>'
                + pg.table(["time", "hop", "event", "recipient", "detail"], rows, ident="trace"))
        return self._page(session, f"Message {ident}", body)

    def change_queue(self, r: Request, session: Session) -> Response:
        action = r.field("action", 20)
        ident = r.field("id", 40, required=action != "flush").strip().upper()
        if ident and not is_trace_id(ident):
            raise BadRequest(HTTPStatus.BAD_REQUEST, "id: a trace id (18 hex digits)")
        cfg, db = self.cfg, self.db

        def act() -> str:  # the same actions, and the same words, as `mailroom queue`
            if action in ("hold", "release"):
                done = queuecmd.set_held(cfg, db, ident, action == "hold")
            elif action == "delete":
                done = queuecmd.delete(db, ident)
            else:
                done = queuecmd.flush(cfg, db, ident or None)
            if not done.ok:
                raise accounts.Refused(done.text)
            return done.text

        if action not in ("hold", "release", "delete", "flush"):
            raise BadRequest(HTTPStatus.BAD_REQUEST, "action: hold, release, delete or flush")
        return self._change(session, "/admin/queue", f"queue {action} {ident or 'all'}".rstrip(), act)

    def deliveries(self, r: Request, session: Session) -> Response:
        outcomes = (EventName.DELIVERED, EventName.DEFERRED, EventName.BOUNCED, EventName.EXPIRED)
        with self.db.read() as s:
            found = s.scalars(select(Event).where(Event.hop == Hop.QMGR, Event.event.in_(outcomes))
                              .order_by(desc(Event.id)).limit(100)).all()
            rows = [[pg.e(f"{e.time:%Y-%m-%d %H:%M:%S}"),
                     f'<a class="mono" href="/admin/queue/show?id={pg.e(e.trace_id)}">{pg.e(e.trace_id)}</a>',
                     pg.e(e.recipient), pg.e(e.event), pg.e(e.detail)] for e in found]
        return self._page(session, "Recent deliveries", pg.table(["time", "message", "recipient", "outcome",
                                                                   "reply"], rows, ident="deliveries"))

    def status(self, r: Request, session: Session) -> Response:
        report = checks.run_all(self.cfg).as_json()
        failing = sum(c["level"] in ("fail", "error") for c in report["checks"])
        summary = "every check passed" if report["ok"] else f"{failing} check(s) failing"
        body = (f'<p id="summary">{pg.e(summary)} &middot; <a href="/admin/status">check again</a> '
                f"(the same checks as <code>mailroom status-checks</code>)</p>" + pg.checks_table(report))
        return self._page(session, "Status checks", body)

    def account(self, r: Request, session: Session) -> Response:
        inner = (pg.field("current", "Current password", kind="password", maxlength=MAX_PASSWORD)
                 + pg.field("new", "New password", kind="password", maxlength=MAX_PASSWORD)
                 + pg.field("again", "New password again", kind="password", maxlength=MAX_PASSWORD)
                 + pg.button("Change my password"))
        body = f"<p>Mail address: <span class=\"mono\">{pg.e(session.who)}</span></p>" + pg.form(
            "/account", session.csrf, inner, cls="block")
        return self._page(session, "Your account", body)

    def change_own_password(self, r: Request, session: Session) -> Response:
        current = r.field("current", MAX_PASSWORD)
        new, again = r.field("new", MAX_PASSWORD), r.field("again", MAX_PASSWORD)
        with self.db.read() as s:
            user = find_user(s, session.who)
            stored = user.password_hash if user is not None else None
        if not verify_hash(stored, current):
            session.flash.append("error: the current password is wrong")
            return redirect("/account")
        if new != again:
            session.flash.append("error: the two new passwords differ")
            return redirect("/account")
        response = self._change(session, "/account", "changed own password",
                                lambda: accounts.set_password(self.cfg, self.db, session.who, new))
        with self.db.read() as s:
            user = find_user(s, session.who)
            if user is not None:
                session.fingerprint = fingerprint(user.password_hash)  # this session goes on; others end
        return response

    def error(self, status: HTTPStatus, text: str) -> Response:
        return Response(status, pg.error_page(status.value, status.phrase, text))

    # --- serving ----------------------------------------------------------------------------

    async def serve(self) -> list[Any]:
        return [await adminhttp.serve(sock, self.tls.context, self.respond, self.error) for sock in self.socks]


def _quota(r: Request) -> int:
    text = r.field("quota", MAX_QUOTA).strip()
    if not (text.isascii() and text.isdigit()):
        raise BadRequest(HTTPStatus.BAD_REQUEST, "quota: a number of bytes (0: none)")
    return int(text)


ROUTES: dict[tuple[str, str], Route] = {
    ("GET", "/admin"): Route(AdminSite.overview, "admin"),
    ("GET", "/admin/users"): Route(AdminSite.users, "admin"),
    ("POST", "/admin/users"): Route(AdminSite.change_user, "admin"),
    ("GET", "/admin/aliases"): Route(AdminSite.aliases, "admin"),
    ("POST", "/admin/aliases"): Route(AdminSite.change_alias, "admin"),
    ("GET", "/admin/queue"): Route(AdminSite.queue, "admin"),
    ("GET", "/admin/queue/show"): Route(AdminSite.queue_show, "admin"),
    ("POST", "/admin/queue"): Route(AdminSite.change_queue, "admin"),
    ("GET", "/admin/deliveries"): Route(AdminSite.deliveries, "admin"),
    ("GET", "/admin/status"): Route(AdminSite.status, "admin"),
    ("POST", "/logout"): Route(AdminSite.logout, "any"),
    ("GET", "/account"): Route(AdminSite.account, "user"),
    ("POST", "/account"): Route(AdminSite.change_own_password, "user"),
}

