"""Prometheus metrics derived from the shared database, for `/metrics`.

The daemons export nothing themselves: every hop already writes a row to the
`events` table, so the web program reads that table in id order (web/feed.py
hands each new row to `Metrics.observe`) and counts.  The counters are the
trace table summed up, so they agree with `mailroom trace` by construction, and
they survive a restart of any daemon (the web program re-reads the table when
it starts).  What is a state rather than a history (the queue) is asked of the
database at scrape time.

Not derived, because no table records them yet: login failures and listener
connections (the MSA and MTA keep those in memory), and TLS on outgoing
deliveries (the queue manager's events do not say whether the hop used TLS).
"""

from __future__ import annotations

import datetime as dt
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from common.db import Database
from common.log import is_trace_id, trace_time_us
from common.models import ACTIVE, QUEUED, Message, Recipient, utcnow

# Seconds: from a few milliseconds (a local hand-off) to the five-day lifetime.
HOP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900,
               3600, 4 * 3600, 86400, 5 * 86400)
# Traces whose last event time we remember, to time the next hop (oldest forgotten first).
REMEMBERED_TRACES = 50_000
# Events that end one recipient's journey through the queue manager.
FINAL = ("delivered", "bounced", "expired")


class QueueCollector(Collector):
    """Gauges asked of the database at each scrape: what is in the queue now."""

    def __init__(self, db: Database) -> None:
        self.db = db

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
        self.tls = Counter(
            "mailroom_tls_sessions", "Messages received, by hop and whether the session was encrypted (TLS)",
            ["direction", "hop", "tls"], registry=self.registry,
        )
        self.rows_read = Counter("mailroom_events_read", "Rows of the trace table read so far",
                                     registry=self.registry)
        if db is not None:
            self.registry.register(QueueCollector(db))
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
        if prev is not None and when >= prev:
            self.hop_seconds.labels(hop, event).observe((when - prev).total_seconds())
        self._last[trace] = max(when, prev) if prev is not None else when
        while len(self._last) > REMEMBERED_TRACES:
            self._last.popitem(last=False)
        if hop == "qmgr" and event in FINAL and is_trace_id(trace):
            arrived = dt.datetime(1970, 1, 1) + dt.timedelta(microseconds=trace_time_us(trace))
            self.delivery_seconds.labels(event).observe(max((when - arrived).total_seconds(), 0.0))
        if event == "received" and hop in ("msa", "mta"):
            # The receiving hops note "tls=yes" in the event's detail.
            self.tls.labels("in", hop, "yes" if "tls=yes" in row["detail"] else "no").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
