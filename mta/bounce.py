"""Delivery status notifications (RFC 3464): bounces, delay warnings, success notices.

A DSN is an ordinary message sent with the null sender `<>` (so it can never
cause another bounce, RFC 5321 4.5.5), made of three parts in a
multipart/report (RFC 6522): a note for people, a machine-readable
message/delivery-status part, and the original message's header (or the
whole message, when the sender asked for it with RET=FULL, RFC 3461 4.3).
The sender's ENVID and each recipient's ORCPT come back in the report as
Original-Envelope-Id and Original-Recipient (RFC 3464 2.2.1, 2.3.1).
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
    orcpt: str = ""  # RFC 3461 ORCPT as given at RCPT: "addr-type;address"
    action: str = ""  # RFC 3464 2.3.3; "" = failed (or delayed, for a delay warning)


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
    success: bool = False,
    envid: str = "",
    ret: str = "",
) -> bytes:
    """The DSN for `failures`, addressed to `sender` (never called for <>).

    With `success` it is a success notice: each entry's action says
    "delivered" (we were the last hop) or "relayed" (to a hop without DSN).
    """
    boundary = f"{trace}.{secrets.token_hex(6)}/{hostname}"
    action = "delayed" if delayed else "failed"
    if success:
        subject = "Successful Mail Delivery Report"
        intro = (
            "This is the mail system at host {host}.\n\n"
            "Your message was successfully delivered to the destination(s)\n"
            "listed below. If the message was delivered to a mailbox you will\n"
            "receive no further notifications. Otherwise you may still receive\n"
            "notifications of mail delivery errors from other systems.\n"
        )
    elif delayed:
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
        (f"Original-Envelope-Id: {_one_line(envid)}\n" if envid else "")
        + f"Reporting-MTA: dns; {hostname}\n"
        f"X-Mailroom-Trace-ID: {trace}\n"
        f"Arrival-Date: {_date(arrival)}\n"
    )
    per_recipient = "".join(
        "\n"
        + _original_recipient(f)
        + f"Final-Recipient: rfc822; {f.recipient}\n"
        f"Action: {f.action or action}\n"
        f"Status: {f.reply.status}\n"
        + (f"Remote-MTA: dns; {f.remote_mta}\n" if f.remote_mta else "")
        + f"Diagnostic-Code: smtp; {f.reply.code} {f.reply.status} {_one_line(f.reply.text)}\n"
        for f in failures
    )
    m = _HEADER_END.search(original)
    if ret == "FULL":
        returned = original.decode("utf-8", "replace").replace("\r\n", "\n")
        returned_part = "Content-Description: Undelivered Message\nContent-Type: message/rfc822\n\n"
        if success:
            returned_part = returned_part.replace("Undelivered", "Delivered")
    else:
        headers = original[: m.start()] if m else original
        returned = headers.decode("utf-8", "replace").replace("\r\n", "\n") + "\n"
        returned_part = "Content-Description: Undelivered Message Headers\nContent-Type: text/rfc822-headers\n\n"
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
        f"{returned_part}"
        f"{returned}\n"
        f"--{boundary}--\n"
    )
    return text.replace("\n", "\r\n").encode("utf-8")


def _original_recipient(f: Failure) -> str:
    if f.orcpt:  # RFC 3464 2.3.1: exactly as the sender gave it in ORCPT
        kind, _, address = f.orcpt.partition(";")
        return f"Original-Recipient: {kind}; {_one_line(address)}\n"
    if f.original and f.original != f.recipient:
        return f"Original-Recipient: rfc822; {f.original}\n"
    return ""


def _date(when: dt.datetime) -> str:
    return email.utils.format_datetime(when.replace(tzinfo=dt.UTC))


def _one_line(text: str) -> str:
    return " ".join(text.split())
