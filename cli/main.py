"""`mailroom`: the operator's command (init, run, status, reload, user, alias, queue, trace, config, cert, lab...).

Every command takes --config FILE (default $MAILROOM_CONFIG or ./var/mailroom.toml).
User, alias, queue and trace commands work on the database directly, so they
work whether or not the daemons are running.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from pathlib import Path

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from cli import cert as certcmd
from cli import cluster as clustercmd
from cli import dkim as dkimcmd
from cli import dns as dnscmd
from cli import dovecot, dovecot_sieve, postmaster, rspamd, setup, supervise, trace
from cli import lab as labcmd
from cli import queue as queuecmd
from cli.show import clean, public_config
from common import config as configmod
from common import privileges
from common.clock import for_lab
from common.clock import use as use_clock
from common.db import Database
from common.models import Alias, Domain, User
from common.passwords import WeakPassword
from common.tls import make_self_signed
from common.users import find_user, hash_new_password, mailbox_name
from web import autoconfig


def _db(cfg: configmod.Config) -> Database:
    db = Database(cfg.database_url, threads=1)
    db.create_schema()
    return db


def cmd_init(args: argparse.Namespace) -> int:
    if args.postmaster is not None and not _full_address(args.postmaster):
        print(f"--postmaster {clean(args.postmaster)}: expected a full address (user@domain)", file=sys.stderr)
        return 1
    base = Path(args.dir).absolute()
    conf = base / "mailroom.toml"
    if conf.exists():
        print(f"{conf} exists; not overwriting it", file=sys.stderr)
        return 1
    try:
        acct = setup.mailroom_account(args.user)
    except setup.SetupError as exc:
        print(f"mailroom init: {exc}", file=sys.stderr)
        return 1
    base.parent.mkdir(parents=True, exist_ok=True)  # folders above it: as the operator's umask says
    # Everything below is created owner-only: the database holds every queued
    # message and password hash, the config the relay password, tls/ the key.
    old_umask = os.umask(privileges.UMASK)
    try:
        base.mkdir(parents=True, exist_ok=True)
        os.chmod(base, privileges.PRIVATE_DIR)
        conf.write_text(configmod.render_default(
            args.domain.lower(), args.hostname, acct.name, imap=_has_dovecot(), rspamd=rspamd.installed()
        ))
        cfg = configmod.load(conf)
        privileges.private_dir(cfg.mail_root, acct)
        privileges.private_dir(cfg.run_dir, acct)
        make_self_signed(cfg.resolve(cfg.tls.cert), cfg.resolve(cfg.tls.key), args.hostname)
        db = _db(cfg)
        with db.write() as s:
            s.merge(Domain(name=args.domain.lower()))
            if args.postmaster:
                postmaster.point_at(s, [args.domain.lower()], args.postmaster.lower())
            s.commit()
        db.close()
        print(f"created {clean(conf)}, database, and a self-signed certificate for {clean(args.hostname)}; "
              f"the daemons will serve as {acct.name}")
        roles = " and ".join(postmaster.role_addresses([args.domain.lower()]))
        print(f"{roles} go to {clean(args.postmaster.lower()) if args.postmaster else 'the first user you add'}")
        dkimcmd.keygen(cfg, args.domain, None)  # a first DKIM key set; prints its DNS records
        setup.give_installation(cfg, acct)
    finally:
        os.umask(old_umask)
    closed = setup.unreachable(base, acct)
    if closed:
        print(f"warning: {acct.name} cannot reach {base}: {closed} is closed to it "
              f"(chmod o+x {closed}, or choose a folder such as /srv/mailroom)", file=sys.stderr)
    return 0


def _full_address(text: str) -> bool:
    return text.count("@") == 1 and not text.startswith("@") and not text.endswith("@")


def _has_dovecot() -> bool:
    return dovecot.find_program(configmod.IMAPSection().dovecot) is not None


def cmd_user(args: argparse.Namespace, cfg: configmod.Config) -> int:
    status = 0 if args.action == "sync" else _user(args, cfg)
    if args.action != "list":
        # Dovecot reads its own copy of the users: a change counts at the next login.
        try:
            dovecot.write_users(cfg, _db(cfg))
        except OSError as exc:
            print(f"warning: Dovecot's users file was not rewritten ({exc}); "
                  "IMAP and POP3 still know the old users until `mailroom user sync`", file=sys.stderr)
            return status or 1
    return status


def _user(args: argparse.Namespace, cfg: configmod.Config) -> int:
    db = _db(cfg)
    if args.action == "list":
        with db.read() as s:
            for u in s.scalars(select(User).order_by(User.address)):
                quota = f" quota={u.quota}" if u.quota else ""
                print(f"{clean(u.address)}  {clean(u.store)}  {clean(cfg.mail_root / u.mailbox)}{quota}")
        return 0
    address = args.address.lower()
    shown = clean(address)
    if "@" not in address or not cfg.is_local_domain(address.rsplit("@", 1)[1]):
        print(f"{shown}: not in a local domain ({', '.join(cfg.mailroom.domains)})", file=sys.stderr)
        return 1
    with db.read() as s:
        exists = find_user(s, address) is not None
    if exists and args.action == "add":
        print(f"{shown} exists", file=sys.stderr)
        return 1
    if not exists and args.action != "add":
        print(f"{shown}: no such user", file=sys.stderr)
        return 1
    # Ask (and hash) before opening the write transaction: it holds SQLite's
    # write lock, and every daemon would wait while the operator types.
    hashed = ""
    if args.action in ("add", "passwd"):
        try:
            hashed = hash_new_password(_password(args), address)
        except WeakPassword as exc:
            print(f"{shown}: password refused: {exc}", file=sys.stderr)
            return 1
    with db.write() as s:
        user = find_user(s, address)
        if args.action == "add":
            if user is not None:
                print(f"{shown} exists", file=sys.stderr)
                return 1
            first = s.scalars(select(User.id)).first() is None
            store = args.store or cfg.mda.default_store
            name = mailbox_name(address) + (".mbox" if store == "mbox" else "")
            s.add(User(address=address, password_hash=hashed, store=store, mailbox=name, quota=args.quota))
            print(f"added {shown} ({store} at {clean(cfg.mail_root / name)})")
            if first:  # the first user is postmaster unless `init --postmaster` named someone
                for role in postmaster.point_at(s, cfg.mailroom.domains, address, only_missing=True):
                    print(f"{clean(role)} -> {shown}")
        elif user is None:
            print(f"{shown}: no such user", file=sys.stderr)
            return 1
        elif args.action == "passwd":
            user.password_hash = hashed
            print(f"password changed for {shown}")
        elif args.action == "del":
            before = postmaster.reachable(s, cfg.mailroom.domains, cfg.mda.recipient_delimiter)
            s.delete(user)
            s.flush()
            print(f"deleted {shown} (the mailbox files are kept)")
            # Left as they are (an alias may still reach other users), but said.
            for source in s.scalars(select(Alias.source).where(Alias.target == user.address)):
                print(f"note: alias {clean(source)} still points to {shown}; `mailroom alias del {clean(source)} "
                      f"{shown}` removes it")
            _warn_lost_roles(s, cfg, before)
        s.commit()
    return 0


def _password(args: argparse.Namespace) -> str:
    """From a prompt (twice, not echoed) or one line of stdin; never from argv,
    where other local users could read it in `ps` and it would stay in shell history."""
    if args.password_stdin:
        pw = sys.stdin.readline().rstrip("\r\n")
    else:
        pw = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != pw:
            raise SystemExit("passwords differ")
    if not pw:
        raise SystemExit("empty password")
    return pw


def cmd_alias(args: argparse.Namespace, cfg: configmod.Config) -> int:
    db = _db(cfg)
    with db.write() as s:
        if args.action == "list":
            for a in s.scalars(select(Alias).order_by(Alias.source, Alias.id)):
                print(f"{clean(a.source)} -> {clean(a.target)}")
            return 0
        source = args.source.lower()
        # Aliases are looked up only for local domains (a catch-all is "@domain").
        if "@" not in source or not cfg.is_local_domain(source.rsplit("@", 1)[1]) or (
            source.count("@") > 1
        ):
            print(f"{clean(source)}: not an address or @domain in a local domain "
                  f"({', '.join(cfg.mailroom.domains)})", file=sys.stderr)
            return 1
        targets = [t.lower() for t in args.targets]
        if args.action == "add":
            if not targets:
                print("alias add needs at least one target", file=sys.stderr)
                return 1
            bad = [t for t in targets if t.count("@") != 1 or t.startswith("@") or t.endswith("@")]
            if bad:
                print(f"{clean(bad[0])}: a target must be a full address (user@domain)", file=sys.stderr)
                return 1
            have = set(s.scalars(select(Alias.target).where(Alias.source == source)))
            for t in targets:
                if t not in have:
                    s.add(Alias(source=source, target=t))
                    have.add(t)
            print(f"{clean(source)} -> {clean(', '.join(targets))}")
        else:
            q = delete(Alias).where(Alias.source == source)
            if targets:
                q = q.where(Alias.target.in_(targets))
            before = postmaster.reachable(s, cfg.mailroom.domains, cfg.mda.recipient_delimiter)
            if s.execute(q).rowcount == 0:  # type: ignore[attr-defined]
                print(f"{clean(source)}: no such alias", file=sys.stderr)
                return 1
            print(f"deleted {clean(source)}" + (f" -> {clean(', '.join(targets))}" if targets else ""))
            _warn_lost_roles(s, cfg, before)
        s.commit()
    return 0


def _warn_lost_roles(s: Session, cfg: configmod.Config, before: set[str]) -> None:
    """Say which of postmaster and abuse no longer reach anyone (the change is kept)."""
    lost = before - postmaster.reachable(s, cfg.mailroom.domains, cfg.mda.recipient_delimiter)
    for role in sorted(lost):
        print(f"warning: {role} now delivers to nobody, and every mail domain must have it; "
              f"`mailroom alias add {role} ADDRESS` sets it", file=sys.stderr)


def cmd_trace(args: argparse.Namespace, cfg: configmod.Config) -> int:
    if args.follow:
        return trace.run_follow(_db(cfg), args.id, as_json=args.json)
    if args.id is None:
        print("trace: an ID is needed (or --follow, to watch every message)", file=sys.stderr)
        return 2
    found = trace.find(_db(cfg), args.id)
    if found is None:
        print(f"{clean(args.id)}: no such message", file=sys.stderr)
        return 1
    print(trace.to_json(found) if args.json else trace.render_text(found))
    return 0


def cmd_queue(args: argparse.Namespace, cfg: configmod.Config) -> int:
    db = _db(cfg)
    action, ident = args.action or "list", args.id
    if action in ("list", "show"):
        items = queuecmd.listing(db, ident if action == "show" else None)
        if action == "show" and not items:
            print(f"{clean(ident)}: not in the queue", file=sys.stderr)
            return 1
        print(json.dumps(items, indent=2) if args.json else queuecmd.render_text(items))
        return 0
    if action != "flush" and not ident:
        print(f"queue {action} needs a message id", file=sys.stderr)
        return 1
    if action == "flush":
        done = queuecmd.flush(cfg, db, ident)
    elif action in ("hold", "release"):
        done = queuecmd.set_held(cfg, db, ident, action == "hold")
    elif action == "delete":
        done = queuecmd.delete(db, ident)
    else:
        done = queuecmd.bounce_now(cfg, db, ident)
    print(done.text, file=sys.stdout if done.ok else sys.stderr)
    return 0 if done.ok else 1


def cmd_client_config(args: argparse.Namespace, cfg: configmod.Config) -> int:
    address = args.address.lower()
    domain = address.rsplit("@", 1)[1] if "@" in address else ""
    if not cfg.is_local_domain(domain):
        print(f"{address}: not in a local domain ({', '.join(cfg.mailroom.domains)})", file=sys.stderr)
        return 1
    settings = autoconfig.settings(cfg)
    if args.xml:
        print(autoconfig.render_xml(settings, domain), end="")
        return 0
    print(autoconfig.render_text(settings, address), end="")
    if cfg.imap.enabled and dovecot_sieve.managesieve_on(cfg):  # users' filters (Thunderbird, Roundcube)
        print(f"Filters:   ManageSieve {cfg.mailroom.hostname} port {configmod.parse_hostport(cfg.imap.sieve)[1]} "
              "STARTTLS, normal password")
    with _db(cfg).read() as s:
        if find_user(s, address) is None:
            print(f"note: {address} is not a user yet (`mailroom user add {address}`)")
    return 0


def cmd_config(args: argparse.Namespace, cfg: configmod.Config) -> int:
    data = public_config(cfg)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    for section, values in data.items():
        if isinstance(values, dict):
            for key, value in values.items():
                print(f"{section}.{key} = {clean(json.dumps(value))}")
        else:
            print(f"{section} = {clean(values)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mailroom", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="config file (default $MAILROOM_CONFIG or ./var/mailroom.toml)")
    sub = p.add_subparsers(dest="command", required=True)

    init = sub.add_parser("init", help="create a config, database and TLS certificate")
    init.add_argument("--dir", default="./var")
    init.add_argument("--domain", required=True)
    init.add_argument("--hostname", default="localhost")
    init.add_argument("--postmaster", metavar="ADDRESS",
                      help="where postmaster@ and abuse@ the domain go (default: the first user added)")
    init.add_argument("--user", default=setup.SYSTEM_USER,
                      help="as root: the account the daemons serve as, created when missing "
                      f"(default {setup.SYSTEM_USER}); otherwise the current user")

    sub.add_parser("run", help="run every daemon under supervisord, in the foreground")
    status = sub.add_parser("status", help="each daemon's state")
    status.add_argument("--cluster", action="store_true",
                        help="every node sharing the database: its roles, last heartbeat and leases")
    sub.add_parser("reload", help="every daemon takes a new certificate and the settings that can change "
                   "safely (SIGHUP), without a restart")
    for name in ("stop", "start", "restart"):
        sp = sub.add_parser(name, help=f"{name} a daemon (or all)")
        sp.add_argument("program", nargs="?", default="all", choices=(*supervise.PROGRAMS, "all"))

    user = sub.add_parser("user", help="mail users")
    uact = user.add_subparsers(dest="action", required=True)
    for name in ("add", "passwd", "del"):
        u = uact.add_parser(name)
        u.add_argument("address")
        if name != "del":
            u.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
        if name == "add":
            u.add_argument("--store", choices=("maildir", "mbox"))
            u.add_argument("--quota", type=int, default=0, help="bytes; 0 is unlimited")
    uact.add_parser("list")
    uact.add_parser("sync", help="rewrite the users file Dovecot reads (after changing users by other means)")

    alias = sub.add_parser("alias", help="aliases and forwarding (SOURCE may be @domain)")
    aact = alias.add_subparsers(dest="action", required=True)
    for name in ("add", "del"):
        a = aact.add_parser(name)
        a.add_argument("source")
        a.add_argument("targets", nargs="*")
    aact.add_parser("list")

    q = sub.add_parser("queue", help="list and steer the queue")
    q.add_argument("action", nargs="?", choices=("list", "show", "flush", "hold", "release", "delete", "bounce"))
    q.add_argument("id", nargs="?")
    q.add_argument("--json", action="store_true")

    t = sub.add_parser("trace", help="one message's journey (trace id or Message-ID)")
    t.add_argument("id", nargs="?")
    t.add_argument("--json", action="store_true")
    t.add_argument("--follow", "-f", action="store_true",
                   help="print each hop as it happens (without ID: every message's, until Ctrl-C; with ID: "
                   "until every recipient has its final outcome; an unknown ID is waited for 10 s)")

    cc = sub.add_parser("client-config", help="the settings a mail client needs for ADDRESS")
    cc.add_argument("address")
    cc.add_argument("--xml", action="store_true", help="the autoconfig XML the web program serves")
    dkimcmd.add_parser(sub)
    certcmd.add_parser(sub)
    clustercmd.add_parser(sub)
    dnscmd.add_parser(sub)
    labcmd.add_parser(sub)

    c = sub.add_parser("config", help="the effective configuration")
    c.add_argument("action", choices=("show",))
    c.add_argument("--json", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`mailroom queue | head`): stop quietly, as cat or
        # grep would.  Later flushes (at exit) go to /dev/null instead of failing again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 1
    return code


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "init":
        return cmd_init(args)
    if args.command == "lab":  # may make its installation first
        return labcmd.run(args)
    try:
        cfg = configmod.load(args.config)
    except configmod.ConfigError as exc:
        print(f"mailroom: config error: {clean(exc)}", file=sys.stderr)
        return 2
    # What the command writes (an admin event) is in the daemons' time, lab time in a lab.
    use_clock(for_lab(cfg.lab.time_warp, cfg.lab.time_warp_since))
    match args.command:
        case "run":
            return supervise.run(cfg)
        case "status" if args.cluster:
            return clustercmd.status(cfg)
        case "status":
            code = supervise.ctl(cfg, "status")
            print(certcmd.expiry_line(cfg))
            return code
        case "reload":
            return supervise.reload(cfg)
        case "cert":
            return certcmd.run(args, cfg)
        case "cluster":
            return clustercmd.run(args, cfg)
        case "stop" | "start" | "restart":
            return supervise.ctl(cfg, args.command, supervise.program_spec(cfg, args.program))
        case "user":
            return cmd_user(args, cfg)
        case "alias":
            return cmd_alias(args, cfg)
        case "queue":
            return cmd_queue(args, cfg)
        case "trace":
            return cmd_trace(args, cfg)
        case "config":
            return cmd_config(args, cfg)
        case "client-config":
            return cmd_client_config(args, cfg)
        case "dkim":
            return dkimcmd.run(args, cfg)
        case "dns":
            return dnscmd.run(args, cfg)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
