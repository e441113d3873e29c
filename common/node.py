"""This node among the hosts that share one database: its heartbeat row, and every node's.

Several hosts may run Mailroom on one PostgreSQL database (docs/cluster.md),
each a *node* with a name (`[mailroom] node`) and the roles it runs
(`[mailroom] roles`).  Every daemon of a node writes the node's row in `nodes`
a third of `[queue] lease` apart, so `mailroom status --cluster` can say which
nodes are alive and what each runs.  The row is for people: what keeps the
queue safe is the lease on each claimed recipient (mta/queue.py), which the
queue manager renews by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Connection, func, select
from sqlalchemy.dialects import postgresql, sqlite

from common.clock import Clock
from common.db import Database
from common.models import ACTIVE, Node, Recipient

log = logging.getLogger("node")


def beat(conn: Connection, name: str, roles: Sequence[str], now: dt.datetime) -> None:
    """Write this node's row: its roles and `now` as its heartbeat (made on first use)."""
    values = {"name": name, "roles": " ".join(roles), "heartbeat": now}
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    # The daemons of one node all write the row: an upsert, never a second row.
    statement = dialect.insert(Node).values(values)
    conn.execute(statement.on_conflict_do_update(
        index_elements=[Node.name], set_={"roles": values["roles"], "heartbeat": now},
    ))


async def keep_beating(
    db: Database, clock: Clock, name: str, roles: Sequence[str], every: float, stop: asyncio.Event
) -> None:
    """Beat every `every` seconds until `stop`; a database that cannot be written
    is said once (and again when it can be), never fatal: the daemon's own work
    reports its own errors."""
    failing = False
    while not stop.is_set():
        try:
            await db.write_batched(beat, name, roles, clock.now(), relaxed=True)
            if failing:
                log.info("heartbeat written again")
            failing = False
        except Exception as exc:  # noqa: BLE001 - a heartbeat must not stop a daemon
            if not failing:
                log.warning("cannot write this node's heartbeat: %s", exc)
            failing = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)


@dataclass(frozen=True)
class NodeState:
    """One node as `mailroom status --cluster` shows it."""

    name: str
    roles: tuple[str, ...]
    heartbeat: dt.datetime | None  # None: it holds leases but never wrote its row
    leases: int  # recipients it holds a claim on
    expired: int  # of those, how many claims expired (any queue manager may take them)


def cluster(conn: Connection, now: dt.datetime) -> list[NodeState]:
    """Every node: its row, and the leases its queue managers hold (by the owner's node part)."""
    rows = {n.name: n for n in conn.execute(select(Node.name, Node.roles, Node.heartbeat))}
    node_of = func.substr(Recipient.owner, 1, func.instr(Recipient.owner, ":") - 1) \
        if conn.dialect.name == "sqlite" else func.split_part(Recipient.owner, ":", 1)
    held = conn.execute(
        select(
            node_of.label("node"), func.count(),
            func.count().filter(Recipient.lease_expires < now),
        ).where(Recipient.state == ACTIVE).group_by(node_of)
    ).all()
    leases = {h[0]: (int(h[1]), int(h[2])) for h in held}
    out = []
    for name in sorted(set(rows) | set(leases)):
        row = rows.get(name)
        count, expired = leases.get(name, (0, 0))
        out.append(NodeState(name, tuple(row.roles.split()) if row else (), row.heartbeat if row else None,
                             count, expired))
    return out

