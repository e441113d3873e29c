"""Delivery status notifications (RFC 3464): bounces and delay warnings.

A DSN is an ordinary message sent with the null sender `<>` (so it can never
cause another bounce, RFC 5321 4.5.5), made of three parts in a
multipart/report (RFC 6522): a note for people, a machine-readable
message/delivery-status part, and the original message's header.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import re
import secrets
from dataclasses import dataclass

from common.reply import Reply

_HEADER_END = re.compile(rb"\r?\n\r?\n")


@dataclass(frozen=True)
class Failure:
    recipient: str
    original: str
    reply: Reply
    remote_mta: str = ""  # the host that answered, when it was not us


def compose(
    *,
    hostname: str,
    sender: str,
    trace: str,
    original: bytes,
    failures: list[Failure],
    arrival: dt.datetime,
    now: dt.datetime,
    delayed: bool = False,
) -> bytes:
    """The DSN for `failures`, addressed to `sender` (never called for <>)."""
    boundary = f"{trace}.{secrets.token_hex(6)}/{hostname}"
    action = "delayed" if delayed else "failed"
    if delayed:
        subject = "Delayed Mail (still being retried)"
        intro = (
            "This is the mail system at host {host}.\n\n"
            "Your message could not be delivered yet. It is still in the queue\n"
            "and delivery will be tried again; you do not need to resend it.\n"
        )
    else:
        subject = "Undelivered Mail Returned to Sender"
        intro = (
            "This is the mail system at host {host}.\n\n"
            "I'm sorry to have to inform you that your message could not\n"
            "be delivered to one or more recipients.\n"
        )
    human = intro.format(host=hostname) + "\n" + "".join(
        f"<{f.recipient}>: {f.reply.code} {f.reply.status} {f.reply.text}\n" for f in failures
    )
    per_message = (
        f"Reporting-MTA: dns; {hostname}\n"
        f"X-Mailroom-Trace-ID: {trace}\n"
        f"Arrival-Date: {_date(arrival)}\n"
    )
    per_recipient = "".join(
        "\n"
        + (f"Original-Recipient: rfc822; {f.original}\n" if f.original and f.original != f.recipient else "")
        + f"Final-Recipient: rfc822; {f.recipient}\n"
        f"Action: {action}\n"
        f"Status: {f.reply.status}\n"
        + (f"Remote-MTA: dns; {f.remote_mta}\n" if f.remote_mta else "")
        + f"Diagnostic-Code: smtp; {f.reply.code} {f.reply.status} {_one_line(f.reply.text)}\n"
        for f in failures
    )
    m = _HEADER_END.search(original)
    headers = original[: m.start()] if m else original
    headers_text = headers.decode("utf-8", "replace").replace("\r\n", "\n")
    text = (
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>\n"
        f"To: <{sender}>\n"
        f"Subject: {subject}\n"
        f"Date: {_date(now)}\n"
        f"Message-ID: <{trace}.{secrets.token_hex(4)}.dsn@{hostname}>\n"
        "Auto-Submitted: auto-replied\n"
        "MIME-Version: 1.0\n"
        f'Content-Type: multipart/report; report-type=delivery-status;\n\tboundary="{boundary}"\n'
        "\n"
        "This is a MIME-encapsulated message.\n\n"
        f"--{boundary}\n"
        "Content-Description: Notification\n"
        "Content-Type: text/plain; charset=utf-8\n\n"
        f"{human}\n"
        f"--{boundary}\n"
        "Content-Description: Delivery report\n"
        "Content-Type: message/delivery-status\n\n"
        f"{per_message}{per_recipient}\n"
        f"--{boundary}\n"
        "Content-Description: Undelivered Message Headers\n"
        "Content-Type: text/rfc822-headers\n\n"
        f"{headers_text}\n\n"
        f"--{boundary}--\n"
    )
    return text.replace("\n", "\r\n").encode("utf-8")


def _date(when: dt.datetime) -> str:
    return email.utils.format_datetime(when.replace(tzinfo=dt.UTC))


def _one_line(text: str) -> str:
    return " ".join(text.split())
