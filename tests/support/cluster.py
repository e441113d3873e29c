"""Several Mailroom nodes on this machine, sharing one database (docs/cluster.md).

A `Node` is a throwaway installation (`mailroom init`, as `Installation`)
that plays one host of a cluster: its own node name and roles
(`[mailroom] node`, `roles`), its own loopback address (127.0.0.11, ...:
every listener of its roles is there), its own run folder and its own
supervisord, started with `mailroom run`.  Every node points at the one
database and at the store's LMTP listener; with `Pki`, the hops between nodes
run over TLS with certificates of the installation's own CA (common/hop_tls.py,
made as `mailroom cluster ca` and `cluster cert` make them).

A node can be killed as a host dies (`kill()`: SIGKILL to every process it
runs, supervisord included, found by its session id) or frozen and thawed
(`freeze()`, `thaw()`: SIGSTOP and SIGCONT to the same processes).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from common import hop_tls
from tests.support.peers import session_members
from tests.support.ports import free_port
from tests.support.suite import LISTENERS, Installation

# The TCP listener settings a role's programs serve ("imap" is Dovecot's: not waited for here).
# The MTA's internal listener stays the Unix socket `mailroom init` makes: each MX node's MSA
# hands over to its own MTA.
ROLE_LISTENERS = {
    "msa": (("msa", "submission"), ("msa", "submissions")),
    "mta": (("mta", "smtp"),),
    "mda": (("mda", "lmtp"),),
    "web": (("web", "listen"),),
}


class Pki:
    """The installation's CA (as `mailroom cluster ca` makes it) and a certificate per node."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ca, self.ca_key = folder / "ca.pem", folder / "ca.key"
        hop_tls.make_ca(self.ca, self.ca_key, "Mailroom CA for the cluster test")

    def give(self, node: Node) -> None:
        """Node `node` gets the CA and its own certificate, for the address it listens on."""
        target = node.root / "cluster"
        target.mkdir(exist_ok=True)
        (target / "ca.pem").write_bytes(self.ca.read_bytes())
        hop_tls.issue(self.ca, self.ca_key, node.name, [node.address], target / "node.pem", target / "node.key")
        node.set("cluster", "ca", '"cluster/ca.pem"')


class Node(Installation):
    def __init__(
        self, root: Path, *, name: str, roles: Sequence[str], address: str = "127.0.0.1", database: str = "",
    ) -> None:
        super().__init__(root)
        self.name, self.roles, self.address = name, tuple(roles), address
        self.set("mailroom", "node", json.dumps(name))
        self.set("mailroom", "roles", json.dumps(list(roles)))
        if database:  # before any user exists: the users go to that database
            self.set("mailroom", "database", json.dumps(database))
            for leftover in self.root.glob("mailroom.db*"):  # `mailroom init` made one; nothing uses it
                leftover.unlink()
        # Every listener on this node's own address (ports drawn there).
        self.endpoints: dict[str, tuple[str, int]] = {}
        for (section, key), _ in LISTENERS.items():
            port = free_port(address)
            self.ports[key] = port
            self.endpoints[key] = (address, port)
            self.set(section, key, json.dumps(f"{address}:{port}"))
        self.supervisor_pid = 0

    def use_store(self, store: Node) -> None:
        """Deliver local mail to `store`'s MDA (what `[mda] lmtp` says on every node)."""
        host, port = store.endpoints["lmtp"]
        self.set("mda", "lmtp", json.dumps(f"{host}:{port}"))

    def start(self) -> None:
        """`mailroom run` in a session of its own; returns once this node's listeners answer."""
        log = os.fdopen(os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")
        self.supervisor = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "--config", str(self.config_path), "run"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            cwd=Path(__file__).resolve().parents[2],
        )
        self.supervisor_pid = self.supervisor.pid
        self._log = log
        try:
            for role in self.roles:
                for _, key in ROLE_LISTENERS.get(role, ()):
                    wait_for(self.endpoints[key], 60)
        except TimeoutError:
            self.stop()
            raise AssertionError(f"node {self.name} did not start:\n" + self.log_text()[-4000:]) from None

    def processes(self) -> list[int]:
        """Every process this node runs: `mailroom run`'s session (supervisord and its programs)."""
        return session_members(self.supervisor_pid) if self.supervisor_pid else []

    def kill(self) -> int:
        """kill -9 of every process of the node, as a host that loses power; how many."""
        pids = self.processes()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.supervisor is not None:
            self.supervisor.wait(10)
            self.supervisor = None
            self._log.close()
        deadline = time.monotonic() + 10
        while self.processes() and time.monotonic() < deadline:
            time.sleep(0.05)
        return len(pids)

    def freeze(self, pids: Sequence[int] | None = None) -> int:
        """SIGSTOP to every process of the node (a host that hangs), or to `pids` found
        a moment ago (reading /proc takes longer than some moments last); how many."""
        pids = self.processes() if pids is None else pids
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        return len(pids)

    def thaw(self) -> None:
        for pid in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def stop(self) -> None:
        super().stop()
        # What supervisord did not stop (it was killed, or stopped too slowly) goes now, by pid.
        for pid in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def wait_for(where: tuple[str, int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(where) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on {where[0]}:{where[1]}")
