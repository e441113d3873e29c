"""A user's folders other than the inbox (Junk, and what Sieve's fileinto names), laid out as Dovecot reads them.

A folder name is what the user sees over IMAP (`Junk`, `Lists.mailroom`);
where it lives on disk is Dovecot's layout for the user's store (cli/dovecot.py
gives Dovecot the same locations):

    Maildir++  MAILDIR/.Junk, MAILDIR/.Lists.mailroom   (hierarchy separator ".")
    mbox       MBOX.folders/Junk, MBOX.folders/Lists/mailroom   (separator "/";
               the folders live beside the inbox file, in the folder Dovecot
               was told to keep them in, never among other users' mailboxes)

Names come from users (their Sieve scripts), so a name is checked before it
becomes a path: no empty part, no "." or "..", no "/" inside a Maildir++ part,
no control characters, nothing starting with "." (Dovecot's own files); the
resulting path must stay under the user's mailbox.  `INBOX` in any case is the
inbox itself.  Names outside ASCII are stored in IMAP's modified UTF-7 (RFC
3501 5.1.3), as Dovecot stores them.

A folder is created on first delivery and added to Dovecot's subscriptions
file (the mail client then shows it without the user subscribing by hand):
`MAILDIR/subscriptions` or `MBOX.folders/.subscriptions`, in Dovecot's
version 2 format (`V<TAB>2`, a blank line, then one name a line with TAB as
the hierarchy separator).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import os
from pathlib import Path

JUNK = "Junk"
INBOX = "INBOX"
MAX_NAME = 255
MAX_DEPTH = 16
_SUBSCRIPTIONS_HEADER = "V\t2\n\n"


class BadFolder(ValueError):
    """A folder name that cannot be a folder (the message goes to the inbox instead)."""


def is_inbox(name: str) -> bool:
    return name.upper() == INBOX


def separator(store: str) -> str:
    return "/" if store == "mbox" else "."


def parts(name: str, store: str) -> list[str]:
    """The hierarchy of `name` (["Lists", "mailroom"]); BadFolder when it cannot be a folder."""
    if not name or len(name) > MAX_NAME:
        raise BadFolder(f"folder name of {len(name)} characters")
    if any(ord(c) < 0x20 or c == "\x7f" for c in name):
        raise BadFolder("control character in folder name")
    pieces = name.split(separator(store))
    if len(pieces) > MAX_DEPTH:
        raise BadFolder("folder hierarchy too deep")
    for piece in pieces:
        if not piece or piece in (".", "..") or piece.startswith(".") or "/" in piece or "\\" in piece:
            raise BadFolder(f"folder name {name!r} is not allowed")
    if pieces[0].upper() == INBOX and len(pieces) > 1:
        raise BadFolder("folders below INBOX are not kept")
    return pieces


def path(mailbox: Path, store: str, name: str) -> Path:
    """Where folder `name` of the user whose inbox is `mailbox` lives (a Maildir or an mbox file)."""
    pieces = [encode_mutf7(p) for p in parts(name, store)]
    if store == "mbox":
        top = folders_dir(mailbox)
        target = top.joinpath(*pieces)
    else:
        top = mailbox
        target = mailbox / ("." + ".".join(pieces))
    # parts() already refused every way out; this is the second lock on the door.
    if not os.path.normpath(target).startswith(os.path.normpath(top) + os.sep):
        raise BadFolder(f"folder name {name!r} leads outside the mailbox")
    return target


def folders_dir(mbox_inbox: Path) -> Path:
    """The folder an mbox user's other folders live in (Dovecot's mail location says the same)."""
    return mbox_inbox.with_name(mbox_inbox.name + ".folders")


def subscriptions_file(mailbox: Path, store: str) -> Path:
    return folders_dir(mailbox) / ".subscriptions" if store == "mbox" else mailbox / "subscriptions"


def subscribe(mailbox: Path, store: str, name: str) -> None:
    """Add `name` to Dovecot's subscriptions for this user (once), under a lock."""
    entry = "\t".join(encode_mutf7(p) for p in parts(name, store))
    file = subscriptions_file(mailbox, store)
    file.parent.mkdir(mode=0o770, parents=True, exist_ok=True)
    fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o660)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        with os.fdopen(os.dup(fd), "r+", encoding="utf-8", errors="replace", newline="\n") as f:
            text = f.read()
            if text and not text.startswith("V\t"):
                # Version 1 (one name a line, with the store's own separator): append in kind.
                entry = separator(store).join(entry.split("\t"))
            names = text.split("\n")[2:] if text.startswith("V\t") else text.split("\n")
            if entry in names:
                return
            if not text:
                text_added = _SUBSCRIPTIONS_HEADER + entry + "\n"
            else:
                text_added = ("" if text.endswith("\n") else "\n") + entry + "\n"
            f.write(text_added)
            f.flush()
            os.fsync(f.fileno())
    finally:
        with contextlib.suppress(OSError):
            fcntl.lockf(fd, fcntl.LOCK_UN)
        os.close(fd)


def encode_mutf7(text: str) -> str:
    """IMAP's modified UTF-7 (RFC 3501 5.1.3): "Café" -> "Caf&AOk-", "&" -> "&-"."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            raw = "".join(pending).encode("utf-16-be")
            out.append("&" + base64.b64encode(raw).decode().rstrip("=").replace("/", ",") + "-")
            pending.clear()

    for ch in text:
        if 0x20 <= ord(ch) <= 0x7E:
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            pending.append(ch)
    flush()
    return "".join(out)
