"""What `mailroom run` starts on this node: the programs of its `[mailroom] roles`.

One host runs everything (the default).  Several hosts sharing one database
(docs/cluster.md) each run a part: MX hosts `["mta", "qmgr", "msa"]`, the
mail store `["mda", "imap", "web"]`.  A role names the programs it runs and
the listener settings it binds; a program of no role (the lab, the resolver,
supervisord's watcher) runs on every node.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from cli import watch

# The supervised programs of each role.  The content filter (rspamd and its Redis)
# scans what the public listener takes, so it runs where the MTA does; the
# certificate renewer answers its HTTP challenges through the web program.  The daily
# jobs (backup, DMARC aggregate reports) run on one node only, the store, where the
# mailboxes are: on every node each domain would get its DMARC report once per node.
PROGRAMS = {
    "msa": ("msa",),
    "mta": ("mta", "rspamd", "redis"),
    "qmgr": ("qmgr",),
    "mda": ("mda", "schedule"),
    "imap": ("imap",),
    "web": ("web", "renew"),
}

# Every program of supervisord.conf (what `mailroom stop/start/restart` may name): the four
# daemons (cli/watch.py stops the suite when one cannot start), the web program, Dovecot, the
# certificate renewer, the supervised content filter and the daily jobs.
SUPERVISED = (*watch.PROGRAMS, "web", "imap", "renew", "redis", "rspamd", "schedule")

# A program section of supervisord.conf, up to the next section.
_SECTION = re.compile(r"(?ms)^\[program:([^\]]+)\]\n.*?(?=^\[|\Z)")


def not_run(roles: Sequence[str]) -> set[str]:
    """The programs this node does not run."""
    return {p for role, programs in PROGRAMS.items() if role not in roles for p in programs}


def keep(conf: str, roles: Sequence[str]) -> str:
    """supervisord.conf with only the programs of `roles` (and those of no role)."""
    off = not_run(roles)
    return _SECTION.sub(lambda m: f"; {m.group(1)}: not a role of this node\n\n" if m.group(1) in off
                        else m.group(0), conf)


def binds(key: str, roles: Sequence[str]) -> bool:
    """Whether a listener setting ("mda.lmtp") is bound on this node: its section's
    program runs here.  Elsewhere it is only an address to connect to (the store's
    LMTP, for an MX host's queue manager)."""
    section = key.partition(".")[0]
    return section not in PROGRAMS or section in roles
