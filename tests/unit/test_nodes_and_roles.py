"""Nodes and roles: what `mailroom run` starts on a node, and what `status --cluster` reads."""

from __future__ import annotations

import datetime as dt
import re
import socket
from pathlib import Path

import pytest
from sqlalchemy import insert

from cli import cluster, roles, supervise
from common import config, node
from common.db import Database
from common.models import ACTIVE, QUEUED, Message, Recipient

NOW = dt.datetime(2026, 12, 5, 12, 0, 0)


def load(tmp_path: Path, text: str) -> config.Config:
    path = tmp_path / "mailroom.toml"
    path.write_text('[mailroom]\ndomains = ["example.org"]\n' + text)
    return config.load(path)


def programs(conf: str) -> set[str]:
    return set(re.findall(r"(?m)^\[program:([^\]]+)\]", conf))


def test_a_node_is_named_after_its_host_unless_told(tmp_path: Path) -> None:
    assert load(tmp_path, "").node == socket.gethostname()
    assert load(tmp_path, 'node = "mx1"\n').node == "mx1"
    assert load(tmp_path, "").mailroom.roles == list(config.ROLES)  # one host runs everything
    assert load(tmp_path, "").queue.lease == 60.0


@pytest.mark.parametrize(("given", "runs"), [
    (["mta", "qmgr", "msa"], {"mta", "qmgr", "msa"}),
    (["mda", "web"], {"mda", "web", "schedule"}),
    (list(config.ROLES), {"mta", "qmgr", "msa", "mda", "web", "schedule"}),
])
def test_supervisord_runs_the_programs_of_the_roles(tmp_path: Path, given: list[str], runs: set[str]) -> None:
    cfg = load(tmp_path, f"roles = {given!r}\n".replace("'", '"'))
    conf = supervise.render(cfg).read_text()
    assert programs(conf) == runs
    assert "[eventlistener:watch]" in conf  # of no role: on every node


def test_the_filter_the_renewer_and_the_daily_jobs_go_with_their_roles() -> None:
    conf = "".join(f"[program:{p}]\ncommand = {p}\n\n" for p in ("rspamd", "redis", "renew", "schedule", "lab"))
    assert programs(roles.keep(conf, ["mda", "web"])) == {"renew", "schedule", "lab"}
    # The daily jobs run once, on the store: never on an MX node (a DMARC report per node).
    assert programs(roles.keep(conf, ["mta"])) == {"rspamd", "redis", "lab"}


def test_a_node_binds_only_the_listeners_of_its_roles() -> None:
    mx = ["mta", "qmgr", "msa"]
    assert roles.binds("mta.smtp", mx) and roles.binds("msa.submission", mx)
    # The store's LMTP address is only where an MX host's queue manager connects.
    assert not roles.binds("mda.lmtp", mx) and not roles.binds("web.listen", mx)
    assert roles.binds("mda.lmtp", ["mda"]) and roles.binds("mda.lmtp", list(config.ROLES))


def test_hop_listeners_may_face_other_hosts_only_with_the_cluster_ca(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match=r"mda\.lmtp: must be a loopback address"):
        load(tmp_path, '[mda]\nlmtp = "192.0.2.3:2424"\n')
    cfg = load(tmp_path, '[mda]\nlmtp = "192.0.2.3:2424"\n[mta]\ninternal = "192.0.2.1:10025"\n'
                         '[cluster]\nca = "cluster/ca.pem"\n')
    assert str(cfg.endpoint("mda.lmtp")) == "192.0.2.3:2424"


def test_the_cluster_status_shows_roles_heartbeats_and_leases(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path}/m.db", threads=1)
    db.create_schema()
    try:
        with db.write() as s:
            conn = s.connection()
            node.beat(conn, "mx1", ["mta", "qmgr", "msa"], NOW - dt.timedelta(seconds=5))
            node.beat(conn, "mx1", ["mta", "qmgr", "msa"], NOW - dt.timedelta(seconds=3))  # one row, moved on
            node.beat(conn, "mx2", ["mta", "qmgr", "msa"], NOW - dt.timedelta(seconds=95))
            node.beat(conn, "store", ["mda", "web"], NOW - dt.timedelta(seconds=1))
            conn.execute(insert(Message), [{"id": "T1", "sender": "", "body": b"x", "received": NOW}])
            leases = [("mx1:11.5", NOW + dt.timedelta(seconds=40)), ("mx1:11.5", NOW + dt.timedelta(seconds=50)),
                      ("mx2:12.7", NOW - dt.timedelta(seconds=20)), ("mx2:12.7", NOW + dt.timedelta(seconds=1))]
            conn.execute(insert(Recipient), [
                {"message_id": "T1", "address": f"u{k}@example.org", "state": ACTIVE, "owner": owner,
                 "lease": "t", "lease_expires": expires, "next_attempt": NOW}
                for k, (owner, expires) in enumerate(leases)
            ])
            conn.execute(insert(Recipient), {"message_id": "T1", "address": "q@example.org", "state": QUEUED,
                                             "owner": "", "next_attempt": NOW})
            s.commit()
        with db.read() as s:
            states = node.cluster(s.connection(), NOW)
    finally:
        db.close()
    assert [(n.name, n.roles, n.leases, n.expired) for n in states] == [
        ("mx1", ("mta", "qmgr", "msa"), 2, 0), ("mx2", ("mta", "qmgr", "msa"), 2, 1), ("store", ("mda", "web"), 0, 0),
    ]
    table = cluster.render(states, NOW, lease=60.0).splitlines()
    assert table[0].split() == ["node", "roles", "heartbeat", "leases"]
    assert re.fullmatch(r"mx1\s+mta qmgr msa\s+3s ago\s+2 held", table[1])
    assert re.fullmatch(r"mx2\s+mta qmgr msa\s+95s ago \(silent\)\s+2 held, 1 expired", table[2])
    assert re.fullmatch(r"store\s+mda web\s+1s ago\s+-", table[3])
