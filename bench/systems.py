"""The two systems under test, behind one small interface.

`MailroomSystem` is a throwaway Mailroom (tests/support/suite.Installation: the
four real daemons under supervisord); `PostfixSystem` a throwaway Postfix
(tests/support/postfix.PostfixInstance: smtpd -> cleanup -> qmgr -> virtual(8)
into Maildirs).  Both listen on loopback, keep their files on the same disk
(not tmpfs, where fsync would be free), and deliver to the same local users.
"""

from __future__ import annotations

import os
import pwd
import sqlite3
from pathlib import Path

from bench import procmem
from tests.harness.users import add_users
from tests.support.peers import session_members
from tests.support.postfix import PostfixInstance
from tests.support.suite import Installation

DOMAIN = "example.org"
SENDER = "load@source.test"


class MailroomSystem:
    name = "Mailroom"

    def __init__(self, root: Path, users: list[str], idle_connections: int, mta_processes: int = 1) -> None:
        # The default per-client cap (50) would turn away the idle-connection load,
        # which comes from one address; Postfix gets the same treatment below.
        cap = max(1100, idle_connections + 100)
        extra = f"\n[smtp]\nmax_connections = {cap}\nmax_connections_per_client = {cap}\n"
        self.inst = Installation(root, domain=DOMAIN, extra=extra)
        self.inst.set("mta", "processes", str(mta_processes))
        self.users = users
        add_users(self.inst, *(f"{u}@{DOMAIN}" for u in users))
        self._boxes: dict[str, Path] = {}

    def start(self) -> None:
        for u in self.users:
            box = self.inst.mailbox(f"{u}@{DOMAIN}")
            for sub in ("tmp", "new", "cur"):
                (box / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
            self._boxes[u] = box
        self.inst.give()  # made here as root: the MDA serves as the Mailroom user
        self.inst.start(timeout=120)  # a busy machine starts daemons slowly; the loads measure, not this

    def stop(self) -> None:
        self.inst.stop()

    @property
    def port(self) -> int:
        return self.inst.ports["smtp"]

    def new_folder(self, user: str) -> Path:
        return self._boxes[user] / "new"

    def listener_pids(self) -> list[int]:
        return list(self.inst.program_pids("mta").values())

    def program_pids(self) -> dict[str, int]:
        """Each daemon process by supervisord's name for it: mta, or mta_0, mta_1, ...
        with `[mta] processes` > 1 (the CPU table then shows each)."""
        return {full.rsplit(":", 1)[-1]: pid for n in ("mta", "qmgr", "mda", "msa")
                for full, pid in self.inst.program_pids(n).items()}

    def processes(self) -> dict[int, str]:
        """`mailroom run` (what stays of it: cli/watch.py), supervisord, its event listener
        and the four daemons, named by program."""
        assert self.inst.supervisor is not None
        run = self.inst.supervisor.pid
        named = {pid: name for name, pid in self._pids_cache().items()}
        out = {run: "mailroom run"}
        for sup in procmem.children(run):
            out[sup] = "supervisord"
            for pid in procmem.children(sup):
                out[pid] = named.get(pid, procmem.name_of(pid))
        return out

    def _pids_cache(self) -> dict[str, int]:
        if not hasattr(self, "_programs"):
            self._programs = self.program_pids()
        return self._programs

    def own_latencies(self, user: str) -> list[float]:
        """Seconds from the mta `received` event to the mda `delivered` event, per message."""
        db = self.inst.config.database_url.removeprefix("sqlite:///")
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
        try:
            rows = con.execute(
                "SELECT (julianday(d.time) - julianday(r.time)) * 86400.0 FROM events d"
                " JOIN events r ON r.trace_id = d.trace_id AND r.hop = 'mta' AND r.event = 'received'"
                " WHERE d.hop = 'mda' AND d.event = 'delivered' AND d.recipient = ?",
                (f"{user}@{DOMAIN}",),
            ).fetchall()
        finally:
            con.close()
        return [float(r[0]) for r in rows]


class PostfixSystem:
    name = "Postfix"

    def __init__(self, root: Path, users: list[str], idle_connections: int) -> None:
        limit = str(max(1100, idle_connections + 100))
        self.pf = PostfixInstance(
            root,
            virtual_domains=[DOMAIN],
            virtual_mailboxes=[f"{u}@{DOMAIN}" for u in users],
            main_cf={
                # One smtpd process per connection: allow as many as Mailroom allows
                # connections, and lift anvil's per-client cap the same way.
                "default_process_limit": limit,
                "smtpd_client_connection_count_limit": "0",
            },
        )
        self.users = users

    def start(self) -> None:
        self.pf.start()
        mail = pwd.getpwnam("mail")
        for u in self.users:
            box = self.pf.maildir_path(f"{u}@{DOMAIN}")
            for sub in ("tmp", "new", "cur"):
                (box / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
            for p in (box, box / "tmp", box / "new", box / "cur"):
                os.chown(p, mail.pw_uid, mail.pw_gid)

    def stop(self) -> None:
        self.pf.stop()

    @property
    def port(self) -> int:
        return self.pf.smtp_port

    def new_folder(self, user: str) -> Path:
        return self.pf.maildir_path(f"{user}@{DOMAIN}") / "new"

    def master_pid(self) -> int:
        pid = self.pf._read_master_pid()
        assert pid is not None, "Postfix master is not running"
        return pid

    def listener_pids(self) -> list[int]:
        """master (which holds the listening socket) and every smtpd process."""
        return [p for p, n in self.processes().items() if n in ("master", "smtpd")]

    def processes(self) -> dict[int, str]:
        return {pid: procmem.name_of(pid) for pid in session_members(self.master_pid())}

    def own_latencies(self, user: str) -> list[float]:
        """Postfix's own `delay=` per delivery: queue-file creation (at MAIL FROM) to delivery."""
        out = []
        needle = f"to=<{user}@{DOMAIN}>"
        for line in self.pf.log_text().splitlines():
            if needle in line and "status=sent" in line and " delay=" in line:
                out.append(float(line.split(" delay=", 1)[1].split(",", 1)[0]))
        return out
