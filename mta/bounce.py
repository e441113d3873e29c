"""Delivery status notifications (RFC 3464): bounces, delay warnings, success notices.

A DSN is an ordinary message sent with the null sender `<>` (so it can never
cause another bounce, RFC 5321 4.5.5), made of three parts in a
multipart/report (RFC 6522): a note for people, a machine-readable
message/delivery-status part, and the original message's header (or the
whole message, when the sender asked for it with RET=FULL, RFC 3461 4.3).
The sender's ENVID and each recipient's ORCPT come back in the report as
Original-Envelope-Id and Original-Recipient (RFC 3464 2.2.1, 2.3.1).

What comes back is decided by `returned` (see there): the whole message, its
header, or, for a message sent with REQUIRETLS, only its Message-ID.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import re
import secrets
from dataclasses import dataclass
from enum import StrEnum

from common import message
from common.reply import Reply

_LINE_END = re.compile(rb"\r?\n")


class Returned(StrEnum):
    """How much of the original message a notice carries (its third part)."""

    FULL = "full"  # message/rfc822: every octet as it was queued
    HEADERS = "headers"  # text/rfc822-headers
    REDACTED = "redacted"  # text/rfc822-headers holding the Message-ID alone


def returned(*, ret: str, body_type: str = "7BIT", requiretls: bool = False, local: bool = False) -> Returned:
    """What a notice about a message sent with RET=`ret`, BODY=`body_type` and
    (perhaps) REQUIRETLS returns of it; `local`: the notice goes to a sender in
    our own domains, so its one hop is our MDA, over LMTP on this host, which
    takes BINARYMIME.  (Of a remote sender's next hop we know nothing when the
    notice is queued.)

    REQUIRETLS (RFC 8689 5): a notice must not leak what the sender asked to
    travel only over TLS.  RET=FULL is disregarded, and a notice that carries
    the original header must itself go with REQUIRETLS, unless the header is
    redacted.  To a local sender the header comes back (the notice is queued
    with REQUIRETLS and never leaves this host).  The way back to a remote
    sender need not offer REQUIRETLS, and a notice with the null sender should
    not be lost for that (RFC 8689 5), so there we redact: the notice carries
    the Message-ID alone, goes by any path, and no Subject, From or To crosses
    a hop the sender did not trust.

    BINARYMIME (RFC 3030 3): its octets can only travel as BINARYMIME, with
    BDAT, in a notice itself sent BODY=BINARYMIME; decoding them as text
    would return something else than was sent.  So the whole message comes back
    byte for byte only where the notice is sure to be carried that way (to a
    local sender), and otherwise its header only (RFC 3461 4.3 lets a notice
    return less than asked), and the notice says so.
    """
    if requiretls:
        return Returned.HEADERS if local else Returned.REDACTED
    if ret != "FULL":
        return Returned.HEADERS
    if body_type == "BINARYMIME" and not local:
        return Returned.HEADERS
    return Returned.FULL


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
    body_type: str = "7BIT",
    requiretls: bool = False,
    local: bool = False,
) -> bytes:
    """The DSN for `failures`, addressed to `sender` (never called for <>).

    With `success` it is a success notice: each entry's action says
    "delivered" (we were the last hop), "relayed" (to a hop without DSN) or
    "expanded" (an alias handed it on to several recipients).  `body_type`,
    `requiretls` and `local` decide, with `ret`, what of the original
    comes back (`returned`); when it is the whole of a binary message the
    notice is binary too, and must be queued BODY=BINARYMIME.
    """
    form = returned(ret=ret, body_type=body_type, requiretls=requiretls, local=local)
    boundary = f"{trace}.{secrets.token_hex(6)}/{hostname}"
    while form is Returned.FULL and boundary.encode() in original:  # a binary body could hold anything
        boundary = f"{trace}.{secrets.token_hex(6)}/{hostname}"
    action = "delayed" if delayed else "failed"
    if success and all(f.action == "expanded" for f in failures):
        subject = "Successful Mail Delivery Report"
        intro = (
            "This is the mail system at host {host}.\n\n"
            "Your message was delivered to the address(es) listed below, each of\n"
            "which hands it on to several recipients (an alias or a list). You\n"
            "will not be told of the delivery to each of them, only of failures.\n"
        )
    elif success:
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
    ) + _why_less(form, ret=ret, requiretls=requiretls)
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
    binary = form is Returned.FULL and body_type == "BINARYMIME"
    if form is Returned.FULL:
        # As queued, not decoded and re-encoded: the sender gets back what was sent
        # (a text message with its line ends made CRLF, a binary one untouched).
        returned_bytes = original if binary else _LINE_END.sub(b"\r\n", original)
        returned_part = (
            "Content-Description: Undelivered Message\nContent-Type: message/rfc822\n"
            + ("Content-Transfer-Encoding: binary\n" if binary else "")
            + "\n"
        )
        if success:
            returned_part = returned_part.replace("Undelivered", "Delivered")
    else:
        header = message.header_of(original)
        if form is Returned.REDACTED:  # the Message-ID field alone, folded lines included (RFC 5322 3.6.4)
            ids = [f.raw for f in message.fields(header) if f.name.lower() == "message-id"]
            header = ids[0] if ids else b""
        text = header.decode("utf-8", "replace").replace("\r\n", "\n")
        returned_bytes = _crlf(text if text.endswith("\n") else text + "\n")
        returned_part = "Content-Description: Undelivered Message Headers\nContent-Type: text/rfc822-headers\n\n"
    head = (
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>\n"
        f"To: <{sender}>\n"
        f"Subject: {subject}\n"
        f"Date: {_date(now)}\n"
        f"Message-ID: <{trace}.{secrets.token_hex(4)}.dsn@{hostname}>\n"
        "Auto-Submitted: auto-replied\n"
        "MIME-Version: 1.0\n"
        f'Content-Type: multipart/report; report-type=delivery-status;\n\tboundary="{boundary}"\n'
        + ("Content-Transfer-Encoding: binary\n" if binary else "")
        + "\n"
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
    )
    return _crlf(head) + returned_bytes + _crlf(f"\n--{boundary}--\n")


def _why_less(form: Returned, *, ret: str, requiretls: bool) -> str:
    """The note that says why the notice returns less than the sender asked for."""
    if form is Returned.REDACTED:
        return (
            "\nYour message was sent with REQUIRETLS: this report may reach you over\n"
            "a path without TLS, so it returns only the message's Message-ID.\n"
        )
    if ret == "FULL" and form is Returned.HEADERS and requiretls:
        return "\nYour message was sent with REQUIRETLS, so only its header is returned.\n"
    if ret == "FULL" and form is Returned.HEADERS:
        return (
            "\nYour message was binary (BINARYMIME) and this report cannot be sure\n"
            "to reach you by a path that carries binary mail, so only its header\n"
            "is returned.\n"
        )
    return ""


def _crlf(text: str) -> bytes:
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
