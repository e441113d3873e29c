"""Vacation replies (RFC 5230, RFC 3834): whether to answer, what to say, and remembering whom.

A vacation reply is the one message a user's filter writes on its own, so it
must never add to a mail storm.  We answer only when all of these hold:

- the message has a sender, and it is no robot's address: not <>, nor
  MAILER-DAEMON, LISTSERV, majordomo, owner-*, *-request, *-bounces (RFC 5230
  4.6, RFC 3834 2);
- the message is no automatic one itself: no `Auto-Submitted` other than
  `no` (RFC 3834 5), no `Precedence: bulk/list/junk`, no `List-*` field of a
  mailing list (RFC 2369, RFC 2919), no `X-Auto-Response-Suppress`;
- it was written to the user: one of their addresses (the recipient, the
  script's :addresses) is in To, Cc, Bcc, Resent-To, Resent-Cc or
  Resent-Bcc (RFC 5230 4.5), so a copy of list traffic or spam sent Bcc to
  thousands is not answered;
- our content filter did not call it spam (mda/rules.py);
- this sender has not been answered for this vacation within :days (the
  memory, `vacation_replies`; RFC 5230 4.2), and the user's Sieve sends of the
  last hour are under their hourly sending limit (a storm of a thousand
  different senders gets at most that many replies; `sieve_sends`).

The reply goes to the envelope sender with an empty envelope sender of its own
(MAIL FROM:<>, RFC 3834 3.3), `Auto-Submitted: auto-replied`, `In-Reply-To`
and `References` of the original, and the subject "Auto: <the original's>"
unless the script gave one (RFC 5230 5.5).
"""

from __future__ import annotations

import datetime as dt
import email.utils
import re
from email.header import Header

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from common import clock
from common.models import SieveSend, VacationReply
from mda.sieve import Message, Vacation

_ROBOT_LOCAL = re.compile(
    r"^(mailer-daemon|listserv|majordomo|postmaster|owner-.*|.*-request|.*-bounces?|.*-owner|noreply|no-reply|do-not-reply)$",
    re.IGNORECASE,
)
_RECIPIENT_FIELDS = ("To", "Cc", "Bcc", "Resent-To", "Resent-Cc", "Resent-Bcc")
HOUR = dt.timedelta(hours=1)


def why_not(message: Message, sender: str, my_addresses: list[str]) -> str | None:
    """Why this message gets no vacation reply, or None when it may get one."""
    if not sender or "@" not in sender:
        return "no sender (a bounce)"
    if _ROBOT_LOCAL.match(sender.rsplit("@", 1)[0]):
        return f"the sender <{sender}> is a robot's address"
    auto = [v.split(";")[0].strip().lower() for v in message.header("Auto-Submitted")]
    if any(v and v != "no" for v in auto):
        return "an automatic message (Auto-Submitted)"
    if any(v.strip().lower() in ("bulk", "list", "junk") for v in message.header("Precedence")):
        return "bulk or list mail (Precedence)"
    for name in ("List-Id", "List-Unsubscribe", "List-Post", "List-Help", "List-Owner", "List-Archive"):
        if message.header(name):
            return f"mailing list mail ({name})"
    if message.header("X-Auto-Response-Suppress"):
        return "the sender asked for no automatic answers"
    mine = {a.lower() for a in my_addresses if a}
    written_to = {a.lower() for f in _RECIPIENT_FIELDS for _, a in email.utils.getaddresses(message.header(f)) if a}
    if not mine & written_to:
        return "not written to the user (none of their addresses in To or Cc)"
    return None


def remember(
    s: Session, *, user: str, sender: str, vacation: Vacation, sends_per_hour: int, now: dt.datetime | None = None
) -> str | None:
    """Claim the right to answer `sender` now (in the caller's write transaction; commit it
    before sending).  Returns why not, or None when the reply may go."""
    now = now or clock.process_now()
    seconds = vacation.seconds if vacation.seconds is not None else vacation.days * 86400
    period = dt.timedelta(seconds=seconds)
    sender = sender.lower()
    row = s.scalars(
        select(VacationReply).where(
            VacationReply.user == user, VacationReply.sender == sender, VacationReply.handle == vacation.handle
        )
    ).first()
    if row is not None and row.sent > now - period:
        return f"already answered <{sender}> within {period}"
    if not may_send(s, user, sends_per_hour, now):
        return f"the hourly sending limit of {sends_per_hour} is reached"
    if row is None:
        s.add(VacationReply(user=user, sender=sender, handle=vacation.handle, sent=now))
    else:
        row.sent = now
    record_send(s, user, "vacation", now)
    try:
        s.flush()
    except IntegrityError:  # another delivery claimed it at the same moment (PostgreSQL)
        s.rollback()
        return f"already answered <{sender}>"
    return None


def may_send(s: Session, user: str, per_hour: int, now: dt.datetime) -> bool:
    """Has `user`'s filter sent fewer than `per_hour` messages in the last hour?"""
    s.execute(delete(SieveSend).where(SieveSend.user == user, SieveSend.time < now - HOUR))
    sent = s.scalar(select(func.count()).select_from(SieveSend).where(SieveSend.user == user)) or 0
    return sent < per_hour


def record_send(s: Session, user: str, kind: str, now: dt.datetime) -> None:
    s.add(SieveSend(user=user, time=now, kind=kind))


def compose(
    message: Message, vacation: Vacation, *, user: str, sender: str, hostname: str, now: float | None = None
) -> bytes:
    """The reply, as it goes to the MTA."""
    subjects = message.header("Subject")
    subject = vacation.subject or f"Auto: {subjects[0] if subjects else ''}".rstrip()
    from_ = vacation.from_ or user
    msgid = message.header("Message-ID")
    refs = " ".join(message.header("References") + msgid[:1]).strip()
    fields = [
        ("From", from_),
        ("To", sender),
        ("Subject", Header(subject, "utf-8").encode() if not subject.isascii() else subject),
        ("Date", email.utils.formatdate(now, localtime=False, usegmt=True)),
        ("Message-ID", email.utils.make_msgid(domain=hostname)),
        ("Auto-Submitted", "auto-replied (vacation)"),
        ("Precedence", "bulk"),
        ("MIME-Version", "1.0"),
    ]
    if msgid:
        fields.append(("In-Reply-To", msgid[0]))
    if refs:
        fields.append(("References", refs[:900]))
    if vacation.mime:
        # :mime: the reason is a MIME entity of its own (RFC 5230 4.8), header and all.
        body = vacation.reason.replace("\r\n", "\n")
        head = "".join(f"{k}: {v}\n" for k, v in fields)
        return (head + body).encode("utf-8")
    fields += [("Content-Type", "text/plain; charset=utf-8"), ("Content-Transfer-Encoding", "8bit")]
    head = "".join(f"{k}: {v}\n" for k, v in fields)
    text = vacation.reason.replace("\r\n", "\n")
    return (head + "\n" + text + ("" if text.endswith("\n") else "\n")).encode("utf-8")
