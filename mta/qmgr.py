"""The queue manager: takes due recipients from the queue and delivers them.

Each round it claims due recipients, groups them per message and next hop
(local domains: one LMTP transaction to the MDA; remote domains: SMTP per
domain), hands each group to the courier for that hop (mta/courier.py), and
settles every outcome in one transaction per message (mta/queue.py, where
every change of queue state is made):

    2xx -> delivered      5xx -> bounced (DSN to the sender)
           (a success notice when the recipient asked NOTIFY=SUCCESS and no
           later hop will send one)
    4xx -> queued again after the retry schedule, or expired (DSN) when the
           message is older than max_queue_lifetime; a delay warning DSN is
           sent once when it is older than delay_warning.

It is woken by a datagram on run/qmgr.sock when mail arrives (Postfix's qmgr
trigger, mta/wakeup.py).  The MTA's datagram names the message it has just
committed, and that message is claimed at once by its id; a scan for
everything due (retries, operator flushes, anything whose datagram was lost)
runs at start, when a datagram names no message, and every poll_interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path

from sqlalchemy import Connection
from sqlalchemy.exc import OperationalError

from common import reply as R
from common.address import domain_of
from common.clock import Clock, rate
from common.daemon import Context, resolver_settings
from common.db import Database
from common.log import trace_id
from mta import mtasts, options, queue, tlsrpt, wakeup
from mta.auth import mailauth
from mta.courier import Attempt, Courier, Delivered
from mta.delivery import LocalDelivery, RemoteDelivery
from mta.queue import Claimed, Policy, Result
from mta.tlsdns import DNSSECResolver
from mta.tlspolicy import Planner, Table

log = logging.getLogger("qmgr")

class QueueManager:
    def __init__(
        self,
        *,
        db: Database,
        clock: Clock,
        policy: Policy,
        local_domains: list[str],
        hostname: str,
        local: Courier,
        remote: Courier,
        max_in_flight: int = 100,
        sender_for: Callable[[str, str, str], str] | None = None,
        node: str = "",
        lease: float = queue.LEASE,
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
        # Claims are owned by "node:pid.start": the node tells the hosts sharing the queue apart.
        self.host = node or socket.gethostname()
        self.owner = queue.owner_id(self.host)
        # A claim lasts this long unless renewed; renewed a third of it apart (`serve`).
        # The lease is real time; its expiry is written in the clock's time, which in a
        # lab runs faster (else a claim would expire before its delivery ends).
        self.lease = lease
        self.lease_in_clock = lease * rate(clock)
        self.in_flight = asyncio.Semaphore(max_in_flight)
        self.wake = asyncio.Event()
        # Messages the MTA named in its wake-ups, to claim by id; and whether a
        # scan for everything due was asked for (a wake-up naming no message,
        # or mail brought forward).
        self.woken: dict[str, None] = {}
        self.scan_asked = False
        # Local hand-offs were deferred (the MDA was away): the first one that
        # succeeds again brings the others forward.
        self.local_backlog = False
        self.tasks: set[asyncio.Task[None]] = set()

    def woken_by(self, data: bytes) -> None:
        """A wake-up datagram (mta/wakeup.py): a message just queued, or a scan for everything due."""
        trace = wakeup.named(data)
        if trace is not None:
            self.woken[trace] = None
        else:
            self.scan_asked = True
        self.wake.set()

    async def run_once(self, traces: list[str] | None = None) -> int:
        """Claim what is due (of `traces` only, when given) and start delivering it;
        returns how many messages."""
        async with self.in_flight:
            pass  # wait for room before claiming more
        # In the relaxed batch with the outcomes being settled: one commit for
        # both (not fsync'd: no reply rests on a claim; a power cut that loses
        # one leaves the recipient queued or active, and it is delivered again,
        # the MDA's idempotent writes absorbing the repeat).
        try:
            jobs = await self.db.write_batched(self._claim, traces, relaxed=True)
        except OperationalError as exc:  # the database is away: the next scan tries again
            log.warning("cannot claim due mail yet: %s", exc.orig)
            self.scan_asked = False
            return 0
        if sum(len(job.recipients) for job in jobs) >= queue.CLAIM_LIMIT:
            self.scan_asked = True  # there may be more: look again at once
        for job in jobs:
            await self.in_flight.acquire()
            task = asyncio.create_task(self._process(job))
            self.tasks.add(task)
            task.add_done_callback(self._done)
        return len(jobs)

    def _claim(self, conn: Connection, traces: list[str] | None = None) -> list[queue.Job]:
        return queue.claim(
            conn, self.owner, self.clock.now(), queue.CLAIM_LIMIT, traces=traces, lease=self.lease_in_clock
        )

    async def renew(self) -> None:
        """Move on the leases of every recipient this queue manager holds (mta/queue.py)."""
        try:
            await self.db.write_batched(
                lambda conn: queue.renew(conn, self.owner, self.clock.now(), self.lease_in_clock), relaxed=True,
            )
        except OperationalError as exc:
            # Past the lease, other queue managers take the recipients over, and our
            # settles of them are dropped: nothing is delivered twice without the MDA knowing.
            log.warning("cannot renew the leases of the recipients in hand: %s", exc.orig)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self.in_flight.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("delivery task failed", exc_info=task.exception())

    async def listen(self, path: Path) -> asyncio.DatagramTransport:
        """Bind the wake-up socket (a datagram socket at `path`)."""
        return await wakeup.listen(path, self.woken_by)

    async def serve(
        self, stop: asyncio.Event, poll_interval: float, *, every_minute: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        """Deliver until `stop` is set: what the wake-ups name at once, the rest by scans."""
        # The leases are renewed by a task of their own: this loop may wait long for room
        # (max_in_flight deliveries to slow hosts), and so does the drain at the end.
        renewing = asyncio.create_task(self._keep_renewing())
        try:
            await self._scan_until(stop, poll_interval, every_minute)
            await self.drain()
        finally:
            renewing.cancel()

    async def _keep_renewing(self) -> None:
        while True:
            await asyncio.sleep(self.lease / 3)
            await self.renew()

    async def _scan_until(
        self, stop: asyncio.Event, poll_interval: float, every_minute: Callable[[], Awaitable[None]] | None,
    ) -> None:
        loop = asyncio.get_running_loop()
        next_scan = last_minute = loop.time()  # the first scan at once: mail queued while we were down
        # A stop wakes the loop as a wake-up does: one task for the whole run, rather
        # than two tasks and an asyncio.wait per wake-up (one per message, in one session).
        stopping = asyncio.create_task(stop.wait())
        stopping.add_done_callback(lambda _: self.wake.set())
        try:
            while not stop.is_set():
                self.wake.clear()
                if self.woken:
                    traces, self.woken = list(self.woken), {}
                    await self.run_once(traces)
                if self.scan_asked or loop.time() >= next_scan:
                    self.scan_asked = False
                    await self.run_once()
                    next_scan = loop.time() + poll_interval
                if every_minute is not None and loop.time() - last_minute > 60:
                    await every_minute()
                    last_minute = loop.time()
                if self.woken or self.scan_asked or stop.is_set():
                    continue
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, next_scan - loop.time())):
                        await self.wake.wait()
        finally:
            stopping.cancel()

    async def drain(self) -> None:
        """Wait for every delivery in progress (tests and shutdown)."""
        while self.tasks:
            await asyncio.gather(*list(self.tasks), return_exceptions=True)

    async def _process(self, job: queue.Job) -> None:
        trace_id.set(job.trace)
        results: list[Result] = []
        for part in await asyncio.gather(*(self._deliver(c, a) for c, a in self._attempts(job))):
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
                settled = await self.db.write_batched(self._settle, job, results, mda_back, relaxed=True)
                break
            except OperationalError as exc:
                log.warning("cannot record delivery results yet, retrying: %s", exc.orig)
                await asyncio.sleep(1.0)
        # Logged once recorded, and not inside the transaction: writing the lines
        # held the write lock longer (py-spy: a fifth of the busy samples).
        for line, args in settled.lines:
            log.info(line, *args)
        notices = settled.notices
        for notice in notices:  # the DSNs just queued: claimed by their ids, like new mail
            self.woken[notice] = None
        if mda_back:
            # The local mail brought forward is due now: look for it at once.
            self.scan_asked = True
        if notices or mda_back:
            self.wake.set()

    def _attempts(self, job: queue.Job) -> list[tuple[Courier, Attempt]]:
        """One attempt per next hop: every local recipient in one LMTP transaction to
        the MDA; remote ones per domain and envelope sender (a forward may be sent
        as an SRS address of its own)."""
        local: list[Claimed] = []
        remote: defaultdict[tuple[str, str], list[Claimed]] = defaultdict(list)
        for r in job.recipients:
            if domain_of(r.address) in self.local_domains:
                local.append(r)
            else:
                sender = self.sender_for(job.sender, r.original, r.address)
                remote[(domain_of(r.address), sender)].append(r)
        groups: list[tuple[Courier, str, list[Claimed]]] = []
        if local:
            groups.append((self.local, job.sender, local))
        groups += [(self.remote, sender, rcpts) for (_, sender), rcpts in remote.items()]
        return [
            (courier, Attempt(
                job.trace, sender, [r.address for r in rcpts], job.body,
                # What the sender asked decides how it may go (REQUIRETLS): read with the claim.
                options.Outbound(job.asked, rcpts),
                # An earlier attempt may have stored it already (its 250 was lost to a crash).
                retry=any(r.attempts > 0 for r in rcpts),
            ))
            for courier, sender, rcpts in groups
        ]

    @staticmethod
    async def _deliver(courier: Courier, attempt: Attempt) -> list[Result]:
        """The courier's answer, one Result per recipient.

        A failure of our own (a bug, an unexpected error) is a temporary failure of
        each recipient, so that each is settled (deferred), never left active under a
        queue manager that lives on and never takes it again."""
        try:
            got = await courier.deliver(attempt)
        except Exception as exc:  # noqa: BLE001 - every recipient gets it as its reply
            log.exception("delivery attempt failed")
            reply = R.LOCAL_ERROR.with_text(f"Delivery attempt failed: {type(exc).__name__}")
            got = Delivered([reply] * len(attempt.recipients))
        # Our own MDA is no remote host: its name goes in neither the trace detail nor a DSN.
        remote = "" if courier.local else got.host
        paths = got.paths or [""] * len(got.replies)
        return [
            Result(rcpt, reply, remote, local=courier.local, dsn_passed=got.dsn_passed,
                   mda_left_record=got.ours_to_record, mda_path=path)
            for rcpt, reply, path in zip(attempt.outbound.recipients, got.replies, paths, strict=True)
        ]

    def _settle(self, s: Connection, job: queue.Job, results: list[Result], mda_back: bool = False) -> queue.Settlement:
        """Record every outcome and queue the DSNs (run inside a shared relaxed batch)."""
        return queue.settle(
            s, job, results, now=self.clock.now(), policy=self.policy, hostname=self.hostname,
            local_domains=self.local_domains, mda_back=mda_back,
        )


async def run(ctx: Context) -> None:
    cfg = ctx.config
    mta = cfg.mta
    public = cfg.endpoint("mta.smtp")
    auth = mailauth.Current(lambda: ctx.config, ctx.resolver())  # SRS and signing; built again after a reload
    tls_policy, reporter = _outbound_tls(ctx, auth)
    lmtp, hops = cfg.endpoint("mda.lmtp"), ctx.hops()
    local = LocalDelivery(
        lmtp, hostname=cfg.mailroom.hostname, sessions=mta.lmtp_sessions, timeout=cfg.smtp.idle_timeout,
        tls=hops.client_for(lmtp) if hops else None,  # the store's MDA over TLS (common/hop_tls.py)
    )
    remote = RemoteDelivery(
        hostname=cfg.mailroom.hostname,
        resolver=ctx.resolver(),
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
        tls_policy=tls_policy,
    )
    qm = QueueManager(
        db=ctx.db, clock=ctx.clock,
        policy=Policy(mta.retry_schedule, mta.max_queue_lifetime, mta.delay_warning, mta.local_retry_schedule),
        local_domains=cfg.mailroom.domains, hostname=cfg.mailroom.hostname,
        local=local, remote=remote,
        sender_for=lambda sender, original, rcpt: auth().forward_sender(sender, original=original, recipient=rcpt),
        node=cfg.node, lease=cfg.queue.lease,
    )
    released = await ctx.db.run(_release, ctx.db, qm.host)
    if released:
        log.info("put back %d recipients left active by an earlier run", released)
    transport = await qm.listen(cfg.qmgr_socket)
    log.info("queue manager running")

    async def checkpoint() -> None:
        await ctx.db.run(ctx.db.checkpoint)
        if reporter is None:
            return
        try:
            queued = await reporter.send_due()  # TLS-RPT: counts saved, a day's reports queued
        except Exception:  # noqa: BLE001 - statistics: never worth stopping the queue manager for
            log.exception("TLS-RPT: saving the counts or sending the reports failed; trying again in a minute")
            return
        for trace in queued:
            qm.woken[trace] = None
            qm.wake.set()

    try:
        await qm.serve(ctx.stop, mta.poll_interval, every_minute=checkpoint)
    finally:
        transport.close()
        await local.close()
        await remote.close()
        if tls_policy.policies is not None:
            await tls_policy.policies.close()
        if reporter is not None:
            await reporter.save()


def _outbound_tls(ctx: Context, auth: Callable[[], mailauth.MailAuth]) -> tuple[Planner, tlsrpt.Reporter | None]:
    """The outbound TLS policy (mta/tlspolicy.py) and the TLS-RPT reporter, from `[outbound_tls]`."""
    cfg = ctx.config
    ot = cfg.outbound_tls
    # The DANE and MTA-STS questions go to the resolver every other lookup asks (the
    # supervised unbound, when chosen) unless the operator named validating ones.
    resolver = DNSSECResolver(ot.dnssec_resolvers or list(resolver_settings(cfg).nameservers), cfg.dns.timeout)
    if ot.dane:
        if resolver.trusted:
            log.info("DANE on: the AD bit of %s is believed", ", ".join(resolver.addresses))
        else:
            log.warning("DANE off: no validating resolver on this host to believe (%s); "
                        "set [outbound_tls] dnssec_resolvers", ", ".join(resolver.addresses) or "none")
    ca_file = str(cfg.resolve(ot.ca_file)) if ot.ca_file else ""
    policies = mtasts.Policies(
        resolver=resolver, clock=ctx.clock, cache_file=cfg.resolve(ot.mta_sts_cache), port=ot.mta_sts_port,
        ca_file=ca_file, timeout=ot.mta_sts_timeout, max_size=ot.mta_sts_max_size,
    ) if ot.mta_sts else None
    recorder = tlsrpt.Recorder(ctx.clock) if ot.tlsrpt else None
    planner = Planner(table=Table(ot.policy), resolver=resolver, policies=policies,
                      use_dane=ot.dane, ca_file=ca_file, recorder=recorder)
    if recorder is None:
        return planner, None
    sender = ot.tlsrpt_from or f"postmaster@{cfg.mailroom.domains[0]}"

    async def sign(content: bytes, recipients: list[str]) -> bytes:
        return await auth().sign_outgoing(content, trusted=True, recipients=recipients)

    reporter = tlsrpt.Reporter(
        db=ctx.db, clock=ctx.clock, recorder=recorder, resolver=resolver, hostname=cfg.mailroom.hostname,
        sender=sender, organization=ot.tlsrpt_organization, https=ot.tlsrpt_https,
        https_ca_file=ca_file, sign=sign,
    )
    return planner, reporter


def _release(db: Database, host: str) -> int:
    with db.write() as s:
        return queue.release_stale(s, host)



if __name__ == "__main__":
    # `python -m mta.qmgr`: the queue manager has no listener of its own.
    from common.daemon import main

    main("qmgr", run)
