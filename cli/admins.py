"""`mailroom admin add|passwd|del|list`: the accounts of the admin page.

An admin account is not a mail user: a name and an argon2id password hash in
the `admins` table, for logging in to the admin page (`[web] admin`).  Its
password comes from a prompt or one line of stdin (`--password-stdin`), never
from the command line, and must pass the same rule as a mail user's
(common/passwords.py): the admin page can change every account.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable

from sqlalchemy import select

from cli.show import clean
from common.config import Config
from common.db import Database
from common.models import Admin
from common.passwords import WeakPassword
from common.users import hash_new_password

NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


def run(args: argparse.Namespace, cfg: Config, db: Database, password: Callable[[argparse.Namespace], str]) -> int:
    if args.action == "list":
        with db.read() as s:
            for a in s.scalars(select(Admin).order_by(Admin.name)):
                print(f"{clean(a.name)}  since {a.created:%Y-%m-%d}")
        return 0
    name = args.name.lower()
    if not NAME.fullmatch(name):
        print(f"{clean(args.name)}: a name is letters, digits, '.', '_' and '-' (at most 64)", file=sys.stderr)
        return 1
    with db.read() as s:
        exists = s.scalars(select(Admin).where(Admin.name == name)).first() is not None
    if exists == (args.action == "add"):
        print(f"{name} exists" if exists else f"{name}: no such admin", file=sys.stderr)
        return 1
    try:
        hashed = hash_new_password(password(args), name) if args.action != "del" else ""
    except WeakPassword as exc:
        print(f"{name}: password refused: {exc}", file=sys.stderr)
        return 1
    with db.write() as s:
        admin = s.scalars(select(Admin).where(Admin.name == name)).first()
        if args.action == "add":
            if admin is not None:
                print(f"{name} exists", file=sys.stderr)
                return 1
            s.add(Admin(name=name, password_hash=hashed))
            where = f"https://{cfg.web.admin[0]}/admin" if cfg.web.admin else "the admin page (set [web] admin)"
            print(f"added admin {name}: log in at {where}")
        elif admin is None:
            print(f"{name}: no such admin", file=sys.stderr)
            return 1
        elif args.action == "passwd":
            admin.password_hash = hashed
            print(f"password changed for admin {name} (their open sessions end)")
        else:
            s.delete(admin)
            print(f"deleted admin {name} (their open sessions end)")
        s.commit()
    return 0
