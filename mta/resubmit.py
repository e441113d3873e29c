"""Knowing a message sent twice: the client never saw our 250, and sends it again.

The MTA committed the message, then was killed (or the MSA between it and the
client was) before the 250 reached the client; a client that did not get its
250 sends the message again, as it should (the "lost reply" of RFC 1047).
Queued twice, it would be delivered twice.  So before it queues a message, the MTA's accept
(mta/queue.py, `accept`) looks for the same message queued within
`[mta] resubmission_window` and answers with that one's trace id instead.

The same message is: the same Message-ID, envelope sender, recipients (as
given at RCPT) and `digest` of everything the sender wrote.  A different
message that reuses a Message-ID has another digest and is queued as usual.
This module only reads; `queue.accept` records what it found.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re

from sqlalchemy import Connection, bindparam, select, text
from sqlalchemy.orm import Session

from common import message
from common.db import connection_of
from common.models import Message, Recipient
from common.prepared import Prepared

# A Received field (RFC 5322 3.6.7), folded lines included.
_RECEIVED = re.compile(rb"(?im)^received:[^\n]*\n(?:[ \t][^\n]*\n)*")


def message_id(header: bytes) -> str:
    """The Message-ID field's value, angle brackets included ("" when there is none)."""
    m = re.search(rb"(?im)^message-id:\s*(<[^>\r\n]{1,900}>)", header)
    return m.group(1).decode("utf-8", "replace") if m else ""


def digest(content: bytes) -> str:
    """sha256 of a message without its Received fields.

    Each hop (our MSA included) adds a Received field with its own time, so
    the same message sent twice differs only there; everything the sender
    wrote, Date and Message-ID included, must be the same.
    """
    header, blank, body = message.split(content)
    return hashlib.sha256(_RECEIVED.sub(b"", header) + blank + body).hexdigest()


def find(
    conn: Connection | Session,
    *,
    message_id: str,
    sender: str,
    originals: list[str],
    digest: str,
    since: dt.datetime,
) -> str | None:
    """The trace id of the same message queued since `since`, or None."""
    if not message_id:
        return None
    conn = connection_of(conn)
    if conn.dialect.name == "postgresql":
        # Two MTAs (or two sessions of one) may check the same message at once;
        # on SQLite the write transaction already excludes the other, here a lock
        # on the Message-ID, held to the commit, makes the second wait and then
        # see the first (each statement reads what is committed by then).
        key = int.from_bytes(hashlib.sha256(message_id.encode()).digest()[:8], "big", signed=True)
        conn.execute(_LOCK_MESSAGE_ID, {"key": key})
    candidates = _RESUBMISSIONS.scalars(conn, {"mid": message_id, "sender": sender, "digest": digest, "since": since})
    wanted = {a.lower() for a in originals}
    for trace in candidates:
        had = _ORIGINALS.scalars(conn, {"trace": trace})
        if {a.lower() for a in had} == wanted:
            return str(trace)
    return None


# Asked for every message the MTA accepts: on the driver's cursor (common/prepared.py).
_RESUBMISSIONS = Prepared(select(Message.id).where(
    Message.message_id == bindparam("mid"), Message.sender == bindparam("sender"),
    Message.digest == bindparam("digest"), Message.received >= bindparam("since"),
))
_ORIGINALS = Prepared(select(Recipient.original).where(Recipient.message_id == bindparam("trace")))
_LOCK_MESSAGE_ID = text("SELECT pg_advisory_xact_lock(:key)")
