"""Chaos run: submit mail while daemons are killed with SIGKILL, then count what was lost.

    python -m tests.chaos --messages 2000 --clients 20

It starts a throwaway installation (four daemons under supervisord), and has
`--clients` threads submit `--messages` messages, half through the MSA
(STARTTLS + AUTH) and half through the MTA's public listener, to a Maildir
user and an mbox user.  Every message carries a unique X-Chaos-Id header and
the SHA-256 of its body is remembered.  Meanwhile a killer sends SIGKILL to a
random daemon (msa, mta, qmgr, mda) every `--kill-every` seconds; supervisord
restarts it.  When the clients are done the killing stops, the queue is left
to drain, and both mailboxes are scanned:

- accepted:   the client got 250 after DATA (each must be delivered, body intact)
- refused:    the client got a 4xx/5xx reply after DATA (each must NOT be delivered);
              before DATA a client waits and tries again, as real clients do
- unknown:    the connection broke before the reply (either outcome is allowed)
- lost:       accepted but not delivered (must be 0: the promise)
- duplicates: extra copies of one message (allowed, counted)

The last line of output is the summary `accepted=N delivered=N lost=N duplicates=N`.
Exit status 0 when lost == 0 and no refused message was delivered.
"""

from __future__ import annotations

import argparse
import contextlib
import email
import hashlib
import itertools
import os
import random
import re
import signal
import smtplib
import sqlite3
import sys
import tempfile
import threading
import time
import xmlrpc.client
from dataclasses import dataclass, field
from pathlib import Path

from supervisor.xmlrpc import SupervisorTransport

from tests.support.suite import PASSWORD, Installation, maildir_messages, mbox_messages, tls_client_context

PROGRAMS = ("msa", "mta", "qmgr", "mda")
RECIPIENTS = ("alice@example.org", "bob@example.org")  # Maildir, mbox


@dataclass
class Outcomes:
    accepted: dict[str, str] = field(default_factory=dict)  # chaos id -> body hash
    refused: dict[str, str] = field(default_factory=dict)
    unknown: dict[str, str] = field(default_factory=dict)
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
        f"From: alice@example.org\r\nTo: {rcpt}\r\nSubject: chaos {n}\r\nX-Chaos-Id: {ident}\r\n\r\n"
    ).encode()
    return ident, header + body, body_hash(body)


class Client:
    """One submitting client: keeps a session open and reconnects after any failure."""

    def __init__(self, inst: Installation, via: str) -> None:
        self.inst, self.via = inst, via
        self.smtp: smtplib.SMTP | None = None

    def _open(self) -> smtplib.SMTP:
        if self.via == "msa":
            s = smtplib.SMTP("127.0.0.1", self.inst.ports["submission"], timeout=30)
            s.starttls(context=tls_client_context())
            s.login("alice@example.org", PASSWORD)
        else:
            s = smtplib.SMTP("127.0.0.1", self.inst.ports["smtp"], timeout=30)
            s.ehlo("chaos.example")
        return s

    def deliver(self, rcpt: str, message: bytes, patience: float = 30.0) -> str:
        """Like a real client: while nothing of the message was sent (the daemon is being
        restarted, a 4xx before DATA), wait a little and try again."""
        deadline = time.monotonic() + patience
        while True:
            outcome = self.send(rcpt, message)
            if outcome != "retry":
                return outcome
            if time.monotonic() > deadline:
                return "refused"
            time.sleep(0.1)

    def send(self, rcpt: str, message: bytes) -> str:
        """'accepted', 'refused' (4xx/5xx after DATA), 'unknown' (the connection broke after
        the message was sent), or 'retry' (nothing was sent)."""
        data_sent = False
        try:
            if self.smtp is None:
                self.smtp = self._open()
            s = self.smtp
            code, _ = s.mail("alice@example.org" if self.via == "msa" else "sender@remote.example")
            if code != 250:
                s.rset()
                return "retry"
            code, _ = s.rcpt(rcpt)
            if code != 250:
                s.rset()
                return "retry"
            code, _ = s.docmd("DATA")
            if code != 354:
                s.rset()
                return "retry"
            data_sent = True
            s.send(re.sub(rb"(?m)^\.", b"..", message) + b".\r\n")  # dot-stuffed; message ends in CRLF
            code, _ = s.getreply()
            return "accepted" if code == 250 else "refused"
        except (smtplib.SMTPException, OSError):
            self.close()
            return "unknown" if data_sent else "retry"

    def close(self) -> None:
        if self.smtp is not None:
            with contextlib.suppress(OSError):
                self.smtp.close()
            self.smtp = None


def prepare(root: Path) -> Installation:
    inst = Installation(root)
    inst.set("mta", "retry_schedule", '["1s"]')  # a killed MDA must not delay delivery by minutes
    inst.set("mta", "poll_interval", '"0.5s"')
    inst.set("msa", "max_messages_per_hour", "1000000")
    inst.set("msa", "max_recipients_per_hour", "1000000")
    inst.add_user("alice@example.org", "maildir")
    inst.add_user("bob@example.org", "mbox")
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
    sock = inst.config.run_dir.resolve() / "supervisor.sock"
    transport = SupervisorTransport(None, None, f"unix://{sock}")
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
    db = inst.config.database_url.removeprefix("sqlite:///")
    conn = sqlite3.connect(db, timeout=30)
    try:
        row = conn.execute(
            "SELECT count(*) FROM recipients WHERE state NOT IN ('delivered', 'bounced', 'expired', 'deleted')"
        ).fetchone()
        return int(row[0])
    finally:
        conn.close()


def delivered(inst: Installation) -> dict[str, list[str]]:
    """chaos id -> body hashes of every stored copy, from the Maildir and the mbox."""
    found: dict[str, list[str]] = {}
    raw = [p.read_bytes() for p in maildir_messages(inst.mailbox("alice@example.org"))]
    raw += mbox_messages(inst.mailbox("bob@example.org"))
    for data in raw:
        msg = email.message_from_bytes(data)
        ident = msg.get("X-Chaos-Id")
        if ident is None:
            continue
        body = data.replace(b"\r\n", b"\n").split(b"\n\n", 1)[1]
        found.setdefault(str(ident), []).append(body_hash(body))
    return found


def run(messages: int, clients: int, kill_every: float, drain_timeout: float, root: Path, seed: int) -> int:
    rng = random.Random(seed)
    run_id = f"{seed:x}"
    inst = prepare(root)
    inst.start()
    outcomes = Outcomes()
    kills: list[str] = []
    counter = itertools.count()
    stop_killing = threading.Event()

    def worker(k: int) -> None:
        local_rng = random.Random(seed * 1000 + k)
        client = Client(inst, "msa" if k % 2 == 0 else "mta")
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
        found = delivered(inst)
    finally:
        stop_killing.set()
        inst.stop()

    lost = [i for i in outcomes.accepted if i not in found]
    damaged = [i for i, h in outcomes.accepted.items() if i in found and h not in found[i]]
    wrongly = [i for i in outcomes.refused if i in found]
    duplicates = sum(len(v) - 1 for v in found.values())
    delivered_accepted = sum(1 for i in outcomes.accepted if i in found)
    print(f"kills: {len(kills)} ({', '.join(f'{p}={kills.count(p)}' for p in PROGRAMS)}); "
          f"submitted in {submitted:.1f}s; queue left: {left}")
    print(f"refused={len(outcomes.refused)} unknown={len(outcomes.unknown)} "
          f"(of those delivered: {sum(1 for i in outcomes.unknown if i in found)}) "
          f"damaged={len(damaged)} refused_but_delivered={len(wrongly)}")
    if lost:
        print("lost:", " ".join(sorted(lost)[:20]))
    if wrongly:
        print("refused but delivered:", " ".join(sorted(wrongly)[:20]))
    print(f"accepted={len(outcomes.accepted)} delivered={delivered_accepted} "
          f"lost={len(lost)} duplicates={duplicates}")
    return 0 if not lost and not wrongly and not damaged and left == 0 else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.split("\n")[0])
    p.add_argument("--messages", type=int, default=2000)
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--kill-every", type=float, default=0.5, help="seconds between two SIGKILLs")
    p.add_argument("--drain-timeout", type=float, default=300.0, help="how long to wait for an empty queue")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dir", type=Path, default=None, help="installation folder (default: a temporary one)")
    args = p.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 31)
    print(f"seed={seed}", flush=True)
    if args.dir is not None:
        return run(args.messages, args.clients, args.kill_every, args.drain_timeout, args.dir, seed)
    with tempfile.TemporaryDirectory(prefix="mailroom-chaos-") as tmp:
        return run(args.messages, args.clients, args.kill_every, args.drain_timeout, Path(tmp) / "mailroom", seed)


if __name__ == "__main__":
    sys.exit(main())
