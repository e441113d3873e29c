"""The web program as a real process over a real SQLite file: /metrics counts the trace
table, the queue gauges match the recipients table, and /live pushes new events."""

from __future__ import annotations

import datetime as dt
import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, insert, select

from common.db import Database
from common.log import new_trace_id
from common.models import QUEUED, Event, Message, Recipient, add_event, utcnow
from tests.support.ports import free_port
from tests.support.suite import wait_port

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[2]


class Web:
    def __init__(self, tmp_path: Path) -> None:
        self.port = free_port()
        self.db_path = tmp_path / "mailroom.db"
        self.config = tmp_path / "mailroom.toml"
        self.config.write_text(
            '[mailroom]\ndomains = ["example.org"]\ndatabase = "sqlite:///mailroom.db"\n'
            f'[web]\nlisten = "127.0.0.1:{self.port}"\n'
        )
        self.db = Database(f"sqlite:///{self.db_path}", threads=1)
        self.db.create_schema()
        self.log = tmp_path / "web.log"

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "web", "--config", str(self.config)], stdout=log, stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        wait_port(self.port)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)

    def get(self, path: str) -> tuple[int, str, bytes]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as r:
            return r.status, r.headers["Content-Type"], r.read()

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        status, ctype, body = self.get("/metrics")
        assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
        out = {}
        for family in text_string_to_metric_families(body.decode()):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out


@pytest.fixture
def web(tmp_path: Path) -> Iterator[Web]:
    w = Web(tmp_path)
    yield w
    if hasattr(w, "proc"):
        w.stop()


def record_journey(db: Database, *, deferred: bool, tls: bool = True, age: float = 0.0) -> str:
    """A message's rows as the daemons write them: msa, mta, queue, then qmgr and mda."""
    trace = new_trace_id()
    now = utcnow()
    with db.write() as s:
        add_event(s, trace, "msa", "received", detail="from=<a@example.org> user=a@example.org client=127.0.0.1"
                  + (" tls=yes" if tls else ""), time=now)
        add_event(s, trace, "msa", "relayed", detail="250 2.0.0 Ok", time=now)
        add_event(s, trace, "mta", "received", detail="internal from 127.0.0.1 helo=x", time=now)
        s.execute(insert(Message).values(id=trace, sender="a@example.org", size=10, body=b"x",
                                         received=now - dt.timedelta(seconds=age)))
        s.execute(insert(Recipient).values(message_id=trace, address="b@example.org", state=QUEUED,
                                           next_attempt=now + dt.timedelta(seconds=300),
                                           last_reply="451 4.2.0 try later" if deferred else ""))
        add_event(s, trace, "mta", "queued", detail="from=<a@example.org> size=10 nrcpt=1", time=now)
        if deferred:
            add_event(s, trace, "qmgr", "deferred", recipient="b@example.org", detail="451 4.2.0 try later",
                      time=now + dt.timedelta(milliseconds=40))
        else:
            add_event(s, trace, "mda", "delivered", recipient="b@example.org", detail="250 2.0.0 Ok",
                      time=now + dt.timedelta(milliseconds=20))
            add_event(s, trace, "qmgr", "delivered", recipient="b@example.org", detail="250 2.0.0 Ok",
                      time=now + dt.timedelta(milliseconds=30))
            s.execute(Recipient.__table__.update().where(Recipient.message_id == trace).values(state="delivered"))
        s.commit()
    return trace


def table_counts(db: Database) -> dict[tuple[str, str], int]:
    with db.read() as s:
        rows = s.execute(select(Event.hop, Event.event, func.count()).group_by(Event.hop, Event.event)).all()
    return {(hop, event): n for hop, event, n in rows}


def test_the_msa_hand_off_is_not_counted_as_incoming_mail(web: Web) -> None:
    """A submission is received once, at the MSA (over TLS); the MSA's loopback hand-off to the
    MTA's internal listener is no unencrypted incoming message.  Mail from another host is."""
    record_journey(web.db, deferred=False)  # msa received tls=yes, then mta received "internal from ..."
    with web.db.write() as s:
        add_event(s, new_trace_id(), "mta", "received", detail="smtp from 192.0.2.7 helo=mx.other.test")
        add_event(s, new_trace_id(), "mta", "received", detail="smtp from 192.0.2.8 helo=mx.tls.test tls=yes")
        s.commit()
    web.start()
    m = web.metrics()
    tls = {tuple(v for _, v in labels): n for (name, labels), n in m.items() if name == "mailroom_tls_sessions_total"}
    assert tls == {("in", "msa", "yes"): 1, ("in", "mta", "no"): 1, ("in", "mta", "yes"): 1}, tls


def test_metrics_count_the_trace_table_and_the_queue(web: Web) -> None:
    record_journey(web.db, deferred=False)  # before the start: read back from the table
    web.start()
    record_journey(web.db, deferred=False, tls=False)
    record_journey(web.db, deferred=True, age=120.0)
    m = web.metrics()

    counts = table_counts(web.db)
    assert counts[("qmgr", "delivered")] == 2 and counts[("qmgr", "deferred")] == 1
    exported = {
        (dict(labels)["hop"], dict(labels)["event"]): int(v)
        for (name, labels), v in m.items() if name == "mailroom_events_total"
    }
    assert exported == counts

    assert m[("mailroom_queue_messages", ())] == 1
    assert m[("mailroom_queue_recipients", (("state", "queued"),))] == 1
    assert m[("mailroom_queue_recipients", (("state", "active"),))] == 0
    assert 119 <= m[("mailroom_queue_oldest_age_seconds", ())] < 200
    assert m[("mailroom_tls_sessions_total", (("direction", "in"), ("hop", "msa"), ("tls", "yes")))] == 2
    assert m[("mailroom_tls_sessions_total", (("direction", "in"), ("hop", "msa"), ("tls", "no")))] == 1
    # One latency observation per event, per hop; deliveries timed from arrival.
    assert m[("mailroom_hop_seconds_count", (("event", "delivered"), ("hop", "mda")))] == 2
    assert m[("mailroom_delivery_seconds_count", (("outcome", "delivered"),))] == 2
    assert m[("mailroom_hop_seconds_bucket", (("event", "delivered"), ("hop", "mda"), ("le", "0.025")))] == 2

    # A scrape counts whatever was committed before it.
    record_journey(web.db, deferred=False)
    again = web.metrics()
    assert again[("mailroom_events_total", (("event", "delivered"), ("hop", "qmgr")))] == 3
    assert again[("mailroom_queue_messages", ())] == 1


def read_sse(sock: socket.socket, want: str, buf: bytearray, timeout: float = 10.0) -> dict[str, object] | list[object]:
    """Read Server-Sent Events messages until one of kind `want`; returns its data."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        while b"\n\n" in buf:
            raw, _, rest = bytes(buf).partition(b"\n\n")
            buf[:] = rest
            fields = dict(line.split(": ", 1) for line in raw.decode().split("\n") if ": " in line)
            if fields.get("event") == want:
                data: dict[str, object] | list[object] = json.loads(fields["data"])
                return data
        sock.settimeout(max(deadline - time.monotonic(), 0.1))
        chunk = sock.recv(65536)
        assert chunk, "the stream ended"
        buf += chunk
    raise AssertionError(f"no {want} event within {timeout} s")


def test_live_stream_pushes_new_events_and_the_queue(web: Web) -> None:
    old = record_journey(web.db, deferred=False)
    web.start()
    status, ctype, page = web.get("/")
    assert status == 200 and ctype.startswith("text/html") and b"EventSource" in page
    assert b"http://" not in page and b"https://" not in page  # nothing fetched from elsewhere
    with socket.create_connection(("127.0.0.1", web.port), timeout=10) as sock:
        sock.sendall(b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n")
        buf = bytearray()
        while b"\r\n\r\n" not in buf:
            buf += sock.recv(4096)
        head, _, rest = bytes(buf).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"Content-Type: text/event-stream" in head
        assert b"Content-Length" not in head
        buf = bytearray(rest)
        hello = read_sse(sock, "hello", buf)
        assert isinstance(hello, dict)
        assert {e["trace"] for e in hello["events"]} == {old}  # type: ignore[index,union-attr]

        new = record_journey(web.db, deferred=True)
        pushed: list[dict[str, str]] = []
        while not any(e["event"] == "deferred" for e in pushed):
            got = read_sse(sock, "events", buf)
            assert isinstance(got, list)
            pushed += got
        assert {e["trace"] for e in pushed} == {new}
        assert [e["hop"] + " " + e["event"] for e in pushed] == [
            "msa received", "msa relayed", "mta received", "mta queued", "qmgr deferred"]
        queue = read_sse(sock, "queue", buf)
        assert isinstance(queue, dict)
        [row] = queue["recipients"]  # type: ignore[misc]
        assert row["trace"] == new and row["last_reply"] == "451 4.2.0 try later" and row["state"] == "queued"

    status, _, body = web.get(f"/trace?id={new}")
    trace = json.loads(body)
    assert trace["id"] == new and trace["events"][-1]["event"] == "deferred"


def test_the_web_program_stops_promptly_with_a_page_open(web: Web) -> None:
    web.start()
    with socket.create_connection(("127.0.0.1", web.port), timeout=10) as sock:
        sock.sendall(b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        web.proc.terminate()
        assert web.proc.wait(10) == 0
        assert time.monotonic() - started < 5


def test_queue_age_is_measured_in_lab_time(web: Web) -> None:
    """In a lab the daemons stamp lab time; the web program measures the queue's age against lab now."""
    from common.clock import SystemClock, WarpedClock

    since = SystemClock().now().replace(microsecond=0) - dt.timedelta(hours=1)  # lab now: 60 lab hours ahead
    web.config.write_text(web.config.read_text()
                          + f'[lab]\ntime_warp = 60\ntime_warp_since = "{since.isoformat()}"\n')
    lab_now = WarpedClock(SystemClock(), 60, since).now()
    trace = new_trace_id()
    with web.db.write() as s:
        s.execute(insert(Message).values(id=trace, sender="a@example.org", size=10, body=b"x",
                                         received=lab_now - dt.timedelta(seconds=120)))
        s.execute(insert(Recipient).values(message_id=trace, address="b@example.org", state=QUEUED,
                                           next_attempt=lab_now + dt.timedelta(seconds=300), last_reply=""))
        s.commit()
    web.start()
    age = web.metrics()[("mailroom_queue_oldest_age_seconds", ())]
    # Two lab minutes, plus a lab minute for each real second the start took.
    assert 120 <= age < 120 + 60 * 30, age


def test_a_page_opened_later_starts_with_the_current_queue(web: Web) -> None:
    # The feed refreshes its queue snapshot only while pages listen; a page that
    # opens after mail was queued unwatched must still start with that mail.
    web.start()
    waiting = record_journey(web.db, deferred=True)
    assert web.metrics()[("mailroom_queue_messages", ())] == 1  # the feed has read it
    with socket.create_connection(("127.0.0.1", web.port), timeout=10) as sock:
        sock.sendall(b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n")
        buf = bytearray()
        while b"\r\n\r\n" not in buf:
            buf += sock.recv(4096)
        buf = bytearray(bytes(buf).partition(b"\r\n\r\n")[2])
        hello = read_sse(sock, "hello", buf)
    assert isinstance(hello, dict)
    assert [r["trace"] for r in hello["queue"]["recipients"]] == [waiting]  # type: ignore[index]
