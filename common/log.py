"""Logging with the trace id on every line.

A context variable holds the trace id of the message being handled; a filter
stamps it on every record, so a line reads like Postfix's:

    2026-11-28 22:03:01.123 mta[4242] 0192F3A1B2C3D4E5: queued from=<a@x> size=2101 nrcpt=1

asyncio copies context variables into each task, so concurrent sessions never
see each other's ids.

With `[mailroom] log_format = "json"` each line is one JSON object instead, for
log collectors (Loki, journald exporters, jq):

    {"time": "2026-11-28T22:03:01.123Z", "process": "mta", "pid": 4242, "level": "info",
     "trace_id": "0192F3A1B2C3D4E5", "logger": "mta.queue", "message": "queued from=<a@x> ..."}

`trace_id` is absent when no message is being handled, so a collector can index it.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import os
import secrets
import sys
import time

trace_id: contextvars.ContextVar[str] = contextvars.ContextVar("trace_id", default="-")


def new_trace_id() -> str:
    """18 upper-case hex digits: 13 of microseconds since the epoch, 5 random.

    Sorting by id sorts by arrival, two hosts sharing one database never
    collide in practice, and the arrival time can be read back from the id
    (the MDA uses it in Maildir file names).
    """
    return f"{time.time_ns() // 1000:013X}{secrets.randbits(20):05X}"


def trace_time_us(trace: str) -> int:
    """The arrival time in microseconds that a trace id starts with."""
    return int(trace[:13], 16)


def is_trace_id(text: str) -> bool:
    return len(text) == 18 and all(c in "0123456789ABCDEF" for c in text)


class _TraceFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.trace_id = trace_id.get()
        return True


class JSONFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in the message are escaped)."""

    def __init__(self, process: str) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        when = dt.datetime.fromtimestamp(record.created, dt.UTC)
        out: dict[str, object] = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "process": self.process,
            "pid": os.getpid(),
            "level": record.levelname.lower(),
        }
        trace = getattr(record, "trace_id", "-")
        if trace != "-":
            out["trace_id"] = trace
        out["logger"] = record.name
        out["message"] = record.getMessage()
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup(process: str, level: str = "info", log_format: str = "text") -> None:
    """Configure the root logger for a daemon or the CLI (stderr, one line per record).

    `log_format` is "text" (the Postfix-like line) or "json" (one object per line).
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_TraceFilter())
    if log_format == "json":
        handler.setFormatter(JSONFormatter(process))
    else:
        handler.setFormatter(
            logging.Formatter(
                f"%(asctime)s.%(msecs)03d {process}[{os.getpid()}] %(trace_id)s: %(message)s",
                datefmt="%Y-%m-%d %H:%M:%S",
            )
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiosmtpd logs every command at INFO under "mail.log"; our transcripts are
    # at DEBUG with AUTH redacted, so keep its chatter down.
    # (Its deprecation notice about login_data is its own business too.)
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    logging.getLogger("alembic").setLevel(logging.WARNING)  # "Running upgrade ..." at each start
