"""Dovecot's count of failed IMAP and POP3 logins, read from its stats-reader socket for /metrics.

Dovecot authenticates IMAP and POP3 itself, so the MSA's counter never sees those
failures.  The configuration `mailroom run` writes (cli/dovecot.py) declares a
metric `auth_failures` over the event Dovecot emits when an authentication ends,
counting those that did not succeed, grouped by the protocol (service) asking;
Dovecot's stats process keeps it in memory, and answers its documented reader
protocol on a Unix socket (what `doveadm stats dump` speaks):

    > VERSION\\tstats-reader-client\\t2\\t0
    > DUMP\\tcount
    < VERSION\\tstats-reader-server\\t2\\t0
    < auth_failures\\t3
    < auth_failures_imap\\t2
    < auth_failures_pop3\\t1
    < (an empty line ends the dump)

The socket's path is in the file SOCKET_FILE under the run folder, written with
the configuration (Dovecot's base folder may be a short one under /tmp).
Nothing here costs Dovecot anything per login: it counts in its own process,
and this asks only when /metrics is scraped.  The counts start again from zero
when Dovecot restarts (a counter reset, which Prometheus's rate() expects).
Knows nothing of Mailroom's config: it takes the run folder.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path

log = logging.getLogger("web.dovecot")

SOCKET_FILE = Path("dovecot") / "stats-socket"  # under the run folder: the socket's path, one line
METRIC = "auth_failures"
TIMEOUT = 2.0  # seconds: a stuck Dovecot costs a scrape this much at most
MAX_ANSWER = 1 << 16


def socket_path(run_dir: Path) -> Path | None:
    """Where Dovecot's stats-reader socket is, or None when Dovecot is not configured."""
    try:
        text = (run_dir / SOCKET_FILE).read_text().strip()
    except OSError:
        return None
    return Path(text) if text else None


def auth_failures(path: Path) -> dict[str, float]:
    """Failed logins by protocol ({"imap": 2.0, "pop3": 1.0}); {} when Dovecot cannot be asked."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(TIMEOUT)
            s.connect(str(path))
            s.sendall(b"VERSION\tstats-reader-client\t2\t0\nDUMP\tcount\n")
            answer = b""
            while not answer.endswith(b"\n\n") and len(answer) < MAX_ANSWER:
                chunk = s.recv(4096)
                if not chunk:
                    break
                answer += chunk
    except OSError as exc:
        log.debug("cannot read Dovecot's statistics at %s: %s", path, exc)
        return {}
    return parse(answer.decode("utf-8", "replace"))


def parse(answer: str) -> dict[str, float]:
    """The per-protocol rows of the `auth_failures` metric in a DUMP answer."""
    lines = answer.split("\n")
    if not lines or not lines[0].startswith("VERSION\tstats-reader-server\t2\t"):
        return {}
    found: dict[str, float] = {}
    for line in lines[1:]:
        if not line:
            break
        name, _, count = line.partition("\t")
        protocol = name.removeprefix(f"{METRIC}_")
        if protocol != name and protocol.isalnum():
            try:
                found[protocol] = float(count.split("\t")[0])
            except ValueError:
                continue
    return found
