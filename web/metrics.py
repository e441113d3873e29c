"""Prometheus metrics derived from the shared database, for `/metrics`.

The daemons export nothing themselves: every hop already writes a row to the
`events` table, so the web program reads that table in id order (web/feed.py
hands each new row to `Metrics.observe`) and counts.  The counters are the
trace table summed up, so they agree with `mailroom trace` by construction, and
they survive a restart of any daemon (the web program re-reads the table when
it starts).  What is a state rather than a history (the queue) is asked of the
database at scrape time.

Not in the database, on purpose: login failures and listener connections (an
attacker's cheapest moves must not cost a database write), and TLS on outgoing
deliveries.  The daemons count those in memory and save them every few seconds
to `<run_dir>/metrics/<program>.json` (common/counters.py; one file per MTA
process, `mta_0.json`, ..., with `[mta] processes` above 1); `DaemonCounters`
reads every file there at scrape time and sums them.  A daemon starts from its file's values, so
these counters carry on across a restart too.  Dovecot counts the IMAP and
POP3 login failures itself; they are asked of it at scrape time
(web/dovecot_stats.py).
"""

from __future__ import annotations

import datetime as dt
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from common import backupstatus, counters
from common import dns as dnsmod
from common.config import Config
from common.db import Database
from common.events import FINAL, EventName, Hop
from common.log import is_trace_id, trace_time_us
from common.models import ACTIVE, QUEUED, Message, Recipient, utcnow
from common.tls import read_certificate
from web import dovecot_stats

# Seconds: from a few milliseconds (a local hand-off) to the five-day lifetime.
HOP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900,
               3600, 4 * 3600, 86400, 5 * 86400)
# Traces whose last event time we remember, to time the next hop (oldest forgotten first).
REMEMBERED_TRACES = 50_000


class QueueCollector(Collector):
    """Gauges asked of the database at each scrape: what is in the queue now."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # What registration asks for, without a query: the web program may start
        # before the daemons have created the schema.
        for name in ("mailroom_queue_recipients", "mailroom_queue_messages", "mailroom_queue_held_messages",
                     "mailroom_queue_oldest_age_seconds"):
            yield GaugeMetricFamily(name, "")

    def collect(self) -> Iterator[GaugeMetricFamily]:
        pending = (QUEUED, ACTIVE)
        with self.db.read() as s:
            counted = s.execute(
                select(Recipient.state, func.count()).where(Recipient.state.in_(pending)).group_by(Recipient.state)
            )
            by_state: dict[str, int] = {state: n for state, n in counted}
            waiting = select(Recipient.message_id).where(Recipient.state.in_(pending))
            messages, oldest = s.execute(
                select(func.count(), func.min(Message.received)).where(Message.id.in_(waiting))
            ).one()
            held = s.scalar(select(func.count()).where(Message.held.is_(True), Message.id.in_(waiting))) or 0
        rcpts = GaugeMetricFamily(
            "mailroom_queue_recipients", "Recipients in the queue, by state (queued: waiting; active: being tried)",
            labels=["state"],
        )
        for state in pending:
            rcpts.add_metric([state], by_state.get(state, 0))
        yield rcpts
        yield GaugeMetricFamily("mailroom_queue_messages", "Messages with at least one recipient in the queue",
                                value=messages)
        yield GaugeMetricFamily("mailroom_queue_held_messages", "Queued messages on hold (`mailroom queue hold`)",
                                value=held)
        age = (utcnow() - oldest).total_seconds() if oldest is not None else 0.0
        yield GaugeMetricFamily("mailroom_queue_oldest_age_seconds",
                                "Age of the oldest message in the queue (0 when it is empty)", value=max(age, 0.0))


class BackupCollector(Collector):
    """The last backup's outcome (RUN_DIR/backup.json, written by `mailroom backup`), read at each scrape."""

    def __init__(self) -> None:
        self.run_dir: Path | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        last = backupstatus.read(self.run_dir) if self.run_dir is not None else None
        yield GaugeMetricFamily("mailroom_backup_last_success_timestamp_seconds",
                                "When the last successful backup finished (Unix time; 0: never)",
                                value=last.last_ok if last else 0.0)
        yield GaugeMetricFamily("mailroom_backup_last_run_timestamp_seconds",
                                "When the last backup, successful or not, finished (Unix time; 0: never)",
                                value=last.finished if last else 0.0)
        yield GaugeMetricFamily("mailroom_backup_last_run_ok", "1 when the last backup succeeded, 0 when it failed "
                                "or none has run", value=1.0 if last and last.ok else 0.0)
        yield GaugeMetricFamily("mailroom_backup_last_new_bytes", "Bytes the last backup stored that the backup "
                                "folder did not hold yet", value=float(last.new_bytes) if last else 0.0)


# The listener settings whose address a daemon's counters name, shown by setting instead.
LISTENER_SETTINGS = ("msa.submission", "msa.submissions", "mta.smtp", "mta.internal", "mda.lmtp")


class DaemonCounters(Collector):
    """What the daemons counted in memory (common/counters.py), read from their files at each scrape,
    and the TLS use of received messages (from the trace table) beside that of sent ones."""

    def __init__(self) -> None:
        self.folder: Path | None = None  # <run_dir>/metrics; None: no daemon files (tests of the web alone)
        self.run_dir: Path | None = None  # where Dovecot's stats socket is named (web/dovecot_stats.py)
        self.listeners: dict[str, str] = {}  # listening address -> the setting that names it
        self.tls_in: dict[tuple[str, str], float] = {}  # (hop, tls) -> messages received
        self.lock = threading.Lock()

    def totals(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every daemon's counters, summed by name and labels."""
        found: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        if self.folder is None:
            return found
        for path in sorted(self.folder.glob("*.json")):
            for e in counters.read(path):
                labels = dict(e["labels"])
                if "listener" in labels:
                    labels["listener"] = self.listeners.get(labels["listener"], labels["listener"])
                key = (e["name"], tuple(sorted(labels.items())))
                found[key] = found.get(key, 0.0) + e["value"]
        return found

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        got = self.totals()

        def family(name: str, text: str, counter: str, labels: list[str]) -> CounterMetricFamily:
            fam = CounterMetricFamily(name, text, labels=labels)
            for (n, pairs), value in sorted(got.items()):
                if n == counter:
                    d = dict(pairs)
                    fam.add_metric([d.get(label, "") for label in labels], value)
            return fam

        logins = family("mailroom_login_failures", "Failed logins (wrong name or password, undecodable "
                        "credentials) by listener: the MSA's by setting, Dovecot's as imap and pop3 (counted by "
                        "Dovecot, from zero again when it restarts)", counters.LOGIN_FAILURES, ["listener"])
        sock = dovecot_stats.socket_path(self.run_dir) if self.run_dir is not None else None
        for protocol, value in sorted(dovecot_stats.auth_failures(sock).items() if sock else []):
            logins.add_metric([protocol], value)
        yield logins
        yield family("mailroom_connections", "Client connections by listener, accepted or refused by the "
                     "connection caps ([smtp] max_connections, max_connections_per_client)",
                     counters.CONNECTIONS, ["listener", "result"])
        yield family("mailroom_stress", "Times a listener entered stress mode near its connection cap "
                     "([smtp] stress_threshold): idle and TLS handshake timeouts shortened to stress_timeout",
                     counters.STRESS, ["listener"])
        tls = CounterMetricFamily("mailroom_tls_sessions", "Messages by direction (in: received from a client or "
                                  "another host, not the MSA's hand-off to the MTA; out: handed to a remote host), "
                                  "hop and whether the session was encrypted (TLS)",
                                  labels=["direction", "hop", "tls"])
        with self.lock:
            received = sorted(self.tls_in.items())
        for (hop, yes), value in received:
            tls.add_metric(["in", hop, yes], value)
        for (n, pairs), value in sorted(got.items()):
            if n == counters.TLS_OUT:
                d = dict(pairs)
                tls.add_metric(["out", d.get("hop", ""), d.get("tls", "")], value)
        yield tls
        yield from dns_families(got, family)


def dns_families(
    got: dict[tuple[str, tuple[tuple[str, str], ...]], float], family: Any,
) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
    """What the daemons' resolvers counted (common/dns.py), summed over the daemons."""
    yield family("mailroom_dns_queries", "DNS queries sent by the daemons' resolvers, by record type and result "
                 "(answer, nxdomain, nodata, timeout, failure)", dnsmod.QUERIES, ["type", "result"])
    yield family("mailroom_dns_cache_hits", "DNS lookups answered without a query of their own, by record type: "
                 "from the cache, or joined to the same query already in flight", dnsmod.CACHE_HITS, ["type", "how"])
    hist = HistogramMetricFamily("mailroom_dns_query_seconds", "Time the daemons' DNS queries took, by record type",
                                 labels=["type"])
    buckets: dict[str, dict[str, float]] = {}
    sums: dict[str, float] = {}
    for (name, pairs), value in got.items():
        labels = dict(pairs)
        if name == dnsmod.QUERY_SECONDS + "_bucket":
            per = buckets.setdefault(labels.get("type", ""), {})
            per[labels.get("le", "+Inf")] = per.get(labels.get("le", "+Inf"), 0.0) + value
        elif name == dnsmod.QUERY_SECONDS + "_sum":
            sums[labels.get("type", "")] = sums.get(labels.get("type", ""), 0.0) + value
    for rdtype in sorted(buckets):
        # The daemons count each query in its own bucket; Prometheus's are cumulative.
        running, cumulative = 0.0, []
        for bound in [*(str(b) for b in dnsmod.BUCKETS), "+Inf"]:
            running += buckets[rdtype].get(bound, 0.0)
            cumulative.append((bound, running))
        hist.add_metric([rdtype], cumulative, sums.get(rdtype, 0.0))
    yield hist


class CertificateCollector(Collector):
    """When the certificate every listener serves (`[tls] cert`) expires, read at each scrape,
    so a renewal shows at once: alert when it comes within a few weeks (the renewer starts a
    month before, for a 90-day certificate)."""

    def __init__(self) -> None:
        self.path: Path | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self.path is None:
            return
        try:
            info = read_certificate(self.path)
        except (OSError, ValueError):
            return
        gauge = GaugeMetricFamily(
            "mailroom_certificate_expiry_timestamp_seconds",
            "When the TLS certificate expires (Unix time), by file and first name", labels=["file", "name"],
        )
        gauge.add_metric([str(self.path), info.names[0] if info.names else ""], info.not_after.timestamp())
        yield gauge


class Metrics:
    """The registry behind /metrics, fed with rows of the events table in id order."""

    def __init__(self, db: Database | None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.events = Counter(
            "mailroom_events", "Rows of the trace table by hop and event: messages received, relayed and queued, "
            "recipients delivered, deferred, bounced, expired, refused", ["hop", "event"], registry=self.registry,
        )
        self.hop_seconds = Histogram(
            "mailroom_hop_seconds", "Time from a message's previous event to this hop's event, by hop and event",
            ["hop", "event"], buckets=HOP_BUCKETS, registry=self.registry,
        )
        self.delivery_seconds = Histogram(
            "mailroom_delivery_seconds", "From a message's arrival to a recipient's final outcome at the queue manager",
            ["outcome"], buckets=HOP_BUCKETS, registry=self.registry,
        )
        self.daemons = DaemonCounters()
        self.registry.register(self.daemons)
        self.certificate = CertificateCollector()
        self.registry.register(self.certificate)
        self.rows_read = Counter("mailroom_events_read", "Rows of the trace table read so far",
                                     registry=self.registry)
        if db is not None:
            self.registry.register(QueueCollector(db))
        self.backup = BackupCollector()
        self.registry.register(self.backup)
        self._last: OrderedDict[str, dt.datetime] = OrderedDict()
        self._lock = threading.Lock()

    def observe(self, rows: Iterable[dict[str, Any]]) -> None:
        """Count events (dicts with trace, hop, event, time as a datetime, detail)."""
        with self._lock:
            for row in rows:
                self._observe(row)

    def _observe(self, row: dict[str, Any]) -> None:
        trace, hop, event, when = row["trace"], row["hop"], row["event"], row["when"]
        self.events.labels(hop, event).inc()
        self.rows_read.inc()
        prev = self._last.pop(trace, None)
        if prev is None and is_trace_id(trace):
            # The trace id starts with the arrival time: the first hop is timed from there.
            prev = dt.datetime(1970, 1, 1) + dt.timedelta(microseconds=trace_time_us(trace))
        if prev is not None and when >= prev and is_trace_id(trace):  # not the admin page's changes (ADMIN)
            self.hop_seconds.labels(hop, event).observe((when - prev).total_seconds())
        self._last[trace] = max(when, prev) if prev is not None else when
        while len(self._last) > REMEMBERED_TRACES:
            self._last.popitem(last=False)
        if hop == Hop.QMGR and event in FINAL and is_trace_id(trace):
            arrived = dt.datetime(1970, 1, 1) + dt.timedelta(microseconds=trace_time_us(trace))
            self.delivery_seconds.labels(event).observe(max((when - arrived).total_seconds(), 0.0))
        # The receiving hops note "tls=yes" in the event's detail.  The MTA's internal
        # listener takes what our own MSA already received (and counted) from the client:
        # that hop is not incoming mail, and its loopback session says nothing of TLS.
        if event == EventName.RECEIVED and (
            hop == Hop.MSA or hop == Hop.MTA and not str(row["detail"]).startswith("internal ")
        ):
            key = (hop, "yes" if "tls=yes" in row["detail"] else "no")
            with self.daemons.lock:
                self.daemons.tls_in[key] = self.daemons.tls_in.get(key, 0.0) + 1

    def read_daemons(self, cfg: Config) -> None:
        """Where the daemons of `cfg` save their counters, and the names of their listeners."""
        self.daemons.folder = cfg.run_dir / "metrics"
        self.daemons.run_dir = cfg.run_dir
        self.certificate.path = cfg.resolve(cfg.tls.cert)
        self.backup.run_dir = cfg.run_dir
        names: dict[str, str] = {}
        for key in LISTENER_SETTINGS:
            try:
                names[str(cfg.endpoint(key))] = key
            except (AttributeError, ValueError):
                continue
        self.daemons.listeners = names

    def render(self) -> bytes:
        return generate_latest(self.registry)
