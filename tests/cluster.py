"""The cluster run: two MX nodes and a mail store on one PostgreSQL, one MX host killed, the other frozen.

    python -m tests.cluster --messages 2000 --sessions 20 [--lease 10] [--rate 25]

As root (PostgreSQL runs as its own user).  Three nodes on this machine, each
with its own loopback address, node name, run folder and supervisord
(tests/support/cluster.py), and one throwaway PostgreSQL cluster
(tests/support/postgres.py) as their shared database:

    mx1    127.0.0.11   mta qmgr msa
    mx2    127.0.0.12   mta qmgr msa
    store  127.0.0.13   mda          (the MX nodes' queue managers reach it over TLS, common/hop_tls.py)

with `[queue] lease` short (10 s), so that the run fits in a few minutes.

`--sessions` SMTP sessions, half of them starting at mx1's public listener and
half at mx2's, send `--messages` messages at `--rate` messages a second in
all, to a Maildir user and an mbox user.  Each behaves like a sending MTA
that has both MX hosts: a refused or silent connection, a lost reply or a 4xx
means the same message again, at the other MX host.  Meanwhile:

1. once a quarter of the messages are accepted, at a moment when mx1's queue
   manager holds claims, every process of mx1 (supervisord too) gets
   SIGKILL: a host that loses its power.  mx2's queue manager must take over
   mx1's claims when their lease runs out, and deliver them;
2. when mx2 has taken over every claim mx1 left (at most the lease and 10 s
   later), mx1 starts again (`mailroom run`), as a host that reboots (that
   those recipients are delivered in time is checked at the end: max_delay_s);
3. once more than half the messages are accepted, at a moment when mx2 holds
   claims, every process of mx2 gets SIGSTOP for twice the lease, then
   SIGCONT: a host that hangs.  mx1 takes its claims over; mx2, when it wakes,
   can settle none of them (its leases are gone: fencing), and the MDA's
   idempotent stores keep the mailboxes exact.

Then the queue must drain, and the store's two mailboxes are read: every
message a client was told 250 for must be there exactly once, body intact.
The last line of output is

    accepted=N delivered=N lost=0 duplicates=0 max_delay_s=X

where X is the longest time from the kill to the delivery of a recipient that
mx1 had queued and not delivered.  Exit status 0 only when nothing was lost,
duplicated, damaged or wrongly delivered, the queue drained, mx1 held claims
when it was killed, and X is at most the lease plus 10 s.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import email
import itertools
import random
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import func, select

from common.db import Database
from common.models import ACTIVE, FINAL_STATES, Event, Message, Recipient
from tests.chaos import _Forgetful, body_hash, make_message
from tests.harness.client import Client, stuff
from tests.harness.users import add_user
from tests.support.cluster import Node, Pki
from tests.support.suite import maildir_messages, mbox_messages

RECIPIENTS = ("alice@example.org", "bob@example.org")  # Maildir, mbox
ADDRESSES = {"mx1": "127.0.0.11", "mx2": "127.0.0.12", "store": "127.0.0.13"}
MX_ROLES = ("mta", "qmgr", "msa")
STORE_ROLES = ("mda",)
# A recipient the killed node left must be delivered within the lease and this much more.
GRACE = 10.0


def postgresql_settings(lease: float) -> dict[str, str]:
    """The server settings of the run (docs/cluster.md): a node frozen inside a transaction
    loses that transaction, and the row locks it holds, within half a lease."""
    return {"idle_in_transaction_session_timeout": f"{int(lease * 500)}ms"}


@dataclass
class Outcomes:
    accepted: dict[str, tuple[str, str]] = field(default_factory=dict)  # id -> (body hash, node that said 250)
    refused: dict[str, str] = field(default_factory=dict)
    indoubt: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self) -> int:
        with self.lock:
            return len(self.accepted)


class Sender:
    """One SMTP session of a sending MTA that knows two MX hosts: it keeps a session
    open at one, and moves to the other after any failure there."""

    def __init__(self, mxs: list[tuple[str, str, int]], first: int, timeout: float) -> None:
        self.mxs = mxs  # (node name, address, port)
        self.at = first
        self.timeout = timeout
        self.client: Client | None = None

    def deliver(self, rcpt: str, message: bytes, patience: float = 300.0) -> tuple[str, str]:
        """('accepted' | 'refused' | 'indoubt', the node that answered last)."""
        deadline = time.monotonic() + patience
        doubt = False
        while True:
            outcome = self.send(rcpt, message)
            node = self.mxs[self.at][0]
            if outcome in ("accepted", "refused"):
                return ("indoubt" if doubt and outcome == "refused" else outcome), node
            doubt = doubt or outcome == "unknown"
            self.close()
            self.at = 1 - self.at  # the other MX host, as a sending MTA would
            if time.monotonic() > deadline:
                return ("indoubt" if doubt else "refused"), node
            time.sleep(0.2)

    def send(self, rcpt: str, message: bytes) -> str:
        data_sent = False
        try:
            if self.client is None:
                _, host, port = self.mxs[self.at]
                c = Client.session(port, host=host, timeout=self.timeout)
                c.transcript = _Forgetful()
                self.client = c
                if c.greeting.code != 220 or c.cmd("EHLO sender.example").code != 250:
                    raise OSError("no session")
            c = self.client
            for command, wanted in (("MAIL FROM:<sender@remote.example>", 250), (f"RCPT TO:<{rcpt}>", 250),
                                    ("DATA", 354)):
                code = c.cmd(command).code
                if code == 0:
                    raise OSError("connection closed")
                if code != wanted:
                    c.cmd("RSET")
                    return "retry"
            data_sent = True
            c.send(stuff(message))
            code = c.reply().code
            if code == 0:
                raise OSError("connection closed")
            return "accepted" if code == 250 else "refused" if code >= 500 else "retry"
        except (OSError, AssertionError):  # AssertionError: the client's own check (a timeout)
            self.close()
            return "unknown" if data_sent else "retry"

    def close(self) -> None:
        if self.client is not None:
            with contextlib.suppress(OSError):
                self.client.close()
            self.client = None


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)  # as the events table keeps time


class Cluster:
    """The three nodes and their database, with the queries the run needs."""

    def __init__(self, root: Path, database: str, lease: float) -> None:
        pki = Pki(root / "pki")
        self.store = Node(root / "store", name="store", roles=STORE_ROLES, address=ADDRESSES["store"],
                          database=database)
        self.mx = [Node(root / name, name=name, roles=MX_ROLES, address=ADDRESSES[name], database=database)
                   for name in ("mx1", "mx2")]
        for node in self.nodes:
            pki.give(node)
            node.use_store(self.store)
            node.set("mailroom", "hostname", f'"{node.name}.test"')
            node.set("queue", "lease", f'"{lease:g}s"')
        add_user(self.store, "alice@example.org", "maildir")
        add_user(self.store, "bob@example.org", "mbox")
        self.db = Database(database, threads=2)

    @property
    def nodes(self) -> list[Node]:
        return [self.store, *self.mx]

    def held(self, node: str) -> int:
        """Recipients a queue manager of `node` holds a claim on."""
        return len(self.claims(node))

    def claims(self, node: str) -> set[tuple[str, str]]:
        """(trace id, recipient) of each recipient a queue manager of `node` holds a claim on."""
        with self.db.read() as s:
            return {(t, a) for t, a in s.execute(select(Recipient.message_id, Recipient.address).where(
                Recipient.state == ACTIVE, Recipient.owner.like(f"{node}:%")))}

    def pending(self) -> int:
        with self.db.read() as s:
            return int(s.scalar(select(func.count()).select_from(Recipient).where(
                Recipient.state.not_in(FINAL_STATES))) or 0)

    def received_at(self) -> dict[str, dt.datetime]:
        """trace id -> when its MTA queued it."""
        with self.db.read() as s:
            return {t: when for t, when in s.execute(select(Message.id, Message.received))}

    def delivered_at(self) -> dict[tuple[str, str], dt.datetime]:
        """(trace id, recipient) -> when a queue manager recorded its delivery (the first time)."""
        with self.db.read() as s:
            rows = s.execute(select(Event.trace_id, Event.recipient, func.min(Event.time)).where(
                Event.hop == "qmgr", Event.event == "delivered").group_by(Event.trace_id, Event.recipient)).all()
        return {(t, r): when for t, r, when in rows}


@dataclass(frozen=True)
class Copy:
    ident: str
    digest: str
    trace: str  # our MTA's trace id, from its Received field
    queued_by: str  # the MX node whose MTA queued it
    rcpt: str


# Our MTA's Received field, folded: "by mx1.test (Mailroom) with ESMTP id TRACE".
_RECEIVED = re.compile(rb"by (\w+)\.test \(Mailroom\) with \S+ id ([0-9A-F]{18})")


def stored(store: Node) -> list[Copy]:
    """Every copy of a cluster message in the store's two mailboxes."""
    raw = [p.read_bytes() for p in maildir_messages(store.mailbox("alice@example.org"))]
    mbox = [(data, "bob@example.org") for data in mbox_messages(store.mailbox("bob@example.org"))]
    copies = []
    for data, rcpt in [(d, "alice@example.org") for d in raw] + mbox:
        msg = email.message_from_bytes(data)
        ident = msg.get("X-Chaos-Id")
        if ident is None:
            continue
        body = data.replace(b"\r\n", b"\n").split(b"\n\n", 1)[1]
        m = _RECEIVED.search(data)
        copies.append(Copy(str(ident), body_hash(body), m.group(2).decode() if m else "?",
                           m.group(1).decode() if m else "?", rcpt))
    return copies


class Director:
    """What happens to the hosts while the mail flows (the module docstring's steps 1-3)."""

    def __init__(self, cluster: Cluster, outcomes: Outcomes, messages: int, lease: float, started: float) -> None:
        self.cluster, self.outcomes, self.messages, self.lease = cluster, outcomes, messages, lease
        self.started = started
        self.log: list[str] = []
        self.killed_at: dt.datetime | None = None
        self.frozen_at: dt.datetime | None = None
        # What each node held when it was stopped: (trace id, recipient).
        self.held_at_kill: set[tuple[str, str]] = set()
        self.held_at_freeze: set[tuple[str, str]] = set()
        self.error: BaseException | None = None

    def say(self, line: str) -> None:
        self.log.append(f"t=+{time.monotonic() - self.started:.1f}s {line}")
        print(self.log[-1], flush=True)

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # reported by the main thread
            self.error = exc

    def _wait(self, condition: Callable[[], bool], timeout: float, every: float = 0.01) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return True
            time.sleep(every)
        return condition()

    def _stopped_holding(self, node: Node, patience: float = 20.0) -> tuple[dt.datetime, int, set[tuple[str, str]]]:
        """Stop every process of `node` at a moment when its queue manager holds claims
        (what the lease must bring back): (when, processes, claims held).  Claims last
        milliseconds, so it watches the database for one and stops the node the moment
        it sees one; if the claim was settled meanwhile, it lets the node go on (a pause
        of a fraction of a second) and watches again.  After `patience` it takes the
        moment it gets."""
        deadline = time.monotonic() + patience
        while True:
            pids = node.processes()
            self._wait(lambda: bool(self.cluster.claims(node.name)), max(0.0, deadline - time.monotonic()),
                       every=0.005)
            at = utcnow()
            n = node.freeze(pids)
            # PostgreSQL still finishes what the node had sent (a settle's COMMIT, say); after
            # that, nothing of the node's changes until it is let go.
            time.sleep(0.3)
            held = self.cluster.claims(node.name)
            if held or time.monotonic() > deadline:
                return at, n, held
            node.thaw()
            time.sleep(random.uniform(0.05, 0.3))

    def _run(self) -> None:
        mx1, mx2 = self.cluster.mx
        self._wait(lambda: self.outcomes.count() >= self.messages // 4, 600)
        self.killed_at, n, self.held_at_kill = self._stopped_holding(mx1)
        mx1.kill()  # stopped a moment ago: it dies as it stood
        self.say(f"kill -9 mx1: {n} processes; it held {len(self.held_at_kill)} claims")
        # mx2 takes them over when the lease runs out; then mx1 comes back.
        self._wait(lambda: self.cluster.held("mx1") == 0, self.lease + GRACE)
        self.say(f"mx1's claims are taken over; mx1 starts again ({self.cluster.held('mx1')} left)")
        mx1.start()
        self.say("mx1 runs again (mailroom run)")
        self._wait(lambda: self.outcomes.count() > self.messages // 2, 600)
        self.frozen_at, n, self.held_at_freeze = self._stopped_holding(mx2)
        self.say(f"SIGSTOP mx2: {n} processes for {2 * self.lease:g}s; it held {len(self.held_at_freeze)} claims")
        time.sleep(self.lease + 2)
        # What an operator sees meanwhile: mx2 silent, its leases expired or taken over.
        status = mx1.cli("status", "--cluster")
        self.say("mailroom status --cluster on mx1:\n" + (status.stdout or status.stderr).rstrip())
        time.sleep(max(0.0, 2 * self.lease - (utcnow() - self.frozen_at).total_seconds()))
        mx2.thaw()
        self.say("SIGCONT mx2")


def delays(
    copies: list[Copy], queued: dict[str, dt.datetime], delivered: dict[tuple[str, str], dt.datetime],
    node: str, since: dt.datetime, held: set[tuple[str, str]],
) -> list[float]:
    """Seconds from `since` to the delivery of each of `node`'s recipients then: those it
    held claims on (`held`: any MX host may have queued them), and those it had queued
    and not yet delivered."""
    out = []
    for c in copies:
        at = delivered.get((c.trace, c.rcpt))
        if at is None or at <= since:
            continue
        if (c.trace, c.rcpt) in held or (c.queued_by == node and queued.get(c.trace, since) < since):
            out.append((at - since).total_seconds())
    return out


def run(
    messages: int, sessions: int, rate: float, lease: float, root: Path, database: str, seed: int,
    drain_timeout: float = 180.0,
) -> int:
    cluster = Cluster(root, database, lease)
    outcomes = Outcomes()
    run_id = f"{seed:x}"
    counter = itertools.count()
    for node in cluster.nodes:
        print(f"node {node.name}: {node.address} roles={' '.join(node.roles)}", flush=True)
    print(f"lease={lease:g}s messages={messages} sessions={sessions} rate={rate:g}/s", flush=True)
    cluster.store.start()
    for node in cluster.mx:
        node.start()
    started = time.monotonic()
    director = Director(cluster, outcomes, messages, lease, started)
    mxs = [(n.name, *n.endpoints["smtp"]) for n in cluster.mx]

    def worker(k: int) -> None:
        rng = random.Random(seed * 1000 + k)
        sender = Sender(mxs, k % 2, timeout=min(lease, 10.0))
        try:
            while (n := next(counter)) < messages:
                time.sleep(max(0.0, started + n / rate - time.monotonic()))  # the pace of the whole run
                rcpt = RECIPIENTS[n % 2]
                ident, message, digest = make_message(run_id, n, rcpt, rng)
                outcome, node = sender.deliver(rcpt, message)
                with outcomes.lock:
                    if outcome == "accepted":
                        outcomes.accepted[ident] = (digest, node)
                    else:
                        getattr(outcomes, outcome)[ident] = digest
        finally:
            sender.close()

    try:
        chaos = threading.Thread(target=director.run, daemon=True)
        chaos.start()
        workers = [threading.Thread(target=worker, args=(k,)) for k in range(sessions)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        submitted = time.monotonic() - started
        chaos.join(600)
        deadline = time.monotonic() + drain_timeout
        while cluster.pending() and time.monotonic() < deadline:
            time.sleep(0.5)
        left = cluster.pending()
        copies = stored(cluster.store)
        when, queued = cluster.delivered_at(), cluster.received_at()
        fenced = sum(len(re.findall(r"lease lost", n.log_text())) for n in cluster.mx)
    finally:
        for node in cluster.nodes:
            node.thaw()
        for node in cluster.nodes:
            node.stop()
        cluster.db.close()
    if director.error is not None:
        raise director.error

    found: dict[str, list[Copy]] = {}
    for c in copies:
        found.setdefault(c.ident, []).append(c)
    lost = [i for i in outcomes.accepted if i not in found]
    damaged = [i for i, (h, _) in outcomes.accepted.items() if i in found and h not in {c.digest for c in found[i]}]
    wrongly = [i for i in outcomes.refused if i in found]
    duplicates = sum(len(v) - 1 for v in found.values())
    delivered = sum(1 for i in outcomes.accepted if i in found)
    after_kill = delays(copies, queued, when, "mx1", director.killed_at, director.held_at_kill) \
        if director.killed_at else []
    after_freeze = delays(copies, queued, when, "mx2", director.frozen_at, director.held_at_freeze) \
        if director.frozen_at else []
    max_delay = max(after_kill, default=0.0)
    by_node = {n.name: sum(1 for _, node in outcomes.accepted.values() if node == n.name) for n in cluster.mx}
    print(f"submitted in {submitted:.1f}s; accepted by {', '.join(f'{k}={v}' for k, v in by_node.items())}; "
          f"queue left: {left}")
    print(f"killed node mx1: it held {len(director.held_at_kill)} claims; {len(after_kill)} of its recipients "
          f"(claimed or queued by it) were delivered after the kill, the last {max_delay:.1f}s after it "
          f"(lease {lease:g}s + {GRACE:g}s allowed)")
    print(f"frozen node mx2: it held {len(director.held_at_freeze)} claims; {len(after_freeze)} of its recipients "
          f"were delivered after the freeze, the last {max(after_freeze, default=0.0):.1f}s after it; "
          f"settles it dropped when it woke (fencing): {fenced}")
    print(f"refused={len(outcomes.refused)} indoubt={len(outcomes.indoubt)} damaged={len(damaged)} "
          f"refused_but_delivered={len(wrongly)}")
    if lost:
        print("lost:", " ".join(sorted(lost)[:20]))
    if duplicates:
        print("duplicated:", " ".join(sorted(i for i, v in found.items() if len(v) > 1)[:20]))
    print(f"accepted={len(outcomes.accepted)} delivered={delivered} lost={len(lost)} duplicates={duplicates} "
          f"max_delay_s={max_delay:.1f}")
    ok = (not lost and not duplicates and not damaged and not wrongly and not left
          and director.held_at_kill and len(after_kill) >= len(director.held_at_kill) and max_delay <= lease + GRACE)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.cluster", description=__doc__.split("\n")[0])
    p.add_argument("--messages", type=int, default=2000)
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--rate", type=float, default=25.0, help="messages a second, all sessions together")
    p.add_argument("--lease", type=float, default=10.0, help="[queue] lease of every node, in seconds")
    p.add_argument("--drain-timeout", type=float, default=180.0, help="how long to wait for an empty queue")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dir", type=Path, default=None, help="folder for the run (default: a temporary one)")
    args = p.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 31)
    print(f"seed={seed}", flush=True)
    from tests.support.postgres import PostgresServer

    with contextlib.ExitStack() as stack:
        top = args.dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mailroom-cluster-")))
        top.chmod(0o711)  # the postgres and mailroom users reach their folders by path
        pg = stack.enter_context(PostgresServer(top / "postgresql", settings=postgresql_settings(args.lease)))
        return run(args.messages, args.sessions, args.rate, args.lease, top / "nodes", pg.url, seed,
                   drain_timeout=args.drain_timeout)


if __name__ == "__main__":
    sys.exit(main())
