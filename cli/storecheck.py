"""`mailroom check`: do the database and the mailboxes agree?

The database says, for every local delivery, "trace id T was stored for
recipient R" (an `mda delivered` event, with the file).  This command looks for
each such message in R's mailbox today and compares it with what was queued:
the message's digest (`messages.digest`: sha256 of what the sender wrote, its
Received fields left out, mta/resubmit.py) against the stored copy's, once the
fields our own hops put on top (Return-Path, Delivered-To, Received,
Authentication-Results, a DKIM or ARC signature, the filter's verdict) are set
aside, and the line ends the MDA changed (CRLF -> LF) are put back.

- A Maildir message is found by its name (the MDA's name is derived from the
  trace id and recipient), in new/ or, moved by a reader, in cur/ with flags;
- an mbox message by the trace id in our Received field and its Delivered-To;
- queued recipients must still have their message's body in the queue.

Run after `mailroom restore` it proves the restore whole; on a live system a
message the user deleted is reported too (the database keeps the history), so
read the list, not only the count.  The exit status is 1 when anything is
missing or different.  It only reads.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from sqlalchemy import select

from cli.show import clean
from common.address import lookup_key
from common.config import Config
from common.db import Database
from common.events import EventName, Hop
from common.message import fields as header_fields
from common.message import header_of, split
from common.models import ACTIVE, QUEUED, Event, Message, Recipient, User
from mta.resubmit import digest

# Fields our hops add on top of a message (MTA: Received, results, signatures, the
# filter's verdict; MDA: Return-Path, Delivered-To).
OURS = {"return-path", "delivered-to", "received", "authentication-results", "arc-seal",
        "arc-message-signature", "arc-authentication-results", "dkim-signature", "x-spam-flag",
        "x-spam-status", "x-mailroom-filter"}
# What Dovecot writes into an mbox message's header when it keeps its flags there.
DOVECOT_MBOX = {"status", "x-status", "x-keywords", "x-uid", "x-imapbase", "x-imap", "content-length"}
_OUR_RECEIVED = re.compile(rb"(?im)^received:[^\n]*(?:\n[ \t][^\n]*)*?\(Mailroom\)[^\n]*?\bid ([0-9A-F]{18})\b")
_DELIVERED_TO = re.compile(rb"(?im)^delivered-to:[ \t]*([^\n]*)")


@dataclass(frozen=True)
class Finding:
    state: str  # missing, different, queued-without-body, unchecked
    trace: str
    recipient: str
    where: str
    detail: str = ""


def run(args: argparse.Namespace, cfg: Config, db: Database) -> int:
    checked, findings = check(cfg, db)
    bad = [f for f in findings if f.state != "unchecked"]
    if args.json:
        print(json.dumps({"checked": checked, "ok": not bad, "findings": [asdict(f) for f in findings]}, indent=2))
        return 1 if bad else 0
    counts: dict[str, int] = defaultdict(int)
    for f in findings:
        counts[f.state] += 1
    for f in findings:
        print(f"{f.state:10} {clean(f.trace)}  {clean(f.recipient)}  {clean(f.where)}"
              + (f"  ({clean(f.detail)})" if f.detail else ""))
    parts = [f"{checked - len([f for f in findings if f.state in ('missing', 'different', 'unchecked')])} ok"]
    parts += [f"{n} {state}" for state, n in sorted(counts.items())]
    print(f"checked {checked} deliveries: {', '.join(parts)}")
    print("the database and the mailboxes agree" if not bad else "the database and the mailboxes disagree (above)")
    return 1 if bad else 0


def check(cfg: Config, db: Database) -> tuple[int, list[Finding]]:
    """(deliveries checked, what does not agree)."""
    findings: list[Finding] = []
    with db.read() as s:
        users = {u.address: (u.store, u.mailbox) for u in s.scalars(select(User))}
        messages = {m: (d, bt) for m, d, bt in s.execute(select(Message.id, Message.digest, Message.body_type))}
        seen: set[tuple[str, str]] = set()
        deliveries: list[tuple[str, str, str]] = []
        for trace, rcpt, path in s.execute(
            select(Event.trace_id, Event.recipient, Event.path)
            .where(Event.hop == Hop.MDA, Event.event == EventName.DELIVERED).order_by(Event.id)
        ):
            if (trace, rcpt) not in seen:
                seen.add((trace, rcpt))
                deliveries.append((trace, rcpt, path))
        unbodied = s.execute(
            select(Recipient.message_id, Recipient.address).join(Message)
            .where(Recipient.state.in_((QUEUED, ACTIVE)), Message.body.is_(None))
        ).all()
    for trace, rcpt in unbodied:
        findings.append(Finding("queued-without-body", trace, rcpt, "the queue", "its body is gone"))
    boxes = _Mailboxes(cfg)
    for trace, rcpt, path in deliveries:
        user = users.get(lookup_key(rcpt, cfg.mda.recipient_delimiter))
        if user is None:
            findings.append(Finding("unchecked", trace, rcpt, path, "no such user any more"))
            continue
        store, mailbox = user
        box = cfg.mail_root / mailbox
        stored = boxes.maildir(box, Path(path).name) if store == "maildir" else boxes.mbox(box, trace, rcpt)
        shown = mailbox + (f"/{Path(path).name}" if store == "maildir" else "")
        if stored is None:
            findings.append(Finding("missing", trace, rcpt, shown))
            continue
        want, body_type = messages.get(trace, ("", ""))
        if want and not same_message(stored, want, body_type, mbox=store == "mbox",
                                     quarantine=cfg.mailauth.quarantine_header):
            findings.append(Finding("different", trace, rcpt, shown, "not the message that was queued"))
    return len(deliveries), findings


class _Mailboxes:
    """Each mailbox read once: a Maildir's names, an mbox's messages by (trace id, recipient)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.names: dict[Path, dict[str, Path]] = {}
        self.mboxes: dict[Path, dict[tuple[str, str], bytes]] = {}

    def maildir(self, box: Path, name: str) -> bytes | None:
        if box not in self.names:
            found: dict[str, Path] = {}
            for sub in ("new", "cur"):
                try:
                    for entry in os.scandir(box / sub):
                        found.setdefault(entry.name.split(":", 1)[0], Path(entry.path))
                except FileNotFoundError:
                    continue
            self.names[box] = found
        path = self.names[box].get(name.split(":", 1)[0])
        try:
            return path.read_bytes() if path is not None else None
        except FileNotFoundError:
            return None

    def mbox(self, path: Path, trace: str, rcpt: str) -> bytes | None:
        if path not in self.mboxes:
            self.mboxes[path] = _index_mbox(path)
        return self.mboxes[path].get((trace, rcpt.lower()))


def _index_mbox(path: Path) -> dict[tuple[str, str], bytes]:
    """mboxrd messages by (trace id of our Received field, Delivered-To), unquoted."""
    from mda.mbox import unquote

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}
    out: dict[tuple[str, str], bytes] = {}
    starts = [m.start() for m in re.finditer(rb"(?m)^From ", data)]
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else len(data)
        entry = data[start:end]
        content = entry[entry.index(b"\n") + 1:]
        if content.endswith(b"\n\n"):
            content = content[:-1]  # the blank line that ends an mbox entry
        head = header_of(content)
        trace = _OUR_RECEIVED.search(head)
        rcpt = _DELIVERED_TO.search(head)
        if trace and rcpt:
            key = (trace.group(1).decode(), rcpt.group(1).strip().decode("utf-8", "replace").lower())
            out.setdefault(key, unquote(content))
    return out


def same_message(stored: bytes, want: str, body_type: str, *, mbox: bool, quarantine: str = "") -> bool:
    """Is `stored` (as the MDA wrote it: LF line ends, our fields on top) the message whose digest is `want`?"""
    if body_type == "BINARYMIME":  # only its header was turned to LF
        head, blank, rest = split(stored)
        crlf = head.replace(b"\n", b"\r\n") + b"\r\n" + rest if blank else stored
    else:
        crlf = stored.replace(b"\n", b"\r\n")
    _, blank, rest = split(crlf)
    body = blank + rest  # the empty line that ends the header, and the body
    fields = header_fields(crlf)
    drop = {"x-mailroom-quarantine", quarantine.lower()} | OURS
    if mbox:
        fields = [f for f in fields if f.name.lower() not in DOVECOT_MBOX]
    # The fields we added are on top; the sender's own may carry the same names further
    # down (a DKIM-Signature, Received), so try each cut of the top block.
    for cut in range(len(fields) + 1):
        rest = b"".join(f.raw for f in fields[cut:])
        if digest(rest + body) == want:
            return True
        if cut < len(fields) and fields[cut].name.lower() not in drop:
            break
    return False
