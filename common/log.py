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

Text from the network (an address, an AUTH name, a reply) is logged as it came,
except that a record can never be more than one line: in the text format every
control character of the message is written as an escape (`\\n`, `\\r`, `\\x1b`,
`\\u2028`), and a traceback's lines each start with a tab, so no line of a log
can be forged by what a peer sends; in JSON the same characters are JSON escapes.

Where the records go: standard error at first (so a daemon that cannot start
says why where it was started), then, once the daemon knows its account, its
own file `[mailroom] log_dir/PROGRAM.log` (`to_file`).  The file is opened
with O_APPEND, so the processes of one program (the MTA's) can share it, and
each record is one write.  It is a `WatchedFileHandler`: before each record it
checks that the path is still the file it holds, and reopens the path when
logrotate has moved it, so rotation needs no signal and no restart.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import io
import json
import logging
import logging.handlers
import os
import re
import secrets
import sys
import time
from pathlib import Path

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


# C0 and C1 controls, DEL, and the Unicode line and paragraph separators: what could
# end a line, move a terminal's cursor or start an escape sequence.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# What json.dumps leaves as it is (it escapes only the C0 controls).
_JSON_EXTRA = re.compile("[\x7f-\x9f\u2028\u2029]")


def _escape_char(m: re.Match[str]) -> str:
    c = m.group()
    return _NAMED.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def escape(text: str) -> str:
    """`text` on one line, every control character written as an escape."""
    return text if _CONTROL.search(text) is None else _CONTROL.sub(_escape_char, text)


def _continuation(text: str) -> str:
    """A traceback (or stack) under its record: each line escaped and indented by a tab,
    so none of them can pass for a record of its own."""
    return "\n".join("\t" + escape(line) for line in text.split("\n"))


class TextFormatter(logging.Formatter):
    """The Postfix-like line, with the message escaped onto one line."""

    def format(self, record: logging.LogRecord) -> str:
        record.message = escape(record.getMessage())
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += "\n" + _continuation(record.exc_text)
        if record.stack_info:
            line += "\n" + _continuation(self.formatStack(record.stack_info))
        return line


class JSONFormatter(logging.Formatter):
    """One JSON object per record, on one line (every control character a JSON escape)."""

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
        text = json.dumps(out, ensure_ascii=False)
        return text if _JSON_EXTRA.search(text) is None else _JSON_EXTRA.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


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
            TextFormatter(
                f"%(asctime)s.%(msecs)03d {process}[{os.getpid()}] %(trace_id)s: %(message)s",
                datefmt="%Y-%m-%d %H:%M:%S",
            )
        )
    root = logging.getLogger()
    old = root.handlers[:]
    root.handlers[:] = [handler]
    for h in old:
        if isinstance(h, LogFile):
            h.close()
    root.setLevel(level.upper())
    # What every record would look up and none of our formats prints: the caller's
    # file and line (a walk up the stack), its thread and process (the logging
    # HOWTO's "Optimization"; the JSON format reads the pid itself).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    # aiosmtpd logs every command at INFO under "mail.log"; our transcripts are
    # at DEBUG with AUTH redacted, so keep its chatter down.
    # (Its deprecation notice about login_data is its own business too.)
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    logging.getLogger("alembic").setLevel(logging.WARNING)  # "Running upgrade ..." at each start


class LogFile(logging.handlers.WatchedFileHandler):
    """A program's own log file: appended to (O_APPEND, so the processes of one
    program may share it and each record lands whole), owner-only, and reopened
    when it was moved (logrotate) or removed.

    `owner` (uid, gid): as root, a file this handler creates is given to that
    account, so the file is the Mailroom user's whether the daemon made it before
    or after its switch.
    """

    def __init__(self, path: Path, owner: tuple[int, int] | None = None) -> None:
        self._owner = owner
        super().__init__(path, encoding="utf-8", errors="backslashreplace")

    def _open(self) -> io.TextIOWrapper:
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if self._owner is not None and os.geteuid() == 0:
            os.fchown(fd, *self._owner)
            os.fchmod(fd, 0o600)  # one made by hand, or by an older version, is private again
        return open(fd, "a", encoding=self.encoding, errors=self.errors)  # noqa: SIM115 - the handler keeps it

    def reopenIfNeeded(self) -> None:  # noqa: N802 - the standard library's name
        """Reopen the path when the file there is no longer ours (moved or removed).
        Never loses the record over it: when the path cannot be looked at (a folder
        above it closed to this user) or opened, the record goes to the file held."""
        try:
            st = os.stat(self.baseFilename)
        except FileNotFoundError:
            st = None
        except OSError:
            return
        if st is not None and (st.st_dev, st.st_ino) == (self.dev, self.ino):
            return
        if self.stream is None:  # closed: FileHandler opens the path again itself
            return
        try:
            stream = self._open()
        except OSError:
            return
        old, self.stream = self.stream, stream
        old.close()
        self._statstream()


def to_file(path: Path, owner: tuple[int, int] | None = None) -> None:
    """From now on every record goes to `path` (a LogFile) instead of stderr, in the
    format `setup` chose."""
    root = logging.getLogger()
    old = root.handlers[0] if root.handlers else None
    handler = LogFile(path, owner)
    handler.addFilter(_TraceFilter())
    if old is not None and old.formatter is not None:
        handler.setFormatter(old.formatter)
    root.handlers[:] = [handler]
    if isinstance(old, LogFile):
        old.close()


def file_path() -> Path | None:
    """The file the records go to, or None while they go to stderr."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, LogFile):
            return Path(handler.baseFilename)
    return None
