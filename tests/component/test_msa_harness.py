"""The MSA's component-test harness (no tests here): the real MSA, in-process, with a real next hop.

`Stack` runs `msa.server.run` (the same wiring `python -m msa` uses: both
listeners, the limits from the config) and, unless told otherwise, the real
MTA listeners from `mta.smtpd.run`, on one event loop in a background thread.
Tests then talk to it with blocking clients (smtplib, raw sockets) from the
test thread.  Users are written straight into the installation's database
(hashing with common.users), which is much faster than the `mailroom` command;
the command itself is tested in test_msa_users.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from common.daemon import Context
from common.models import Alias, User
from common.users import hash_password, mailbox_name
from tests.support.suite import Installation, tls_client_context, wait_port

PASSWORD = "correct horse battery staple"


def new_installation(root: Path, **settings: dict[str, str]) -> Installation:
    """An installation with alice, bob, and aliases: sales -> alice, info -> bob.

    `settings` maps a section to {key: TOML value} written into the config file.
    """
    inst = Installation(root)
    for section, values in settings.items():
        for key, value in values.items():
            inst.set(section, key, value)
    add_users(inst, "alice@example.org", "bob@example.org")
    add_alias(inst, "sales@example.org", "alice@example.org")
    add_alias(inst, "info@example.org", "bob@example.org")
    return inst


def add_users(inst: Installation, *addresses: str, password: str = PASSWORD) -> None:
    db = inst.db()
    try:
        with db.write() as s:
            for a in addresses:
                s.add(User(address=a, password_hash=hash_password(password), store="maildir",
                           mailbox=mailbox_name(a)))
            s.commit()
    finally:
        db.close()


def add_alias(inst: Installation, source: str, target: str) -> None:
    db = inst.db()
    try:
        with db.write() as s:
            s.add(Alias(source=source, target=target))
            s.commit()
    finally:
        db.close()


Service = Callable[[Context], Awaitable[None]]


class Stack:
    """Services from one installation running on a private event loop."""

    def __init__(self, inst: Installation) -> None:
        self.inst = inst
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.contexts: list[Context] = []
        self.tasks: list[asyncio.Future[None]] = []
        self.thread.start()

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the loop's thread (for objects created there) and return its result."""
        async def wrapper() -> Any:
            return fn()
        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(10)

    def start(self, service: Service) -> Context:
        ctx: Context = self.call(self.inst.context)
        self.contexts.append(ctx)
        self.tasks.append(asyncio.run_coroutine_threadsafe(service(ctx), self.loop))  # type: ignore[arg-type]
        return ctx

    def start_msa(self) -> Context:
        from msa.server import run

        ctx = self.start(run)
        wait_port(self.inst.ports["submission"], 10)
        wait_port(self.inst.ports["submissions"], 10)
        # wait_port's probes count against the per-client connection cap until
        # the server has seen them close; a whole session (QUIT, then EOF)
        # makes sure they are gone before a test counts connections.
        for port, tls in ((self.inst.ports["submission"], False), (self.inst.ports["submissions"], True)):
            probe = Raw(port, tls=tls)
            probe.reply()
            probe.cmd("QUIT")
            probe.closed()
            probe.close()
        time.sleep(0.05)
        return ctx

    def start_mta(self) -> Context:
        from mta.smtpd import run

        ctx = self.start(run)
        wait_port(self.inst.ports["internal"], 10)
        return ctx

    def stop(self, ctx: Context) -> None:
        i = self.contexts.index(ctx)
        self.contexts.pop(i)
        task = self.tasks.pop(i)
        self.loop.call_soon_threadsafe(ctx.stop.set)
        task.result(20)
        ctx.db.close()

    def close(self) -> None:
        for ctx in list(self.contexts):
            self.stop(ctx)

        async def settle() -> None:
            # End the sessions still open and let closing transports finish, so
            # nothing is left for the garbage collector to warn about.
            me = asyncio.current_task()
            left = [t for t in asyncio.all_tasks() if t is not me]
            for t in left:
                t.cancel()
            await asyncio.gather(*left, return_exceptions=True)
            # TLS sessions end with a close_notify exchange: a few rounds more.
            for _ in range(25):
                await asyncio.sleep(0.02)

        asyncio.run_coroutine_threadsafe(settle(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@contextlib.contextmanager
def running(inst: Installation, *, mta: bool = True) -> Iterator[Stack]:
    stack = Stack(inst)
    try:
        if mta:
            stack.start_mta()
        stack.start_msa()
        yield stack
    finally:
        stack.close()


# --- clients ---------------------------------------------------------------------


def submission(inst: Installation, *, source: str = "127.0.0.1", tls: bool = True) -> smtplib.SMTP:
    """A client on the 587 role, after EHLO (and STARTTLS + EHLO when `tls`)."""
    client = smtplib.SMTP("127.0.0.1", inst.ports["submission"], timeout=20, source_address=(source, 0))
    client.ehlo("client.test")
    if tls:
        client.starttls(context=tls_client_context())
        client.ehlo("client.test")
    return client


def submissions(inst: Installation, *, source: str = "127.0.0.1") -> smtplib.SMTP_SSL:
    """A client on the 465 role (implicit TLS), after EHLO."""
    client = smtplib.SMTP_SSL("127.0.0.1", inst.ports["submissions"], timeout=20,
                              context=tls_client_context(), source_address=(source, 0))
    client.ehlo("client.test")
    return client


def logged_in(inst: Installation, user: str = "alice@example.org", *, source: str = "127.0.0.1") -> smtplib.SMTP:
    client = submission(inst, source=source)
    client.login(user, PASSWORD)
    return client


def auth_plain(client: smtplib.SMTP, user: str, password: str) -> tuple[int, bytes]:
    import base64

    token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    return client.docmd("AUTH", f"PLAIN {token}")


class Raw:
    """A line-oriented client on a plain or TLS socket, for dialogues smtplib will not have."""

    def __init__(self, port: int, *, tls: bool = False, source: str = "127.0.0.1") -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=20, source_address=(source, 0))
        if tls:
            sock = tls_client_context().wrap_socket(sock)
        self.sock: socket.socket | ssl.SSLSocket = sock
        self.file = sock.makefile("rb")

    def starttls(self) -> None:
        self.file.close()
        self.sock = tls_client_context().wrap_socket(self.sock)
        self.file = self.sock.makefile("rb")

    def send(self, line: str) -> None:
        self.sock.sendall(line.encode() + b"\r\n")

    def reply(self) -> str:
        """One whole reply, lines joined with newlines; '' when the server hung up."""
        lines = []
        while True:
            raw = self.file.readline()
            if not raw:
                return "\n".join(lines)
            text = raw.decode().rstrip("\r\n")
            lines.append(text)
            if text[3:4] != "-":
                return "\n".join(lines)

    def cmd(self, line: str) -> str:
        self.send(line)
        return self.reply()

    def quiet(self, seconds: float) -> bool:
        """True when the server sends nothing for `seconds`."""
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return False
        ready, _, _ = select.select([self.sock], [], [], seconds)
        return not ready

    def closed(self) -> bool:
        """True when the server has closed the connection (EOF)."""
        return self.file.readline() == b""

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
            self.sock.close()
