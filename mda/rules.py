"""What happens to one message for one user: the spam verdict, the user's Sieve script, then the stores.

    1. Spam?  Our content filter's verdict (common/verdict.py; only the MTA
       writes it) makes the Junk folder the message's default place.
    2. The user's active Sieve script (mda/sieve.py), if any, decides:
       keep (the default place), fileinto folders, redirect, reject/ereject,
       vacation, discard.  A script that cannot be parsed or fails keeps the
       message (to the default place) and the error is reported: a `filtered`
       event in the trace, and once per broken script a notice in the user's
       inbox.
    3. reject/ereject: the LMTP reply for this recipient is 550 5.7.1 with the
       script's text (RFC 5429); nothing is stored, and the MDA sends no
       message of its own.  The MTA said 250 long before, so that refusal
       becomes the queue manager's bounce to the envelope sender: it is given
       only when the sender is known to be real (a local address, or SPF or
       DKIM passed for its domain at our MTA, common/verdict.py).  For any
       other sender the bounce could go to a forged address (backscatter):
       the message is dropped instead, and the trace says so.
    4. redirects go to the MTA before anything is stored (mda/outbound.py),
       so a refusal by the MTA defers the recipient (451) instead of losing
       the copy: a retry sends again, and the MTA's resubmission check absorbs
       the repeat (the redirected message is the same bytes every time).  A
       redirect is not made, and the message kept instead, when it would loop
       (the target already has a Delivered-To in the header), when the message
       is spam (we do not pass spam on), or when the user's filter has sent
       its hourly share (`[msa] max_messages_per_hour`, as for submissions).
    5. the stores: each folder once (Maildir++ `.Folder` or an mbox beside the
       inbox, mda/folders.py), created and subscribed on first use; a folder
       name that cannot be a folder (`../..`) is the inbox instead.
    6. vacation, last, and only after the stores (mda/vacation.py).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common import message, verdict
from common import reply as R
from common.address import domain_of
from common.db import Database
from common.events import EventName, Hop
from common.log import new_trace_id
from common.models import add_event
from common.reply import SMTPError
from common.users import active_sieve, sieve_dir
from mda import folders, maildir, mbox, sieve, vacation
from mda.outbound import Outbound

log = logging.getLogger("mda")

NOTICE_MARK = ".error-notified"


@dataclass(frozen=True)
class Box:
    """The user's mailbox as the rules see it."""

    user: str
    store: str  # maildir | mbox
    path: Path  # the inbox (a Maildir, or an mbox file)
    quota: int
    mailbox: str  # the users table's name for it, relative to the mail root


@dataclass(frozen=True)
class RulesPolicy:
    hostname: str
    mail_root: Path
    lock_timeout: float
    sieve_max_size: int
    sends_per_hour: int
    local_domains: tuple[str, ...] = ()  # lower-case


@dataclass(frozen=True)
class AutoReply:
    """A vacation reply to send: for `user`'s delivery, to `to`."""

    user: str
    to: str
    content: bytes


# store(box, folder path or None for the inbox, content, name/id, flags) -> path stored at
Store = Callable[[Box, Path | None, bytes, str, frozenset[str]], str]


class Rules:
    def __init__(self, policy: RulesPolicy, db: Database, outbound: Outbound | None) -> None:
        self.policy = policy
        self.db = db
        self.outbound = outbound

    def deliver(
        self, trace: str, sender: str, rcpt: str, box: Box, body: bytes, content: bytes, store: Store,
        replies: list[AutoReply] | None = None,
    ) -> str:
        """Deliver `content` (the message as stored: Return-Path and Delivered-To added to
        `body`) for `rcpt`; returns the first path stored at ("" when nothing was stored).
        Raises SMTPError with this recipient's reply when it is refused or deferred.
        A vacation reply to send is added to `replies`: the caller sends it on its event
        loop after the delivery, so no delivery thread waits for it."""
        spam = verdict.is_spam(body)
        default = folders.JUNK if spam else folders.INBOX
        message = sieve.Message(body)
        result = self._run_script(trace, box, message, sieve.Envelope(sender, rcpt))
        if result.reject is not None:
            text = " ".join(result.reject.split())[:400] or R.SIEVE_REJECT.text
            kind = "ereject" if result.ereject else "reject"
            if not self._may_bounce_to(sender, body):
                self._note(trace, rcpt, f"{kind}: {text}; dropped, not refused: the sender <{sender}> is not "
                                        "verified, and a bounce to a forged sender would be backscatter")
                return ""
            self._note(trace, rcpt, f"{kind}: {text}")
            raise SMTPError(R.SIEVE_REJECT.with_text(text))
        keep = result.keep
        for target in result.redirects:
            if not self._redirect(trace, sender, rcpt, box, body, target, spam=spam):
                keep = True  # not sent on: kept, never lost
        places: dict[str, frozenset[str]] = {}
        if keep:
            places[default] = result.keep_flags
        for f in result.fileinto:
            places.setdefault(f.folder, f.flags)
        stored = ""
        for name, flags in places.items():
            path = self._store_in(trace, box, name, content, flags, store)
            stored = stored or path
        if result.vacation is not None and not spam:
            reply = self._vacation(trace, sender, rcpt, box, message, result.vacation)
            if reply is not None and replies is not None:
                replies.append(reply)
        if not places and not result.redirects:
            self._note(trace, rcpt, "discarded by the user's filter")
        return stored

    def _may_bounce_to(self, sender: str, body: bytes) -> bool:
        """Can a refusal become a bounce to `sender` without risk of backscatter?"""
        if not sender:
            return True  # nobody gets a bounce of a bounce: the refusal is only recorded
        if domain_of(sender) in self.policy.local_domains:
            return True  # the bounce stays here
        return verdict.sender_verified(body, sender, self.policy.hostname)

    # -- the script ------------------------------------------------------------------

    def _run_script(self, trace: str, box: Box, message: sieve.Message, env: sieve.Envelope) -> sieve.Result:
        path = active_sieve(self.policy.mail_root, box.mailbox)
        try:
            script = sieve.load(path, max_size=self.policy.sieve_max_size)
        except (sieve.ScriptError, OSError) as exc:
            self._script_failed(trace, box, env.recipient, str(exc), _file_digest(path))
            return sieve.Result()
        if script is None:
            return sieve.Result()
        result = script.run(message, env)
        if result.error:
            self._script_failed(trace, box, env.recipient, result.error, script.digest)
        return result

    def _script_failed(self, trace: str, box: Box, rcpt: str, error: str, digest: str) -> None:
        log.warning("to=<%s>: Sieve script failed, delivering to the default folder: %s", rcpt, error)
        self._note(trace, rcpt, f"Sieve script failed, kept: {error}")
        mark = sieve_dir(self.policy.mail_root, box.mailbox) / NOTICE_MARK
        key = f"{digest} {error}"[:500]
        try:
            if mark.read_text() == key:
                return  # this script's error was reported already
        except OSError:
            pass
        notice = _notice(self.policy.hostname, box.user, error)
        name = maildir.unique_name(new_trace_id(), box.user, self.policy.hostname)
        try:
            _store_notice(box, notice, name, self.policy.lock_timeout)
            mark.parent.mkdir(parents=True, exist_ok=True)
            mark.write_text(key)
        except (OSError, SMTPError) as exc:
            log.warning("could not put the Sieve error notice in %s's inbox: %s", box.user, exc)

    # -- the stores --------------------------------------------------------------------

    def _store_in(self, trace: str, box: Box, name: str, content: bytes, flags: frozenset[str], store: Store) -> str:
        folder: Path | None = None
        if not folders.is_inbox(name):
            try:
                folder = folders.path(box.path, box.store, name)
            except folders.BadFolder as exc:
                log.warning("to=<%s>: fileinto %r refused (%s): kept in the inbox", box.user, name, exc)
                self._note(trace, box.user, f"fileinto {name!r} refused, kept in the inbox: {exc}")
                folder = None
        path = store(box, folder, _with_flags(content, flags) if box.store == "mbox" else content, name, flags)
        if folder is not None:
            try:
                folders.subscribe(box.path, box.store, name)
            except OSError as exc:
                log.warning("could not subscribe %s to %s: %s", box.user, name, exc)
        return path

    # -- sending -----------------------------------------------------------------------

    def _redirect(self, trace: str, sender: str, rcpt: str, box: Box, body: bytes, target: str, *, spam: bool) -> bool:
        """Hand the redirect to the MTA; False when it was not made (the message is then kept)."""
        why = ""
        if spam:
            why = "the message is spam"
        elif self.outbound is None:
            why = "no MTA to send through"
        elif delivered_to(body, target) or target.lower() in (rcpt.lower(), box.user.lower()):
            why = "it would loop (the target already had it)"
        elif not self._claim_send(box.user, "redirect"):
            why = f"the hourly sending limit of {self.policy.sends_per_hour} is reached"
        if why:
            log.info("to=<%s>: not redirected to <%s>: %s; kept", rcpt, target, why)
            self._note(trace, rcpt, f"redirect to <{target}> not made ({why}); kept")
            return False
        assert self.outbound is not None
        # Like Postfix's local(8) forwarding: Delivered-To names us, so a loop ends at the next pass.
        content = f"Delivered-To: {box.user}\n".encode() + body
        reply = self.outbound.send(sender, target, content, redirected_by=box.user)
        if reply.code == 250:
            log.info("to=<%s>: redirected to <%s>", rcpt, target)
            self._note(trace, rcpt, f"redirected to <{target}>: {reply}")
            return True
        if reply.code >= 500:
            log.warning("to=<%s>: the MTA refused the redirect to <%s>: %s; kept", rcpt, target, reply)
            self._note(trace, rcpt, f"redirect to <{target}> refused by the MTA ({reply}); kept")
            return False
        # The MTA is restarting or busy: the whole delivery waits and comes again.
        raise SMTPError(R.LOCAL_ERROR.with_text(f"Could not pass the redirect on yet: {reply.text}"))

    def _claim_send(self, user: str, kind: str) -> bool:
        from common import clock

        now = clock.process_now()
        with self.db.write() as s:
            if not vacation.may_send(s, user, self.policy.sends_per_hour, now):
                s.commit()
                return False
            vacation.record_send(s, user, kind, now)
            s.commit()
        return True

    def _vacation(
        self, trace: str, sender: str, rcpt: str, box: Box, message: sieve.Message, action: sieve.Vacation
    ) -> AutoReply | None:
        mine = [rcpt, box.user, *action.addresses]
        why = vacation.why_not(message, sender, mine)
        if why is None and self.outbound is None:
            why = "no MTA to send through"
        if why is None:
            with self.db.write() as s:
                why = vacation.remember(
                    s, user=box.user, sender=sender, vacation=action, sends_per_hour=self.policy.sends_per_hour
                )
                if why is None:
                    s.commit()
        if why is not None:
            log.info("to=<%s>: no vacation reply to <%s>: %s", rcpt, sender, why)
            return None
        text = vacation.compose(message, action, user=box.user, sender=sender, hostname=self.policy.hostname)
        self._note(trace, rcpt, f"vacation reply to <{sender}>")
        return AutoReply(rcpt, sender, text)

    async def send_replies(self, replies: list[AutoReply]) -> None:
        """Send vacation replies (on the event loop, after the delivery).  One that the MTA does
        not take is not tried again: a vacation reply is at most once, never twice."""
        assert self.outbound is not None
        for r in replies:
            answer = await self.outbound.send_async("", r.to, r.content)
            if answer.code == 250:
                log.info("to=<%s>: vacation reply to <%s>: %s", r.user, r.to, answer)
            else:
                log.warning("to=<%s>: the vacation reply to <%s> was not taken: %s", r.user, r.to, answer)

    def _note(self, trace: str, rcpt: str, detail: str) -> None:
        """A `filtered` event in the trace (not fsync'd: no promise rests on it)."""
        try:
            with self.db.write_relaxed() as s:
                add_event(s, trace, Hop.MDA, EventName.FILTERED, recipient=rcpt, detail=detail[:1000])
                s.commit()
        except Exception:
            log.exception("could not record the filter event")


def _file_digest(path: Path) -> str:
    try:
        st = path.stat()
    except OSError:
        return ""
    return f"{st.st_ino}-{st.st_size}-{st.st_mtime_ns}"


def _with_flags(content: bytes, flags: frozenset[str]) -> bytes:
    """mbox keeps flags in Status and X-Status fields (as Dovecot and mutt read them)."""
    if not flags:
        return content
    status = ("R" if "\\Seen" in flags else "") + "O"
    xstatus = "".join(c for f, c in (("\\Answered", "A"), ("\\Flagged", "F"), ("\\Draft", "T"),
                                     ("\\Deleted", "D")) if f in flags)
    extra = f"Status: {status}\n" + (f"X-Status: {xstatus}\n" if xstatus else "")
    return _after_trace_fields(content, extra.encode())


def _after_trace_fields(content: bytes, extra: bytes) -> bytes:
    header, blank, body = message.split(content)
    return header + extra + blank + body if blank else content + b"\n" + extra


def delivered_to(body: bytes, address: str) -> bool:
    """Does the header already say Delivered-To: `address`?  (Then delivering or redirecting
    to it again is a loop.)"""
    return address.lower() in (v.lower() for v in message.values(body, "Delivered-To"))


def _notice(hostname: str, user: str, error: str) -> bytes:
    import email.utils

    text = (
        "Your mail filter (the active Sieve script) could not be used:\n\n"
        f"    {error}\n\n"
        "Until it is fixed, your mail is delivered as if there were no filter:\n"
        "to your inbox (spam to Junk).  Nothing was lost.  Edit the script in your\n"
        "mail client's filter settings (ManageSieve).  You get this notice once\n"
        "for each version of the script.\n"
    )
    return (
        f"Return-Path: <>\nFrom: Mail Delivery System <MAILER-DAEMON@{hostname}>\nTo: <{user}>\n"
        f"Subject: Your mail filter has an error\nDate: {email.utils.formatdate(usegmt=True)}\n"
        f"Message-ID: {email.utils.make_msgid(domain=hostname)}\nAuto-Submitted: auto-generated\n"
        f"Content-Type: text/plain; charset=utf-8\n\n{text}"
    ).encode()


def _store_notice(box: Box, content: bytes, name: str, lock_timeout: float) -> str:
    if box.store == "mbox":
        delivery_id = hashlib.sha256(name.encode()).hexdigest()[:32]
        mbox.deliver(box.path, content, "MAILER-DAEMON", delivery_id=delivery_id, lock_timeout=lock_timeout)
        return str(box.path)
    path, _ = maildir.deliver(box.path, content, name)
    return str(path)

