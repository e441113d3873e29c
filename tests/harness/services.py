"""The one way to run Mailroom's services in the test process: `Stack`.

A `Stack` is an event loop in a background thread.  On it run the real service
functions of one installation (`msa.server.run`, `mta.smtpd.run`,
`mda.server.run`, `mta.qmgr.run`: the wiring `python -m msa` and the others
use, listeners on the installation's loopback ports), or a single listener
with a handler the test builds (`listen`), bound to 127.0.0.1:0 or [::]:0.
Tests talk to them with blocking clients (tests.harness.client, smtplib) from
the test thread, and read the real SQLite database and mailboxes afterwards.

`close()` stops every service through its stop event, waits for it to end
(a service that failed raises here), ends the sessions still open and lets TLS
sessions finish, so nothing is left for the garbage collector to warn about.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from common.config import Config
from common.daemon import Context
from common.smtp import Handler, Limits, limits_from, serve
from tests.harness.client import Client
from tests.harness.users import add_alias, add_user
from tests.support.suite import Installation, maildir_messages, mbox_messages, wait_port

Service = Callable[[Context], Awaitable[None]]
T = TypeVar("T")

# The installation most tests want: alice's mailbox is a Maildir, bob's an mbox.
USERS = (("alice@example.org", "maildir"), ("bob@example.org", "mbox"))


def installation(
    root: Path, *, users: tuple[tuple[str, str], ...] = USERS, aliases: dict[str, str] | None = None,
    **sections: Mapping[str, object],
) -> Installation:
    """A new installation with `users` (address, store) and `aliases` (source -> target);
    `sections` maps a config section to settings, e.g. smtp={"idle_timeout": 1} or
    msa={"auth_lockout": '"3s"'} (str values are written as they are: TOML text)."""
    return _installation(root, users, aliases or {}, sections)


def _installation(
    root: Path, users: tuple[tuple[str, str], ...], aliases: dict[str, str],
    sections: Mapping[str, Mapping[str, object]],
) -> Installation:
    inst = Installation(root)
    for section, values in sections.items():
        for key, value in values.items():
            inst.set(section, key, value if isinstance(value, str) else toml(value))
    for address, store in users:
        add_user(inst, address, store)
    for source, target in aliases.items():
        add_alias(inst, source, target)
    return inst


def toml(value: object) -> str:
    """A Python value as TOML text (bool, int, float; str quoted)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return f'"{value}"' if isinstance(value, str) else str(value)


@dataclass(frozen=True)
class Queued:
    """A message in the MTA's queue, as the database holds it."""

    trace: str
    sender: str
    recipients: tuple[str, ...]
    body: bytes


class Stack:
    """Services (of one installation, if given) on a private event loop in a thread."""

    def __init__(self, inst: Installation | None = None, *, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """`loop`: another event loop than asyncio's default kind (uvloop's), which the stack then runs and closes."""
        self.inst = inst
        self.loop = loop or asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="stack", daemon=True)
        self.contexts: list[Context] = []
        self.tasks: list[Any] = []  # concurrent futures of the running services
        self.servers: list[asyncio.Server] = []
        self.thread.start()

    @property
    def ports(self) -> dict[str, int]:
        assert self.inst is not None
        return self.inst.ports

    @property
    def config(self) -> Config:
        assert self.inst is not None
        return self.inst.config

    def address(self, key: str) -> int | str:
        """Where listener `key` is: its port, or the path of its Unix socket (the internal one's default)."""
        assert self.inst is not None
        if key == "internal":
            where = self.inst.config.endpoint("mta.internal")
            return where.path if where.is_unix else where.port
        return self.inst.ports[key]

    # --- on the loop -------------------------------------------------------------------

    def run(self, coro: Awaitable[T], timeout: float = 10) -> T:
        """Run a coroutine on the loop; its result."""
        async def wrapper() -> T:
            return await coro

        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the loop's thread (for objects that belong to it) and return its result."""
        async def wrapper() -> T:
            return fn()

        return self.run(wrapper())

    # --- services ------------------------------------------------------------------------

    def context(self) -> Context:
        """A fresh Context of the installation (its own database handle), made on the loop."""
        assert self.inst is not None, "this stack has no installation"
        ctx: Context = self.call(self.inst.context)
        self.contexts.append(ctx)
        self.tasks.append(None)
        return ctx

    def start(self, service: Service) -> Context:
        """Run a service function with a context of its own until close() or stop()."""
        ctx = self.context()
        self.tasks[-1] = asyncio.run_coroutine_threadsafe(service(ctx), self.loop)  # type: ignore[arg-type]
        return ctx

    def start_msa(self) -> Context:
        from msa.server import run

        ctx = self.start(run)
        self._settled(("submission", False), ("submissions", True))
        return ctx

    def start_mta(self) -> Context:
        """The MTA's listeners (public and internal); the queue manager is `start_qmgr`."""
        from mta.smtpd import run

        ctx = self.start(run)
        self._settled(("smtp", False), ("internal", False))
        return ctx

    def start_mda(self) -> Context:
        from mda.server import run

        ctx = self.start(run)
        self._settled(("lmtp", False))
        return ctx

    def start_qmgr(self) -> Context:
        from mta.qmgr import run

        return self.start(run)

    def start_listeners(self) -> None:
        """MSA, MTA (public and internal) and MDA; no queue manager, so what the MTA
        accepted stays in the queue for the test to see."""
        self.start_mda()
        self.start_mta()
        self.start_msa()

    def _settled(self, *listeners: tuple[str, bool]) -> None:
        """Wait until the listeners answer, with a whole session each: a bare connect
        probe would count against the per-client connection cap until the server
        has seen it close, and QUIT then EOF makes sure it has."""
        for key, tls in listeners:
            port = self.address(key)
            wait_port(port, 10)
            probe = Client.connect(port, tls=tls)
            probe.reply()
            probe.cmd("QUIT")
            probe.closed()
            probe.close()
        time.sleep(0.05)

    def listen(
        self, make_handler: Callable[[], Handler], *, endpoint: str = "127.0.0.1:0", limits: Limits | None = None,
        hostname: str = "mail.test", **serve_args: Any,
    ) -> int:
        """One listener of the engine with the handler a test built; its port (0 for a Unix socket)."""
        async def start() -> asyncio.Server:
            return await serve(endpoint, make_handler, hostname=hostname, limits=limits or Limits(), **serve_args)

        server = self.run(start())
        self.servers.append(server)
        name = server.sockets[0].getsockname()
        return int(name[1]) if isinstance(name, tuple) else 0  # 0: a Unix socket (its path is `endpoint`)

    def listen_mta(self, *, tls: bool = True, **sections: dict[str, Any]) -> tuple[Context, int, int]:
        """The MTA's public and internal listeners with the real handler, on 127.0.0.1:0,
        with config sections changed in memory for this stack only (mta={"trusted_networks":
        ["127.0.0.0/8"]}), so tests that vary settings can share one installation.
        STARTTLS on the public one with the installation's certificate when `tls`.
        Returns (context, public port, internal port)."""
        from common.tls import server_context
        from mta.auth.mailauth import Current
        from mta.smtpd import ReceivePolicy, SMTPHandler

        ctx = self.context()
        cfg = ctx.config
        for name, values in sections.items():
            cfg = dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name), **values)})
        ctx.config = cfg
        auth = Current(lambda: ctx.config, ctx.resolver())  # as mta/smtpd.py's run builds it
        ports = []
        for internal in (False, True):
            policy = ReceivePolicy.from_config(cfg, internal=internal)
            ports.append(self.listen(
                functools.partial(SMTPHandler, policy, ctx.db, ctx.clock, auth), limits=limits_from(cfg.smtp),
                tls_context=server_context(cfg.resolve(cfg.tls.cert), cfg.resolve(cfg.tls.key))
                if tls and not internal else None,
            ))
        return ctx, ports[0], ports[1]

    def listen_mda(self, *, limits: Limits | None = None, **serve_args: Any) -> tuple[Context, int]:
        """The MDA's LMTP listener with the real handler on 127.0.0.1:0 (the installation's
        delivery settings, `limits` for this listener).  Returns (context, port)."""
        from mda.server import DeliveryPolicy, LMTPHandler

        ctx = self.context()
        port = self.listen(lambda: LMTPHandler(DeliveryPolicy.from_config(ctx.config), ctx.db),
                           limits=limits, lmtp=True, **serve_args)
        return ctx, port

    def stop(self, ctx: Context) -> None:
        """Stop one service and wait for it to end (its failure is raised here)."""
        i = self.contexts.index(ctx)
        self.contexts.pop(i)
        task = self.tasks.pop(i)
        self.loop.call_soon_threadsafe(ctx.stop.set)
        try:
            if task is not None:
                task.result(20)
        finally:
            ctx.db.close()

    def close(self) -> None:
        errors: list[BaseException] = []
        for ctx in list(self.contexts):
            try:
                self.stop(ctx)
            except BaseException as exc:  # raised below, once everything is down
                errors.append(exc)

        async def settle() -> None:
            for server in self.servers:
                server.close()
                await server.wait_closed()
            # End the sessions still open and let closing transports finish.
            me = asyncio.current_task()
            left = [t for t in asyncio.all_tasks() if t is not me]
            for t in left:
                t.cancel()
            await asyncio.gather(*left, return_exceptions=True)
            # TLS sessions end with a close_notify exchange: a few rounds more.
            for _ in range(5):
                await asyncio.sleep(0.02)

        self.run(settle())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        assert not self.thread.is_alive(), "the in-process services did not stop"
        self.loop.close()
        if errors and not isinstance(errors[0], asyncio.CancelledError):
            raise AssertionError(f"a service failed: {errors[0]!r}") from errors[0]

    # --- what happened ---------------------------------------------------------------------

    def queued(self) -> list[Queued]:
        """Every message in the MTA's queue, with its recipients."""
        assert self.inst is not None
        db = self.inst.config.database_url.removeprefix("sqlite:///")
        conn = sqlite3.connect(db, timeout=30)
        try:
            rows = conn.execute("SELECT id, sender, body FROM messages ORDER BY received").fetchall()
            out = []
            for trace, sender, body in rows:
                rcpts = conn.execute(
                    "SELECT address FROM recipients WHERE message_id = ? ORDER BY id", (trace,)
                ).fetchall()
                out.append(Queued(trace, sender, tuple(r[0] for r in rcpts), body or b""))
        finally:
            conn.close()
        return out

    def mailbox(self, address: str) -> list[bytes]:
        """The messages delivered to a local user (Maildir or mbox)."""
        assert self.inst is not None
        local, domain = address.split("@")
        box = self.inst.config.mail_root / domain / local
        if box.with_suffix(".mbox").exists():
            return mbox_messages(box.with_suffix(".mbox"))
        return [p.read_bytes() for p in maildir_messages(box)]


class Since:
    """A stack shared by a module's tests, as one test sees it: the queue and the
    mailboxes hold only what arrived after the test began, so "nothing was stored"
    still means nothing.  alice's and bob's mailboxes are watched from the start;
    others from `watch` (reading a mailbox costs, and tests use a hundred)."""

    def __init__(self, stack: Stack) -> None:
        self._stack = stack
        self._queued = {q.trace for q in stack.queued()}
        self._boxes: dict[str, list[bytes]] = {}
        self.watch("alice@example.org", "bob@example.org")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stack, name)

    def watch(self, *addresses: str) -> None:
        """From now on, these mailboxes hold only what arrives after this."""
        for a in addresses:
            self._boxes[a] = self._stack.mailbox(a)

    def queued(self) -> list[Queued]:
        return [q for q in self._stack.queued() if q.trace not in self._queued]

    def mailbox(self, address: str) -> list[bytes]:
        new = self._stack.mailbox(address)
        for old in self._boxes[address]:  # a multiset difference: Maildir and mbox alike
            new.remove(old)
        return new


@contextlib.contextmanager
def running(inst: Installation, *services: str) -> Iterator[Stack]:
    """A Stack with the named services started ("mda", "mta", "msa", "qmgr"; each
    next hop before its client), closed at the end."""
    stack = Stack(inst)
    try:
        for name in sorted(services, key=("mda", "mta", "msa", "qmgr").index):
            getattr(stack, f"start_{name}")()
        yield stack
    finally:
        stack.close()


@contextlib.contextmanager
def listeners(root: Path, **sections: Mapping[str, object]) -> Iterator[Stack]:
    """A new installation (alice: Maildir, bob: mbox; `sections` as for `installation`) with
    the MSA, the MTA's listeners and the MDA running; no queue manager, so whatever
    the MTA accepted stays in the queue, where a test can see it."""
    with running(_installation(root, USERS, {}, sections), "mda", "mta", "msa") as stack:
        yield stack
