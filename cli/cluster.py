"""`mailroom cluster ca|cert` and `mailroom status --cluster`: several hosts on one database.

`cluster ca` makes the installation's own CA (common/hop_tls.py); `cluster cert
NODE --name ADDRESS...` signs a certificate for a node, valid for the names and
addresses its peers dial.  `status --cluster` lists every node that shares the
database: its roles, its last heartbeat (common/node.py) and the claims on
recipients its queue managers hold (mta/queue.py), with those already expired.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys

from cli.show import clean
from common import hop_tls, node
from common.clock import process_now
from common.config import Config
from common.db import Database

CA_CERT = "ca.pem"
CA_KEY = "ca.key"


def run(args: argparse.Namespace, cfg: Config) -> int:
    folder = cfg.resolve(args.dir)
    ca_cert, ca_key = folder / CA_CERT, folder / CA_KEY
    if args.action == "ca":
        if ca_cert.exists() or ca_key.exists():
            print(f"{clean(folder)}: a CA is there already; not replacing it (every node trusts it)", file=sys.stderr)
            return 1
        hop_tls.make_ca(ca_cert, ca_key, f"Mailroom CA for {cfg.mailroom.domains[0]}")
        print(f"created {clean(ca_cert)} (give it to every node: [cluster] ca) and {clean(ca_key)} (keep it here)")
        return 0
    if not ca_key.exists():
        print(f"{clean(ca_key)}: no CA here (`mailroom cluster ca` makes one)", file=sys.stderr)
        return 1
    if args.node == cfg.node and not args.out:
        cert, key = cfg.resolve(cfg.cluster.cert), cfg.resolve(cfg.cluster.key)
    else:
        out = cfg.resolve(args.out) if args.out else folder
        cert, key = out / f"{args.node}.pem", out / f"{args.node}.key"
    try:
        hop_tls.issue(ca_cert, ca_key, args.node, args.name, cert, key)
    except (OSError, ValueError) as exc:
        print(f"mailroom cluster cert: {clean(exc)}", file=sys.stderr)
        return 1
    names = ", ".join([args.node, *args.name])
    print(f"created {clean(cert)} and {clean(key)} for node {clean(args.node)} ({clean(names)})")
    return 0


def status(cfg: Config) -> int:
    """Every node sharing the database: roles, heartbeat, leases.  Exit status 0."""
    db = Database(cfg.database_url, threads=1)
    try:
        db.create_schema()
        now = process_now()
        with db.read() as s:
            nodes = node.cluster(s.connection(), now)
    finally:
        db.close()
    print(render(nodes, now, cfg.queue.lease))
    return 0


def render(nodes: list[node.NodeState], now: dt.datetime, lease: float) -> str:
    """The table `status --cluster` prints."""
    rows = [("node", "roles", "heartbeat", "leases")]
    for n in nodes:
        if n.heartbeat is None:
            beat = "never"
        else:
            age = max(0.0, (now - n.heartbeat).total_seconds())
            # A node silent for a whole lease has lost its claims: the others take them over.
            beat = f"{age:.0f}s ago" + ("" if age <= lease else " (silent)")
        held = "-" if not n.leases else f"{n.leases} held" + (f", {n.expired} expired" if n.expired else "")
        rows.append((n.name, " ".join(n.roles) or "-", beat, held))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(
        "  ".join(clean(c).ljust(w) for c, w in zip(r[:3], widths, strict=True)) + "  " + clean(r[3]) for r in rows
    )

