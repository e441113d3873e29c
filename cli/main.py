"""`mailroom`: the operator's command (init, run, status, reload, user, alias, queue, trace, config, cert, lab...).

Every command takes --config FILE (default $MAILROOM_CONFIG or ./var/mailroom.toml).
User, alias, queue and trace commands work on the database directly, so they
work whether or not the daemons are running.
"""

# Why most imports below are inside functions: every `mailroom` command starts a
# new Python, and the test suite runs hundreds of them.  Importing every command's
# module up front (SQLAlchemy, cryptography, dnspython, alembic, argon2...) cost
# most of a second before anything ran, even for `mailroom --help`.  So the parser
# (cli/parser.py) imports nothing heavy, and each branch of `_main` imports the
# module of the command it runs, when it runs it.  Each command module still
# imports what it needs at its top, so it is whole before the command starts:
# what runs as root and then switches to the Mailroom user (`mailroom backup`)
# has its code loaded before the switch, as before.

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from cli.parser import build_parser
from cli.show import clean, public_config
from common import config as configmod
from common.clock import for_lab
from common.clock import use as use_clock

if TYPE_CHECKING:
    from common.db import Database


def _db(cfg: configmod.Config) -> Database:
    from common.db import Database

    db = Database(cfg.database_url, threads=1)
    db.create_schema()
    return db


def cmd_init(args: argparse.Namespace) -> int:
    from cli import dkim as dkimcmd
    from cli import postmaster, rspamd, setup
    from common import privileges
    from common.models import Domain
    from common.tls import make_self_signed

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
    from cli import dovecot

    return dovecot.find_program(configmod.IMAPSection().dovecot) is not None


def cmd_user(args: argparse.Namespace, cfg: configmod.Config) -> int:
    from sqlalchemy import select

    from cli import accounts, dovecot
    from common.models import User
    from common.users import is_disabled

    db = _db(cfg)
    if args.action == "list":
        with db.read() as s:
            for u in s.scalars(select(User).order_by(User.address)):
                quota = f" quota={u.quota}" if u.quota else ""
                off = " (logins disabled)" if is_disabled(u) else ""
                print(f"{clean(u.address)}  {clean(u.store)}  {clean(cfg.mail_root / u.mailbox)}{quota}{off}")
        return 0
    if args.action == "sync":
        # Dovecot reads its own copy of the users: rewritten after changes made by other means.
        try:
            dovecot.write_users(cfg, db)
        except OSError as exc:
            print(f"warning: Dovecot's users file was not rewritten ({exc})", file=sys.stderr)
            return 1
        return 0
    try:
        match args.action:
            case "add":
                # Ask for the password only once the address is known to be free.
                accounts.expect(cfg, db, args.address, exists=False)
                done = accounts.add_user(cfg, db, args.address, _password(args), store=args.store, quota=args.quota)
            case "passwd":
                accounts.expect(cfg, db, args.address, exists=True)
                done = accounts.set_password(cfg, db, args.address, _password(args))
            case "quota":
                done = accounts.set_quota(cfg, db, args.address, args.bytes)
            case "disable" | "enable":
                done = accounts.set_login(cfg, db, args.address, enabled=args.action == "enable")
            case _:
                done = accounts.delete_user(cfg, db, args.address)
    except accounts.Refused as exc:
        print(exc, file=sys.stderr)
        return 1
    for line in done.lines:
        print(line)
    for warning in done.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 1 if done.unsynced else 0


def _password(args: argparse.Namespace) -> str:
    """From a prompt (twice, not echoed) or one line of stdin (--password-stdin, or
    whenever stdin is not a terminal: `echo pw | mailroom user add ...`); never from
    argv, where other local users could read it in `ps` and it would stay in shell history."""
    if args.password_stdin or not sys.stdin.isatty():
        pw = sys.stdin.readline().rstrip("\r\n")
    else:
        pw = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != pw:
            raise SystemExit("passwords differ")
    if not pw:
        raise SystemExit("empty password")
    return pw


def cmd_alias(args: argparse.Namespace, cfg: configmod.Config) -> int:
    from sqlalchemy import select

    from cli import accounts
    from common.models import Alias

    db = _db(cfg)
    if args.action == "list":
        with db.read() as s:
            for a in s.scalars(select(Alias).order_by(Alias.source, Alias.id)):
                print(f"{clean(a.source)} -> {clean(a.target)}")
        return 0
    try:
        if args.action == "add":
            done = accounts.add_alias(cfg, db, args.source, args.targets)
        else:
            done = accounts.delete_alias(cfg, db, args.source, args.targets)
    except accounts.Refused as exc:
        print(exc, file=sys.stderr)
        return 1
    for line in done.lines:
        print(line)
    for warning in done.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def cmd_trace(args: argparse.Namespace, cfg: configmod.Config) -> int:
    from cli import trace

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
    from cli import queue as queuecmd

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
    from cli import dovecot_sieve
    from common.users import find_user
    from web import autoconfig

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
        from cli import lab as labcmd

        return labcmd.run(args)
    if args.command == "restore":  # needs no installation: it makes one
        from cli import restore as restorecmd

        return restorecmd.run(args)
    try:
        cfg = configmod.load(args.config)
    except configmod.ConfigError as exc:
        print(f"mailroom: config error: {clean(exc)}", file=sys.stderr)
        return 2
    # What the command writes (an admin event) is in the daemons' time, lab time in a lab.
    use_clock(for_lab(cfg.lab.time_warp, cfg.lab.time_warp_since))
    match args.command:
        case "run":
            from cli import supervise

            return supervise.run(cfg)
        case "status" if args.cluster:
            from cli import cluster as clustercmd

            return clustercmd.status(cfg)
        case "status":
            from cli import backup as backupcmd
            from cli import cert as certcmd
            from cli import supervise

            code = supervise.ctl(cfg, "status")
            print(certcmd.expiry_line(cfg))
            print(backupcmd.status_line(cfg))
            return code
        case "reload":
            from cli import supervise

            return supervise.reload(cfg)
        case "cert":
            from cli import cert as certcmd

            return certcmd.run(args, cfg)
        case "cluster":
            from cli import cluster as clustercmd

            return clustercmd.run(args, cfg)
        case "stop" | "start" | "restart":
            from cli import supervise

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
            from cli import dkim as dkimcmd

            return dkimcmd.run(args, cfg)
        case "dns":
            from cli import dns as dnscmd

            return dnscmd.run(args, cfg)
        case "status-checks":
            from cli import checks as statuschecks

            return statuschecks.run(args, cfg)
        case "backup":
            from cli import backup as backupcmd

            return backupcmd.run(args, cfg)
        case "check":
            from cli import storecheck

            return storecheck.run(args, cfg, _db(cfg))
        case "admin":
            from cli import admins

            return admins.run(args, cfg, _db(cfg), _password)
        case "dmarc":
            from cli import dmarc as dmarccmd

            return dmarccmd.run(args, cfg, _db(cfg))
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
