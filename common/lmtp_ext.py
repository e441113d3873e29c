"""Mailroom's own LMTP extensions, spoken between its queue manager and its MDA.

LMTP (RFC 2033) is SMTP for the last hop: after DATA the server answers once
per recipient, because each mailbox succeeds or fails on its own.  Our queue
manager (mta/delivery.py, `LocalDelivery`) and our MDA (mda/server.py) add two
MAIL FROM parameters to it.  Their names begin with X, as RFC 5321 2.2.2 asks
of extensions that are not registered; the MDA advertises each in its reply to
LHLO, and the queue manager uses one only when it is advertised, so either
side still works with any other LMTP peer (Dovecot's MDA, a test's script).

``XRECORD``: "I, the client, record the outcome."
    Every hop writes an event row, so `mailroom trace` can show a message's
    whole journey.  The MDA's rows would cost it a write transaction per
    delivery; the queue manager writes a transaction for the same recipients
    anyway (its settle).  So the queue manager takes the MDA's rows on: the
    MDA writes none, and each 250 names the file the copy was stored in,
    which the queue manager records as the MDA's `delivered` event in its own
    settle's transaction.

``XRETRY``: "An earlier attempt of mine may have stored this already."
    The queue manager was killed after handing the message over and before
    it recorded the 250, so it cannot know.  The MDA never stores a second
    copy (the Maildir file name and the mbox journal prove the first); with
    XRETRY it also looks where a mail reader may have moved the first copy
    (a Maildir's cur/), which it otherwise skips.

The path in a 250.  LMTP gives one reply line per recipient and nothing else,
so the path travels at the end of that line, after a fixed mark::

    250 2.0.0 Ok: delivered to maildir (0192F3A1B2C3D4E5F6) path=/var/mail/example.org/bob/new/...

It is everything after the first " path=" (a path may hold spaces).  The MDA
adds it with `with_path`; the queue manager's LMTP courier takes it off with
`split_path` as soon as the reply is read, so everything after the courier
sees a plain reply and the path as a value of its own (`Delivered.paths`):
no log line, trace entry or delivery status notice ever carries a mailbox
path by accident.  The path matters for more than the trace: an MDA asked
XRETRY reads the `delivered` events of the message to find where the first
copy went (mda/server.py, `_earlier_deliveries`).
"""

from __future__ import annotations

from common.reply import Reply

# The MAIL parameter: the client records the outcome (the MDA writes no event).
XRECORD = "XRECORD"
# The MAIL parameter: an earlier attempt may have stored this message (its 250 was lost).
XRETRY = "XRETRY"
# What comes before the mailbox path at the end of a 250, under XRECORD.
PATH_MARK = " path="


def with_path(reply: Reply, path: str) -> Reply:
    """The MDA's 250 naming the file the copy was stored in."""
    return reply.with_text(reply.text + PATH_MARK + path)


def split_path(reply: Reply) -> tuple[Reply, str]:
    """The reply without its path, and the path ("" when it names none, as a refusal does)."""
    text, mark, path = reply.text.partition(PATH_MARK)
    return (reply.with_text(text), path) if mark else (reply, "")
