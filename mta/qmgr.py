"""The queue manager: takes due recipients from the queue and delivers them.

Each round it claims due recipients, groups them per message and next hop
(local domains: one LMTP transaction to the MDA; remote domains: SMTP per
domain), and settles every outcome in one transaction per message:

    2xx -> delivered      5xx -> bounced (DSN to the sender)
           (a success notice when the recipient asked NOTIFY=SUCCESS and no
           later hop will send one)
    4xx -> queued again after the retry schedule, or expired (DSN) when the
           message is older than max_queue_lifetime; a delay warning DSN is
           sent once when it is older than delay_warning.

It is woken by a datagram on run/qmgr.sock when mail arrives (Postfix's qmgr
trigger) and polls every poll_interval anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import socket
from collections import defaultdict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from sqlalchemy import update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from common import dsn
from common.address import domain_of
from common.clock import Clock
from common.daemon import Context
from common.db import Database
from common.log import trace_id
from common.models import Message
from common.reply import Reply
from mta import bounce, mailauth, options, queue
from mta.delivery import LocalDelivery, RemoteDelivery
from mta.queue import Outcome, Policy, Settled, classify
from mta.routing import make_resolver

log = logging.getLogger("qmgr")

# How the MDA's 250 names the mailbox path when we record its outcome (mda/server.py).
PATH_MARK = " path="


@dataclass
class Result:
    recipient_id: int
    address: str
    reply: Reply
    remote: str = ""
    local: bool = False  # handed to the MDA over LMTP
    dsn_passed: bool = False  # the next hop took NOTIFY/ORCPT: success is its to report
    mda_left_record: bool = False  # the MDA left its own event to us (XRECORD)

    @property
    def mda_away(self) -> bool:
        """The hand-off to our MDA itself failed (X.4.x: no connection, or it was lost),
        as opposed to a temporary refusal the MDA gave (a full mailbox, a lock)."""
        return self.local and self.reply.is_temporary and self.reply.status.startswith("4.4.")

    @property
    def retry_soon(self) -> bool:
        """A local hand-off failed for a reason of our own host (X.4.x: the MDA away;
        X.3.x: a local error, a busy database, a full disk): retried on the short
        local schedule, not after the minutes a remote host is given."""
        return self.mda_away or (self.local and self.reply.is_temporary and self.reply.status.startswith("4.3."))


class QueueManager:
    def __init__(
        self,
        *,
        db: Database,
        clock: Clock,
        policy: Policy,
        local_domains: list[str],
        hostname: str,
        local: LocalDelivery,
        remote: RemoteDelivery,
        max_in_flight: int = 100,
        sender_for: Callable[[str, str, str], str] | None = None,
    ) -> None:
        self.db = db
        self.clock = clock
        self.policy = policy
        self.local_domains = local_domains
        self.hostname = hostname
        self.local = local
        self.remote = remote
        # (sender, original recipient, recipient) -> the sender to send as (SRS for forwards).
        self.sender_for = sender_for or (lambda sender, original, recipient: sender)
        self.host = socket.gethostname()
        self.owner = queue.owner_id(self.host)
        self.in_flight = asyncio.Semaphore(max_in_flight)
        self.wake = asyncio.Event()
        # Local hand-offs were deferred (the MDA was away): the first one that
        # succeeds again brings the others forward.
        self.local_backlog = False
        self.tasks: set[asyncio.Task[None]] = set()

    async def run_once(self) -> int:
        """Claim what is due and start delivering it; returns how many messages."""
        async with self.in_flight:
            pass  # wait for room before claiming more
        # In the relaxed batch with the outcomes being settled: one commit for
        # both (not fsync'd: no reply rests on a claim; a power cut that loses
        # one leaves the recipient queued or active, and it is delivered again,
        # the MDA's idempotent writes absorbing the repeat).
        jobs = await self.db.write_batched(self._claim, relaxed=True)
        for job in jobs:
            await self.in_flight.acquire()
            task = asyncio.create_task(self._process(job))
            self.tasks.add(task)
            task.add_done_callback(self._done)
        return len(jobs)

    def _claim(self, s: Session) -> list[queue.Job]:
        return queue.claim(s, self.owner, self.clock.now(), commit=False)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self.in_flight.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("delivery task failed", exc_info=task.exception())

    async def drain(self) -> None:
        """Wait for every delivery in progress (tests and shutdown)."""
        while self.tasks:
            await asyncio.gather(*list(self.tasks), return_exceptions=True)

    async def _process(self, job: queue.Job) -> None:
        trace_id.set(job.trace)
        while True:
            # What the sender asked decides how it may go (REQUIRETLS): no guessing.
            # A busy or full database is temporary; the claim stays ours meanwhile.
            try:
                asked = await self.db.run(self._asked, job)
                break
            except OperationalError as exc:
                log.warning("cannot read the delivery options yet, retrying: %s", exc.orig)
                await asyncio.sleep(1.0)
        local = [(rid, a) for rid, a, _ in job.recipients if domain_of(a) in self.local_domains]
        remote: defaultdict[tuple[str, str], list[tuple[int, str]]] = defaultdict(list)
        for rid, a, _ in job.recipients:
            if domain_of(a) not in self.local_domains:
                sender = self.sender_for(job.sender, job.originals.get(rid, ""), a)
                remote[(domain_of(a), sender)].append((rid, a))
        calls = []
        if local:
            calls.append(self._guarded(self._deliver_local(job, local, asked), local, local=True))
        calls.extend(
            self._guarded(self._deliver_remote(job, d, rs, sender, asked), rs)
            for (d, sender), rs in remote.items()
        )
        results: list[Result] = []
        for part in await asyncio.gather(*calls):
            results.extend(part)
        mda_back = False
        if any(r.mda_away for r in results):
            self.local_backlog = True
        elif self.local_backlog and any(r.local and r.reply.is_ok for r in results):
            self.local_backlog, mda_back = False, True
        while True:
            # The results must be recorded, or the recipients stay "active" until
            # a restart (found by the disk-full test): a full disk or a busy
            # database is temporary, so keep trying.
            try:
                # Outcomes of messages finishing together share one commit; it is
                # not fsync'd (no reply rests on it; see run_once).
                await self.db.write_batched(self._settle, job, results, mda_back, asked, relaxed=True)
                return
            except OperationalError as exc:
                log.warning("cannot record delivery results yet, retrying: %s", exc.orig)
                await asyncio.sleep(1.0)

    @staticmethod
    async def _guarded(
        attempt: Coroutine[Any, Any, list[Result]], rcpts: list[tuple[int, str]], *, local: bool = False
    ) -> list[Result]:
        """The attempt's results; a failure of our own (a bug, an unexpected error) is a
        temporary failure of each recipient, so that each is settled (deferred), never
        left active under a queue manager that lives on and never takes it again."""
        try:
            return await attempt
        except Exception as exc:  # noqa: BLE001 - every recipient gets it as its reply
            log.exception("delivery attempt failed")
            reply = Reply(451, "4.3.0", f"Delivery attempt failed: {type(exc).__name__}")
            return [Result(rid, a, reply, local=local) for rid, a in rcpts]

    def _asked(self, job: queue.Job) -> options.Asked:
        with self.db.read() as s:
            return options.load(s, job.trace, [rid for rid, _, _ in job.recipients])

    async def _deliver_local(
        self, job: queue.Job, rcpts: list[tuple[int, str]], asked: options.Asked
    ) -> list[Result]:
        params = options.Outbound(asked, [rid for rid, _ in rcpts]).local_params(job.body)
        # An earlier attempt may have stored it already (its 250 was lost to a crash).
        ids = {rid for rid, _ in rcpts}
        retry = any(n > 0 for rid, _, n in job.recipients if rid in ids)
        replies, ours = await self.local.deliver(
            job.trace, job.sender, [a for _, a in rcpts], job.body, params, retry=retry
        )
        return [Result(rid, a, r, local=True, mda_left_record=ours) for (rid, a), r in zip(rcpts, replies, strict=True)]

    async def _deliver_remote(
        self, job: queue.Job, domain: str, rcpts: list[tuple[int, str]], sender: str, asked: options.Asked
    ) -> list[Result]:
        outbound = options.Outbound(asked, [rid for rid, _ in rcpts])
        replies, host = await self.remote.deliver(
            domain, job.trace, sender, [a for _, a in rcpts], job.body, outbound
        )
        return [
            Result(rid, a, r, host, dsn_passed=outbound.dsn_passed)
            for (rid, a), r in zip(rcpts, replies, strict=True)
        ]

    def _settle(
        self, s: Session, job: queue.Job, results: list[Result], mda_back: bool = False,
        asked: options.Asked | None = None,
    ) -> None:
        """Record every outcome and queue the DSNs (run inside a shared relaxed batch)."""
        now = self.clock.now()
        if mda_back:
            moved = queue.bring_forward(s, self.local_domains, now)
            if moved:
                log.info("the MDA takes mail again: %d waiting local recipients are due now", moved)
        attempts = {rid: n for rid, _, n in job.recipients}
        age = (now - job.received).total_seconds()
        asked = asked or options.Asked()
        failures: list[bounce.Failure] = []
        delayed: list[bounce.Failure] = []
        succeeded: list[bounce.Failure] = []
        deferred = False
        settled: list[Settled] = []
        for res in results:
            reply, n = res.reply, attempts[res.recipient_id] + 1
            outcome, wait = classify(reply, age, n, self.policy, mda_away=res.retry_soon)
            text = str(reply)
            mda_event = mda_path = ""
            if res.mda_left_record and not res.mda_away:
                # The MDA's answer, which it left to us to record (XRECORD): its
                # hop in the trace, with the mailbox path its 250 carries.
                text, _, mda_path = text.partition(PATH_MARK)
                mda_event = "delivered" if reply.is_ok else "refused"
            detail = text + (f" (via {res.remote})" if res.remote else "")
            settled.append(Settled(
                res.recipient_id, res.address, outcome, n, text, detail,
                next_attempt=now + dt.timedelta(seconds=wait) if outcome is Outcome.DEFERRED else None,
                mda_event=mda_event, mda_detail=text, mda_path=mda_path,
            ))
            log.info("%s to=<%s> attempts=%d: %s", outcome, res.address, n, detail)
            # RFC 3461 4.1: only the notices the recipient asked for (NOTIFY).
            notify = asked.notify.get(res.recipient_id, "")
            failure = bounce.Failure(
                res.address, job.originals.get(res.recipient_id, ""), reply, res.remote,
                orcpt=asked.orcpt.get(res.recipient_id, ""),
            )
            if outcome in (Outcome.BOUNCED, Outcome.EXPIRED):
                if dsn.wants(notify, "FAILURE"):
                    failures.append(failure)
            elif outcome is Outcome.DEFERRED:
                deferred = True
                if dsn.wants(notify, "DELAY"):
                    delayed.append(failure)
            elif dsn.wants(notify, "SUCCESS") and not res.dsn_passed:
                # RFC 3461 5.2.2: delivered by us, or relayed to a hop that cannot tell.
                action = "delivered" if res.local else "relayed"
                succeeded.append(dataclasses.replace(failure, action=action))
        queue.record_outcomes(s, job.trace, settled, now)
        may_notify = job.sender != "" and not job.is_bounce
        if failures and may_notify:
            self._send_dsn(s, job, failures, now, asked, delayed=False)
        if succeeded and may_notify:
            self._send_dsn(s, job, succeeded, now, asked, success=True)
        warn = self.policy.delay_warning
        if deferred and not job.warned and warn > 0 and age >= warn:
            if delayed and may_notify:
                self._send_dsn(s, job, delayed, now, asked, delayed=True)
            s.execute(update(Message).where(Message.id == job.trace).values(warned=True))
        if not deferred:  # a deferred recipient is still queued: the body must stay
            queue.drop_body_if_done(s, job.trace)

    def _send_dsn(
        self, s: Session, job: queue.Job, failures: list[bounce.Failure], now: dt.datetime,
        asked: options.Asked, *, delayed: bool = False, success: bool = False,
    ) -> None:
        notice = queue.enqueue_dsn(
            s, hostname=self.hostname, trace=job.trace, sender=job.sender, original=job.body,
            received=job.received, failures=failures, now=now, delayed=delayed,
            success=success, envid=asked.envid, ret=asked.ret,
        )
        kind = "success notice" if success else "delay warning" if delayed else "bounce"
        log.info("%s to=<%s> queued as %s", kind, job.sender, notice)


class _Wakeup(asyncio.DatagramProtocol):
    def __init__(self, event: asyncio.Event) -> None:
        self.event = event

    def datagram_received(self, data: bytes, addr: object) -> None:
        self.event.set()


async def run(ctx: Context) -> None:
    cfg = ctx.config
    mta = cfg.mta
    public = cfg.endpoint("mta.smtp")
    local = LocalDelivery(
        cfg.endpoint("mda.lmtp"), hostname=cfg.mailroom.hostname, sessions=mta.lmtp_sessions,
        timeout=cfg.smtp.idle_timeout,
    )
    remote = RemoteDelivery(
        hostname=cfg.mailroom.hostname,
        resolver=make_resolver(cfg.dns.nameservers, cfg.dns.timeout),
        relayhost=mta.relayhost,
        relayhost_auth=(mta.relayhost_username, mta.relayhost_password)
        if mta.relayhost_username else None,
        relayhost_tls_verify=mta.relayhost_tls_verify,
        relayhost_ca_file=str(cfg.resolve(mta.relayhost_ca_file)) if mta.relayhost_ca_file else "",
        transport=mta.transport,
        remote_port=mta.remote_port,
        per_destination=mta.concurrency_per_destination,
        connect_timeout=mta.connect_timeout,
        timeout=mta.smtp_timeout,
        # Our own public listener: an MX leading back to it is a loop, whatever its name.
        listening=None if public.is_unix else public.hostport,
    )
    qm = QueueManager(
        db=ctx.db, clock=ctx.clock,
        policy=Policy(mta.retry_schedule, mta.max_queue_lifetime, mta.delay_warning, mta.local_retry_schedule),
        local_domains=cfg.mailroom.domains, hostname=cfg.mailroom.hostname,
        local=local, remote=remote,
        sender_for=lambda sender, original, rcpt: mailauth.forward_sender(
            ctx, sender, original=original, recipient=rcpt
        ),
    )
    released = await ctx.db.run(_release, ctx.db, qm.host)
    if released:
        log.info("put back %d recipients left active by an earlier run", released)
    sock_path = cfg.qmgr_socket
    with contextlib.suppress(FileNotFoundError):
        sock_path.unlink()
    loop = asyncio.get_running_loop()
    # Bound here and handed over: uvloop takes a Unix datagram socket only as `sock`.
    wake_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        wake_sock.bind(str(sock_path))
    except OSError:
        wake_sock.close()
        raise
    transport, _ = await loop.create_datagram_endpoint(lambda: _Wakeup(qm.wake), sock=wake_sock)
    log.info("queue manager running")
    last_checkpoint = loop.time()
    try:
        while not ctx.stop.is_set():
            qm.wake.clear()
            busy = await qm.run_once()
            if loop.time() - last_checkpoint > 60:
                await ctx.db.run(ctx.db.checkpoint)
                last_checkpoint = loop.time()
            if busy:
                continue
            stop_wait = asyncio.create_task(ctx.stop.wait())
            wake_wait = asyncio.create_task(qm.wake.wait())
            await asyncio.wait(
                [stop_wait, wake_wait], timeout=mta.poll_interval,
                return_when=asyncio.FIRST_COMPLETED,
            )
            stop_wait.cancel()
            wake_wait.cancel()
        await qm.drain()
    finally:
        transport.close()
        await local.close()
        await remote.close()


def _release(db: Database, host: str) -> int:
    with db.write() as s:
        return queue.release_stale(s, host)



if __name__ == "__main__":
    # `python -m mta.qmgr`: the queue manager has no listener of its own.
    from common.daemon import main

    main("qmgr", run)
