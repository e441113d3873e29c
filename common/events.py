"""The names a trace event is recorded under: which hop, and what happened there.

Every row of the `events` table (common/models.py) carries one `Hop` and one
`EventName`; `mailroom trace`, the live page and /metrics read them back.  They
are `StrEnum`s whose values are the words stored in the table, so a member
compares equal to the text read back and no row needs rewriting.  One place to
look up the whole vocabulary, and mypy refuses a misspelt name at a call site.

The queue manager decides an `Outcome` per recipient (mta/queue.py: delivered,
deferred, bounced, expired); the `qmgr` event it records is the `EventName` of
the same value (`EventName(outcome)`).  The decision and the record are kept
apart on purpose: more things happen to a message than a delivery attempt can
decide.
"""

from __future__ import annotations

from enum import StrEnum


class Hop(StrEnum):
    """Who recorded the event."""

    MSA = "msa"  # submission: an authenticated client handed a message in
    MTA = "mta"  # the MTA's listener (smtpd): received and queued
    QMGR = "qmgr"  # the queue manager: delivery attempts, DSNs
    MDA = "mda"  # local delivery into a mailbox (LMTP)
    ADMIN = "admin"  # the operator, through `mailroom queue` or the admin page


class EventName(StrEnum):
    """What happened at that hop."""

    RECEIVED = "received"  # msa, mta: a client's DATA was accepted
    RELAYED = "relayed"  # msa: the MTA took the message (its reply is the detail)
    QUEUED = "queued"  # mta (or qmgr / admin for a DSN): stored durably in the queue
    RESUBMITTED = "resubmitted"  # mta: the same message again; the earlier copy stands
    DELIVERED = "delivered"  # qmgr: the next hop took it; mda: stored in the mailbox
    REFUSED = "refused"  # mda: the mailbox could not take it (its reply is the detail)
    DEFERRED = "deferred"  # qmgr: a temporary failure; tried again later
    BOUNCED = "bounced"  # qmgr: a permanent failure; the sender is told
    EXPIRED = "expired"  # qmgr: still failing at the end of the queue lifetime
    DSN = "dsn"  # qmgr / admin: a bounce, delay warning or success notice was queued
    HELD = "held"  # admin: `mailroom queue hold`
    RELEASED = "released"  # admin: `mailroom queue release`
    DELETED = "deleted"  # admin: `mailroom queue delete`
    FILTERED = "filtered"  # mda: the user's Sieve filter redirected, replied or failed (the detail says)
    CHANGED = "changed"  # admin: a change made on the admin page (or a user's own page); the detail says who and what


# The events that end one recipient's journey through the queue manager.
FINAL = (EventName.DELIVERED, EventName.BOUNCED, EventName.EXPIRED)
