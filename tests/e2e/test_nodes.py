"""Nodes and roles: two nodes on one database, each running what its roles say.

An MX node (`roles = ["mta", "qmgr", "msa"]`) and a store node (`["mda", "web"]`),
each its own installation started with `mailroom run`, share one SQLite
database.  Mail taken by the MX node's public listener is handed by its queue
manager to the store's MDA over TLS with the installation's own CA; each node's
supervisord runs only its roles' programs; `mailroom status --cluster` lists
both nodes with their roles and a fresh heartbeat.
"""

from __future__ import annotations

import re
import smtplib
from pathlib import Path

import pytest

from tests.harness.users import add_user
from tests.support.cluster import Node, Pki
from tests.support.suite import maildir_messages

pytestmark = pytest.mark.timeout(120)


def test_each_node_runs_its_roles_and_the_cluster_status_lists_them(tmp_path: Path) -> None:
    store = Node(tmp_path / "store", name="store", roles=["mda", "web"])
    mx = Node(tmp_path / "mx1", name="mx1", roles=["mta", "qmgr", "msa"], database=store.config.database_url)
    pki = Pki(store.root.parent / "pki")
    for node in (store, mx):
        pki.give(node)
        node.use_store(store)
    add_user(store, "alice@example.org", "maildir")
    store.start()
    try:
        mx.start()
        try:
            programs = {n.name: set(re.findall(r"(?m)^(\w+)\s+RUNNING", n.cli("status").stdout)) - {"watch"}
                        for n in (mx, store)}
            # The daily jobs (schedule) go with the store's mda role: one node sends the DMARC reports.
            assert programs == {"mx1": {"mta", "qmgr", "msa"}, "store": {"mda", "web", "schedule"}}, programs

            with smtplib.SMTP(*mx.endpoints["smtp"], timeout=30) as client:
                client.sendmail("carol@example.net", ["alice@example.org"],
                                b"Subject: two nodes\r\n\r\nTaken by mx1, stored by the store.\r\n")
            alice = store.mailbox("alice@example.org")
            store.wait_for(lambda: len(maildir_messages(alice)) == 1, timeout=30, what="delivery to the store")
            assert maildir_messages(alice)[0].read_bytes().endswith(b"Taken by mx1, stored by the store.\n")

            status = mx.cli("status", "--cluster")
            assert status.returncode == 0, status.stderr
            rows = {line.split()[0]: line for line in status.stdout.splitlines()[1:]}
            assert set(rows) == {"mx1", "store"}, status.stdout
            assert re.match(r"mx1\s+mta qmgr msa\s+\d+s ago\s+-$", rows["mx1"]), status.stdout
            assert re.match(r"store\s+mda web\s+\d+s ago\s+-$", rows["store"]), status.stdout
            ages = [int(m) for m in re.findall(r"(\d+)s ago", status.stdout)]
            assert max(ages) <= 60, status.stdout  # beating: a third of the 60 s lease apart
            assert "Traceback" not in mx.log_text() + store.log_text()
        finally:
            mx.stop()
    finally:
        store.stop()
