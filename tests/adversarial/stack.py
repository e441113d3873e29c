"""The MSA, the MTA's listeners and the MDA of one Installation, in this process.

The real service functions (`msa.server.run`, `mta.smtpd.run`, `mda.server.run`)
run on an event loop in a background thread, with a real SQLite database and
real mailboxes, bound to free loopback ports.  The queue manager does not run,
so whatever the MTA accepted stays in the queue, where a test can see it: a
message refused must not be there, a relay attempt must leave no remote
recipient behind.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from common.daemon import Context
from common.models import User
from common.users import hash_password, mailbox_name
from mda import server as mda_server
from msa import server as msa_server
from mta import smtpd
from tests.support.suite import PASSWORD, Installation, maildir_messages, mbox_messages, wait_port

_HASH = hash_password(PASSWORD)  # once: argon2 is slow on purpose


@dataclass(frozen=True)
class Queued:
    trace: str
    sender: str
    recipients: tuple[str, ...]
    body: bytes


class Stack:
    def __init__(self, root: Path, *, smtp: dict[str, object] | None = None, msa: dict[str, object] | None = None,
                 mta: dict[str, object] | None = None) -> None:
        """`smtp`, `msa`, `mta`: settings of those config sections, e.g. smtp={"idle_timeout": 1}."""
        settings = "".join(f"{k} = {_toml(v)}\n" for k, v in (smtp or {}).items())
        self.inst = Installation(root, extra="\n[smtp]\n" + settings if settings else "")
        for section, values in (("msa", msa), ("mta", mta)):
            for k, v in (values or {}).items():
                self.inst.set(section, k, _toml(v))
        self.ports = self.inst.ports
        self.config = self.inst.config
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ctx: Context | None = None
        self.add_users([("alice@example.org", "maildir"), ("bob@example.org", "mbox")])

    def add_users(self, users: list[tuple[str, str]]) -> None:
        db = self.inst.db()
        try:
            with db.write() as s:
                for address, store in users:
                    name = mailbox_name(address) + (".mbox" if store == "mbox" else "")
                    s.add(User(address=address, password_hash=_HASH, store=store, mailbox=name))
                s.commit()
        finally:
            db.close()

    # --- running -------------------------------------------------------------------

    def start(self) -> None:
        ready = threading.Event()
        failure: list[BaseException] = []

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._ctx = self.inst.context()
            ready.set()
            try:
                await asyncio.gather(
                    smtpd.run(self._ctx), msa_server.run(self._ctx), mda_server.run(self._ctx)
                )
                # Let sessions that saw their client go (and the MSA's QUIT to the
                # MTA) finish, so no transport is left for the garbage collector.
                for _ in range(50):
                    if len(asyncio.all_tasks()) <= 1:
                        break
                    await asyncio.sleep(0.02)
            finally:
                self._ctx.db.close()

        def thread() -> None:
            try:
                asyncio.run(main())
            except BaseException as exc:  # shown by stop()
                failure.append(exc)
                ready.set()

        self._failure = failure
        self._thread = threading.Thread(target=thread, name="stack", daemon=True)
        self._thread.start()
        ready.wait(10)
        for key in ("submission", "submissions", "smtp", "internal", "lmtp"):
            wait_port(self.ports[key], timeout=10)

    def stop(self) -> None:
        if self._thread is None:
            return
        assert self._loop is not None and self._ctx is not None
        self._loop.call_soon_threadsafe(self._ctx.stop.set)
        self._thread.join(30)
        assert not self._thread.is_alive(), "the in-process listeners did not stop"
        self._thread = None
        if self._failure and not isinstance(self._failure[0], asyncio.CancelledError):
            raise AssertionError(f"the listeners failed: {self._failure[0]!r}") from self._failure[0]

    # --- what happened ---------------------------------------------------------------

    def queued(self) -> list[Queued]:
        """Every message in the MTA's queue, with its recipients."""
        db = self.config.database_url.removeprefix("sqlite:///")
        with sqlite3.connect(db, timeout=30) as conn:
            rows = conn.execute("SELECT id, sender, body FROM messages ORDER BY received").fetchall()
            out = []
            for trace, sender, body in rows:
                rcpts = conn.execute(
                    "SELECT address FROM recipients WHERE message_id = ? ORDER BY id", (trace,)
                ).fetchall()
                out.append(Queued(trace, sender, tuple(r[0] for r in rcpts), body or b""))
        conn.close()
        return out

    def mailbox(self, address: str) -> list[bytes]:
        """The messages delivered to a local user (Maildir or mbox)."""
        local, domain = address.split("@")
        box = self.config.mail_root / domain / local
        if box.with_suffix(".mbox").exists():
            return mbox_messages(box.with_suffix(".mbox"))
        return [p.read_bytes() for p in maildir_messages(box)]

    def files_outside_mail_root(self) -> list[Path]:
        """Files that appeared in the installation folder, but not where they belong."""
        root = self.inst.root
        dkim_keys = self.config.resolve(self.config.dkim.key_dir)
        allowed = (self.config.mail_root, self.config.run_dir, root / "tls", dkim_keys)
        return [
            p for p in root.rglob("*")
            if p.is_file() and not any(p.is_relative_to(a) for a in allowed)
            and not p.name.startswith(("mailroom.", "suite.log"))
        ]


def _toml(v: object) -> str:
    return f'"{v}"' if isinstance(v, str) else str(v)


def running(root: Path, **kw: object) -> Iterator[Stack]:
    stack = Stack(root, **kw)  # type: ignore[arg-type]
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()
