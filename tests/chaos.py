"""Chaos run: submit mail while daemons are killed with SIGKILL, then count what a user would.

    python -m tests.chaos --messages 2000 --clients 20 [--postgresql]

It starts a throwaway installation (four daemons under supervisord; SQLite, or
a throwaway PostgreSQL cluster with --postgresql), and has `--clients` threads
submit `--messages` messages, half through the MSA (STARTTLS + AUTH) and half
through the MTA's public listener, to a Maildir user and an mbox user.  Every
message carries a unique X-Chaos-Id header and Message-ID, and the SHA-256 of
its body is remembered.  Meanwhile a killer sends SIGKILL to a random daemon
(msa, mta, qmgr, mda) every `--kill-every` seconds; supervisord restarts it.

The clients behave like a real MTA: a refused connection, a 4xx, or a
connection lost before the final reply means "the same message again, a
little later", until a final reply (250 or 5xx) or their patience runs out.
When the clients are done the killing stops, the queue is left to drain, and
both mailboxes are scanned:

- accepted:   the client got 250 after DATA (each must be in its mailbox exactly once,
              body intact)
- refused:    the client got 5xx after DATA, or only 4xx, and never lost a connection
              after sending the message (each must NOT be delivered)
- in doubt:   a connection broke after the message was sent and no 250 ever came
              (each may be delivered, at most once)
- lost:       accepted but not delivered (must be 0: the promise)
- duplicates: extra copies of any message (must be 0)

The last line of output is the summary
`accepted=N delivered=N lost=N duplicates=N indoubt_delivered=K/N`.
Exit status 0 when nothing was lost, duplicated, damaged or wrongly delivered and
the queue drained.
"""

from __future__ import annotations

import argparse
import contextlib
import email
import hashlib
import itertools
import json
import os
import random
import re
import signal
import sys
import tempfile
import threading
import time
import xmlrpc.client
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import func, select
from supervisor.xmlrpc import SupervisorTransport

from cli import supervise
from common.models import FINAL_STATES, Recipient
from tests.harness.client import Client, stuff
from tests.harness.users import add_user
from tests.support.suite import PASSWORD, Installation, maildir_messages, mbox_messages

PROGRAMS = ("msa", "mta", "qmgr", "mda")
RECIPIENTS = ("alice@example.org", "bob@example.org")  # Maildir, mbox


@dataclass
class Outcomes:
    accepted: dict[str, str] = field(default_factory=dict)  # chaos id -> body hash
    refused: dict[str, str] = field(default_factory=dict)
    indoubt: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, kind: str, ident: str, digest: str) -> None:
        with self.lock:
            getattr(self, kind)[ident] = digest


def body_hash(body: bytes) -> str:
    """Hash of a body with line endings normalised (stores keep LF, the wire has CRLF)."""
    return hashlib.sha256(body.replace(b"\r\n", b"\n").rstrip(b"\n")).hexdigest()


def make_message(run_id: str, n: int, rcpt: str, rng: random.Random) -> tuple[str, bytes, str]:
    ident = f"{run_id}-{n}"
    lines = [rng.randbytes(rng.randint(10, 60)).hex().encode() for _ in range(rng.randint(1, 40))]
    if rng.random() < 0.2:
        lines.append(b".a line that needs dot-stuffing")
    body = b"\r\n".join(lines) + b"\r\n"
    header = (
        f"From: alice@example.org\r\nTo: {rcpt}\r\nSubject: chaos {n}\r\nX-Chaos-Id: {ident}\r\n"
        f"Message-ID: <{ident}@chaos.example>\r\nDate: Tue, 01 Dec 2026 12:00:00 +0000\r\n\r\n"
    ).encode()
    return ident, header + body, body_hash(body)


class Submitter:
    """One submitting client (the harness's raw Client): keeps a session open and
    reconnects after any failure."""

    def __init__(self, inst: Installation, via: str) -> None:
        self.inst, self.via = inst, via
        self.client: Client | None = None

    def _open(self) -> Client:
        c = Client.session(self.inst.ports["submission" if self.via == "msa" else "smtp"], timeout=30)
        try:
            if self.via == "msa":
                for step in ("EHLO chaos.example", "STARTTLS"):
                    if c.cmd(step).code not in (220, 250):
                        raise OSError(f"{step}: {c.transcript[-1]}")
                c.starttls()
                if c.cmd("EHLO chaos.example").code != 250 or c.auth_plain("alice@example.org", PASSWORD).code != 235:
                    raise OSError(f"no session: {c.transcript[-1]}")
            elif c.greeting.code != 220 or c.cmd("EHLO chaos.example").code != 250:
                raise OSError(f"no session: {c.transcript[-1]}")
        except BaseException:
            c.close()  # a daemon killed mid-greeting: the socket must not be left open
            raise
        c.transcript = _Forgetful()  # thousands of messages: keep no transcript
        return c

    def deliver(self, rcpt: str, message: bytes, patience: float = 300.0) -> str:
        """Send until a final reply, as an MTA's queue would: 'accepted', 'refused' or 'indoubt'."""
        deadline = time.monotonic() + patience
        doubt = False
        pause = 0.1
        while True:
            outcome = self.send(rcpt, message)
            if outcome == "accepted":
                return "accepted"
            doubt = doubt or outcome == "unknown"
            if outcome == "refused" or time.monotonic() > deadline:
                return "indoubt" if doubt else "refused"
            time.sleep(pause)  # later, the same message
            pause = min(pause * 2, 2.0)

    def send(self, rcpt: str, message: bytes) -> str:
        """'accepted' (250 after DATA), 'refused' (5xx after DATA), 'unknown' (the connection
        broke after the message was sent), or 'retry' (4xx, or nothing was sent)."""
        data_sent = False
        try:
            if self.client is None:
                self.client = self._open()
            c = self.client
            sender = "alice@example.org" if self.via == "msa" else "sender@remote.example"
            for command, wanted in ((f"MAIL FROM:<{sender}>", 250), (f"RCPT TO:<{rcpt}>", 250), ("DATA", 354)):
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
        except (OSError, AssertionError):  # AssertionError: the client's check (a timeout, say)
            self.close()
            return "unknown" if data_sent else "retry"

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None


class _Forgetful(list[str]):
    def append(self, line: str) -> None:
        pass


def prepare(root: Path, database: str = "") -> Installation:
    inst = Installation(root)
    if database:  # before any user exists: the users go to that database
        inst.set("mailroom", "database", json.dumps(database))
    inst.set("mta", "poll_interval", '"0.5s"')
    inst.set("msa", "max_messages_per_hour", "1000000")
    inst.set("msa", "max_recipients_per_hour", "1000000")
    add_user(inst, "alice@example.org", "maildir")
    add_user(inst, "bob@example.org", "mbox")
    return inst


def killer(inst: Installation, stop: threading.Event, every: float, rng: random.Random, kills: list[str]) -> None:
    while not stop.wait(every):
        name = rng.choice(PROGRAMS)
        pid = program_pid(inst, name)
        if pid is None:
            continue  # not running right now (being restarted)
        try:
            os.kill(pid, signal.SIGKILL)
            kills.append(name)
        except ProcessLookupError:
            pass


def program_pid(inst: Installation, name: str) -> int | None:
    """The daemon's pid from supervisord, over its XML-RPC socket (what `mailroom status`
    shows, without starting a Python process for each look: the killer must keep pace)."""
    cfg = inst.config
    sock = cfg.run_dir.resolve() / "supervisor.sock"
    transport = SupervisorTransport(*supervise.credentials(cfg), f"unix://{sock}")
    try:
        proxy = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)
        info = proxy.supervisor.getProcessInfo(name)
    except (OSError, xmlrpc.client.Fault):
        try:
            return inst.program_pid(name)
        except AssertionError:
            return None
    finally:
        transport.close()
    return int(info["pid"]) if info["statename"] == "RUNNING" and info["pid"] else None


def pending(inst: Installation) -> int:
    """Recipients not yet in a final state (on SQLite or PostgreSQL alike)."""
    db = inst.db()
    try:
        with db.read() as s:
            return int(s.scalar(
                select(func.count()).select_from(Recipient).where(Recipient.state.not_in(FINAL_STATES))
            ) or 0)
    finally:
        db.close()


def stuck(inst: Installation) -> str:
    """Why the queue did not drain: the waiting recipients by state and last reply,
    and the end of the daemons' log (printed only when something was left)."""
    db = inst.db()
    try:
        with db.read() as s:
            rows = s.execute(
                select(Recipient.state, Recipient.owner, Recipient.last_reply, func.count())
                .where(Recipient.state.not_in(FINAL_STATES))
                .group_by(Recipient.state, Recipient.owner, Recipient.last_reply)
            ).all()
    finally:
        db.close()
    lines = [f"  {n} {state} owner={owner or '-'} last_reply={reply or '-'}" for state, owner, reply, n in rows]
    tail = inst.log_text().splitlines()[-40:]
    # A program supervisord gave up on (FATAL after failed starts) shows here.
    status = inst.cli("status").stdout.splitlines()
    return "\n".join(["waiting recipients:", *lines, "programs:", *status, "end of the log:", *tail])


@dataclass(frozen=True)
class Copy:
    """One stored copy of a chaos message: its body hash, where it is, and its trace id."""

    digest: str
    where: str  # "maildir:new/NAME" (or cur/), or "mbox#N" (the Nth message of the mbox)
    trace: str  # the id in the top Received field (our MTA's hop), "?" if none


# Our MTA's Received field: "by HOST (Mailroom) with PROTO id TRACE".
_TRACE_IN_RECEIVED = re.compile(rb"\(Mailroom\) with \S+ id ([0-9A-F]{18})")


def delivered(inst: Installation) -> dict[str, list[Copy]]:
    """chaos id -> every stored copy, from the Maildir and the mbox."""
    found: dict[str, list[Copy]] = {}
    box = inst.mailbox("alice@example.org")
    raw = [(f"maildir:{p.relative_to(box)}", p.read_bytes()) for p in maildir_messages(box)]
    raw += [(f"mbox#{k}", data) for k, data in enumerate(mbox_messages(inst.mailbox("bob@example.org")))]
    for where, data in raw:
        msg = email.message_from_bytes(data)
        ident = msg.get("X-Chaos-Id")
        if ident is None:
            continue
        body = data.replace(b"\r\n", b"\n").split(b"\n\n", 1)[1]
        m = _TRACE_IN_RECEIVED.search(data)
        trace = m.group(1).decode() if m else "?"
        found.setdefault(str(ident), []).append(Copy(body_hash(body), where, trace))
    return found


def explain_duplicates(doubled: dict[str, list[Copy]]) -> list[str]:
    """One line per duplicated message: its copies (store and trace id), and whether they
    share a trace id (one queued message handed to the MDA twice: a redelivery) or not
    (the message was queued twice)."""
    lines = []
    for ident, copies in sorted(doubled.items()):
        traces = {c.trace for c in copies}
        kind = "redelivered (same trace id)" if len(traces) == 1 else "queued twice (different trace ids)"
        where = ", ".join(f"{c.where} trace={c.trace}{'' if c.digest == copies[0].digest else ' (body differs)'}"
                          for c in copies)
        lines.append(f"  {ident}: {kind}: {where}")
    return lines


def run(
    messages: int, clients: int, kill_every: float, drain_timeout: float, root: Path, seed: int,
    database: str = "",
) -> int:
    rng = random.Random(seed)
    run_id = f"{seed:x}"
    inst = prepare(root, database)
    inst.start()
    outcomes = Outcomes()
    kills: list[str] = []
    counter = itertools.count()
    stop_killing = threading.Event()

    def worker(k: int) -> None:
        local_rng = random.Random(seed * 1000 + k)
        client = Submitter(inst, "msa" if k % 2 == 0 else "mta")
        try:
            while (n := next(counter)) < messages:
                rcpt = RECIPIENTS[n % 2]
                ident, message, digest = make_message(run_id, n, rcpt, local_rng)
                outcomes.record(client.deliver(rcpt, message), ident, digest)
        finally:
            client.close()

    started = time.monotonic()
    try:
        kt = threading.Thread(target=killer, args=(inst, stop_killing, kill_every, rng, kills), daemon=True)
        kt.start()
        workers = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        stop_killing.set()
        kt.join()
        submitted = time.monotonic() - started
        deadline = time.monotonic() + drain_timeout
        while pending(inst) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = pending(inst)
        if left:
            print(stuck(inst))
        found = delivered(inst)
    finally:
        stop_killing.set()
        inst.stop()

    lost = [i for i in outcomes.accepted if i not in found]
    damaged = [i for i, h in outcomes.accepted.items() if i in found and h not in {c.digest for c in found[i]}]
    wrongly = [i for i in outcomes.refused if i in found]
    doubled = {i: v for i, v in found.items() if len(v) > 1}
    duplicates = sum(len(v) - 1 for v in doubled.values())
    delivered_accepted = sum(1 for i in outcomes.accepted if i in found)
    indoubt_delivered = sum(1 for i in outcomes.indoubt if i in found)
    print(f"kills: {len(kills)} ({', '.join(f'{p}={kills.count(p)}' for p in PROGRAMS)}); "
          f"submitted in {submitted:.1f}s; queue left: {left}")
    print(f"refused={len(outcomes.refused)} indoubt={len(outcomes.indoubt)} "
          f"damaged={len(damaged)} refused_but_delivered={len(wrongly)}")
    if lost:
        print("lost:", " ".join(sorted(lost)[:20]))
    if wrongly:
        print("refused but delivered:", " ".join(sorted(wrongly)[:20]))
    if doubled:
        print("duplicated:")
        print("\n".join(explain_duplicates(doubled)[:20]))
    print(f"accepted={len(outcomes.accepted)} delivered={delivered_accepted} "
          f"lost={len(lost)} duplicates={duplicates} "
          f"indoubt_delivered={indoubt_delivered}/{len(outcomes.indoubt)}")
    return 0 if not (lost or wrongly or damaged or duplicates or left) else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.split("\n")[0])
    p.add_argument("--messages", type=int, default=2000)
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--kill-every", type=float, default=0.5, help="seconds between two SIGKILLs")
    p.add_argument("--drain-timeout", type=float, default=300.0, help="how long to wait for an empty queue")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dir", type=Path, default=None, help="folder for the run (default: a temporary one)")
    p.add_argument("--postgresql", action="store_true", help="the shared database on a throwaway PostgreSQL cluster")
    args = p.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 31)
    print(f"seed={seed}", flush=True)
    with contextlib.ExitStack() as stack:
        top = args.dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mailroom-chaos-")))
        database = ""
        if args.postgresql:
            from tests.support.postgres import PostgresServer

            database = stack.enter_context(PostgresServer(top / "postgresql")).url
        return run(args.messages, args.clients, args.kill_every, args.drain_timeout, top / "mailroom", seed, database)


if __name__ == "__main__":
    sys.exit(main())
