"""The MDA: an LMTP server (RFC 2033) that writes mail into Maildir and mbox stores.

One hop, socket to disk: LHLO, MAIL FROM (with the trace id the queue manager
passes as XTRACE=), RCPT TO for each recipient (looked up in the database:
unknown is 550 5.1.1), DATA, then one reply per recipient after the message
is on disk (fsync'd).  The mailbox path always comes from the users table,
never from the address, so no address can point outside the mail root.
"""

from __future__ import annotations

import errno
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from common import reply as R
from common.daemon import Context, serve_until_stopped
from common.listener import Handler, MailEnvelope, MailSession, limits_from, serve
from common.log import is_trace_id, new_trace_id, trace_id
from common.models import add_event
from common.reply import Reply, SMTPError
from common.users import find_user
from mda import maildir, mbox

log = logging.getLogger("mda")


@dataclass(frozen=True)
class Mailbox:
    user: str
    store: str  # maildir | mbox
    path: Path
    quota: int


class LMTPHandler(Handler):
    ehlo_keywords = ("XTRACE",)

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.mail_root = ctx.config.mail_root.resolve()
        self.mailboxes: dict[str, Mailbox] = {}

    def reset(self, session: MailSession) -> None:
        self.mailboxes = {}

    async def mail(self, session: MailSession, envelope: MailEnvelope, sender: str) -> Reply:
        # The LMTP listener is loopback-only (config check), so the queue
        # manager's trace id is trusted here.
        given = envelope.params.get("XTRACE", "")
        envelope.trace_id = given if is_trace_id(given) else new_trace_id()
        trace_id.set(envelope.trace_id)
        return R.SENDER_OK

    async def rcpt(self, session: MailSession, envelope: MailEnvelope, recipient: str) -> Reply:
        box = await self.ctx.db.run(self._lookup, recipient)
        if box is None:
            log.info("refused to=<%s>: user unknown", recipient)
            return R.UNKNOWN_USER
        self.mailboxes[recipient] = box
        return R.RECIPIENT_OK

    def _lookup(self, recipient: str) -> Mailbox | None:
        with self.ctx.db.read() as s:
            user = find_user(s, recipient, self.ctx.config.mda.recipient_delimiter)
            if user is None:
                return None
            path = (self.mail_root / user.mailbox).resolve()
            if not path.is_relative_to(self.mail_root):
                log.error("user %s has a mailbox outside the mail root; refusing", user.address)
                return None
            return Mailbox(user.address, user.store, path, user.quota)

    async def data(self, session: MailSession, envelope: MailEnvelope) -> list[Reply]:
        assert isinstance(envelope.content, bytes) and envelope.mail_from is not None
        body = envelope.content.replace(b"\r\n", b"\n")
        return await self.ctx.db.run(
            self._deliver_all, envelope.trace_id, envelope.mail_from, envelope.rcpt_tos, body
        )

    def _deliver_all(self, trace: str, sender: str, recipients: list[str], body: bytes) -> list[Reply]:
        trace_id.set(trace)
        results: list[tuple[str, Reply, str]] = []
        for rcpt in recipients:
            box = self.mailboxes[rcpt]
            try:
                path = self._deliver_one(trace, sender, rcpt, box, body)
                reply = Reply(250, "2.0.0", f"Ok: delivered to {box.store} ({trace})")
                log.info("delivered to=<%s> %s=%s", rcpt, box.store, path)
            except SMTPError as exc:
                path, reply = "", exc.reply
                log.info("refused to=<%s>: %s", rcpt, reply)
            results.append((rcpt, reply, path))
        with self.ctx.db.write() as s:
            for rcpt, reply, path in results:
                event = "delivered" if reply.code == 250 else "refused"
                add_event(s, trace, "mda", event, recipient=rcpt, detail=str(reply), path=path)
            s.commit()
        return [reply for _, reply, _ in results]

    def _deliver_one(self, trace: str, sender: str, rcpt: str, box: Mailbox, body: bytes) -> str:
        if _delivered_to(body, rcpt):
            raise SMTPError(R.MAIL_LOOP.with_text(f"Mail loop: already delivered to {rcpt}"))
        content = f"Return-Path: <{sender}>\nDelivered-To: {rcpt}\n".encode() + body
        try:
            if box.store == "mbox":
                mbox.deliver(box.path, content, sender, lock_timeout=self.ctx.config.mda.lock_timeout)
                return str(box.path)
            name = maildir.unique_name(trace, rcpt, self.ctx.config.mailroom.hostname)
            path, _ = maildir.deliver(box.path, content, name)
            return str(path)
        except mbox.LockTimeout as exc:
            raise SMTPError(R.MAILBOX_LOCKED) from exc
        except OSError as exc:
            log.error("cannot write %s: %s", box.path, exc)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise SMTPError(R.DISK_LOW) from exc
            raise SMTPError(R.LOCAL_ERROR) from exc


_HEADER_END = re.compile(rb"\n\n|\A\n")


def _delivered_to(body: bytes, rcpt: str) -> bool:
    """Does the header already say Delivered-To: rcpt?  (Then this is a loop.)"""
    m = _HEADER_END.search(body)
    header = body[: m.start()] if m else body
    needle = rcpt.lower().encode()
    return any(
        line[13:].strip().lower() == needle
        for line in header.split(b"\n")
        if line[:13].lower() == b"delivered-to:"
    )


async def run(ctx: Context) -> None:
    cfg = ctx.config
    # Only our own queue manager connects: no per-client cap below the total.
    limits = limits_from(cfg.smtp, max_connections_per_client=cfg.smtp.max_connections)
    server = await serve(
        cfg.mda.lmtp, lambda: LMTPHandler(ctx), hostname=cfg.mailroom.hostname,
        limits=limits, lmtp=True,
    )
    ctx.drop_privileges()
    log.info("LMTP listening on %s", cfg.mda.lmtp)
    await serve_until_stopped(ctx, [server])
