"""A throwaway Postfix instance, and Postfix's smtp-source / smtp-sink load tools, for tests.

Postfix is the reference MTA the suite compares itself with and talks to: a peer that
relays to us, a peer we relay to, and the yardstick for throughput. `PostfixInstance`
runs a private Postfix (its own config, queue, data and mail directories under one
temporary directory, listening on one loopback port) next to any system Postfix.

Postfix only runs as root (master drops privileges per service), so these helpers
require a root test run, as CI has.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import NamedTuple

from .peers import (
    free_port,
    make_searchable,
    reap_session,
    require,
    require_root,
    wait_for_port,
)

# Queue subdirectories that hold messages not yet delivered or bounced.
_QUEUE_DIRS = ("maildrop", "incoming", "active", "deferred", "hold")

# master.cf with every service out of chroot: a chroot would need copies of
# /etc/resolv.conf, /etc/services, ... inside the temporary queue directory.
_MASTER_CF = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

_instance_numbers = itertools.count(1)


def _loopback_target(spec: str) -> tuple[str, int]:
    """Split "127.0.0.1:PORT" and refuse anything that is not loopback (tests stay local)."""
    host, _, port = spec.rpartition(":")
    if not host.startswith("127.") or not port.isdigit():
        raise ValueError(f"expected '127.x.y.z:PORT', got {spec!r}")
    return host, int(port)


class PostfixInstance:
    """A private Postfix under `root`, listening for SMTP on 127.0.0.1:`smtp_port`.

    Routing, decided per recipient domain:
    - `virtual_domains`: delivered by virtual(8) to the Maildirs named in
      `virtual_mailboxes` (address -> Maildir path relative to `root/mail`, or just an
      iterable of addresses, each getting `root/mail/<address>/`); unknown addresses
      are refused at RCPT with 550 5.1.1.
    - `lmtp_domains`: delivered over LMTP to `lmtp_to` ("127.0.0.1:PORT").
    - `relay_domains`: relayed over SMTP to `relay_to` ("127.0.0.1:PORT"); when
      `relay_to` is set and `relay_domains` is empty, all other mail goes there.
    - anything else is refused at RCPT with 550 5.1.2 (the instance never looks up MX
      records or leaves loopback).

    `main_cf` adds or overrides main.cf parameters. Durability settings are Postfix
    defaults (it fsyncs queue files and Maildir files), so throughput figures compare
    like with like.

    Postfix runs its daemons as the `postfix` user and virtual(8) as `mailbox_uid`
    (default: the Debian "mail" user; uid 0 is refused by virtual(8)); they open files
    by absolute path, so start() grants search permission (o+x) on `root` and its
    ancestors, which pytest's 0700 tmp_path directories otherwise deny.
    """

    def __init__(
        self,
        root: Path,
        smtp_port: int | None = None,
        *,
        virtual_domains: Sequence[str] = (),
        virtual_mailboxes: Mapping[str, str] | Iterable[str] = (),
        relay_to: str | None = None,
        relay_domains: Sequence[str] = (),
        lmtp_to: str | None = None,
        lmtp_domains: Sequence[str] = (),
        mailbox_uid: int | None = None,
        mailbox_gid: int | None = None,
        hostname: str | None = None,
        main_cf: Mapping[str, str] | None = None,
    ) -> None:
        if lmtp_to is not None and not lmtp_domains:
            raise ValueError("lmtp_to needs lmtp_domains")
        if relay_domains and relay_to is None:
            raise ValueError("relay_domains needs relay_to")
        self.root = Path(root).resolve()
        self.smtp_port = smtp_port if smtp_port is not None else free_port()
        self.address = f"127.0.0.1:{self.smtp_port}"
        self.hostname = hostname or f"postfix{next(_instance_numbers)}-{os.getpid()}.test"
        self.config_dir = self.root / "etc"
        self.queue_dir = self.root / "spool"
        self.data_dir = self.root / "data"
        self.mail_dir = self.root / "mail"
        self.log_file = self.root / "maillog"
        if isinstance(virtual_mailboxes, Mapping):
            self.mailboxes = {a.lower(): p for a, p in virtual_mailboxes.items()}
        else:
            self.mailboxes = {a.lower(): f"{a.lower()}/" for a in virtual_mailboxes}
        self.virtual_domains = list(virtual_domains)
        self.relay_to = relay_to
        self.relay_domains = list(relay_domains)
        self.lmtp_to = lmtp_to
        self.lmtp_domains = list(lmtp_domains)
        # virtual(8) refuses uid 0; the Debian "mail" user (8:8) exists everywhere.
        mail_user = pwd.getpwnam("mail")
        self.mailbox_uid = mail_user.pw_uid if mailbox_uid is None else mailbox_uid
        self.mailbox_gid = mail_user.pw_gid if mailbox_gid is None else mailbox_gid
        self.extra_main_cf = dict(main_cf or {})
        self._postfix = ""
        self._master_pid: int | None = None

    # -- configuration ------------------------------------------------------------

    def _main_cf(self) -> dict[str, str]:
        transport: list[str] = []
        default_transport = "error:5.1.2 no route in this test instance"
        if self.relay_to is not None:
            host, port = _loopback_target(self.relay_to)
            nexthop = f"smtp:[{host}]:{port}"
            if self.relay_domains:
                transport += [f"{d} {nexthop}" for d in self.relay_domains]
            else:
                default_transport = nexthop
        if self.lmtp_to is not None:
            host, port = _loopback_target(self.lmtp_to)
            transport += [f"{d} lmtp:inet:{host}:{port}" for d in self.lmtp_domains]
        # texthash: tables are read as plain text, so no postmap step is needed.
        (self.config_dir / "transport").write_text("".join(f"{t}\n" for t in transport))
        (self.config_dir / "vmailbox").write_text("".join(f"{a} {p}\n" for a, p in self.mailboxes.items()))
        params = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "myhostname": self.hostname,
            "mydomain": "test",
            "myorigin": "$myhostname",
            "mydestination": "",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "biff": "no",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "relayhost": "",
            "relay_domains": ", ".join([*self.relay_domains, *self.lmtp_domains]),
            "transport_maps": f"texthash:{self.config_dir}/transport",
            "default_transport": default_transport,
            # Never reach for real DNS: every next hop here is a numeric loopback address.
            "smtp_dns_support_level": "disabled",
            "lmtp_dns_support_level": "disabled",
            "virtual_mailbox_domains": ", ".join(self.virtual_domains),
            "virtual_mailbox_maps": f"texthash:{self.config_dir}/vmailbox",
            "virtual_mailbox_base": str(self.mail_dir),
            "virtual_uid_maps": f"static:{self.mailbox_uid}",
            "virtual_gid_maps": f"static:{self.mailbox_gid}",
            "virtual_minimum_uid": str(min(self.mailbox_uid, 100)),
            # Log to a file through postlogd: CI containers often have no syslog.
            "maillog_file": str(self.log_file),
            "maillog_file_prefixes": str(self.root),
            "smtpd_banner": "$myhostname ESMTP Postfix (mailroom test peer)",
        }
        params.update(self.extra_main_cf)
        return params

    def write_config(self) -> None:
        """Create the directory tree and write main.cf / master.cf (start() calls this)."""
        for d in (self.config_dir, self.queue_dir, self.data_dir, self.mail_dir):
            d.mkdir(parents=True, exist_ok=True)
        # Postfix daemons run as the postfix user and virtual(8) as mailbox_uid, and
        # they reach data_directory and the Maildirs by absolute path.
        make_searchable(self.root)
        os.chown(self.data_dir, pwd.getpwnam("postfix").pw_uid, -1)
        os.chown(self.mail_dir, self.mailbox_uid, self.mailbox_gid)
        main = self._main_cf()
        (self.config_dir / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in main.items()))
        listener = f"{self.address} inet n       -       n       -       -       smtpd\n"
        (self.config_dir / "master.cf").write_text(listener + _MASTER_CF)

    # -- lifecycle ------------------------------------------------------------------

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self._postfix, "-c", str(self.config_dir), *args],
            capture_output=True,
            text=True,
            check=check,
            timeout=60,
        )

    def start(self, timeout: float = 20.0) -> PostfixInstance:
        """Write the config, start master, and wait until the SMTP port answers."""
        require_root("Postfix")
        self._postfix = require("postfix")
        self.write_config()
        result = self._run("start", check=False)
        self._master_pid = self._read_master_pid()
        try:
            if result.returncode != 0:
                raise RuntimeError(
                    f"postfix start failed ({result.returncode}):\n{result.stdout}{result.stderr}"
                    f"\n--- maillog ---\n{self.log_text()}"
                )
            wait_for_port(self.smtp_port, timeout=timeout)
        except BaseException:
            # __exit__ does not run when __enter__ raises: clean up here.
            self.stop()
            raise
        return self

    def _read_master_pid(self) -> int | None:
        try:
            return int((self.queue_dir / "pid" / "master.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def stop(self, timeout: float = 20.0) -> None:
        """Stop this instance and make sure none of its processes outlive the call."""
        master = self._master_pid or self._read_master_pid()
        if self._postfix:
            self._run("stop", check=False)
        if master is None:
            return
        reap_session(master, timeout)
        self._master_pid = None

    def __enter__(self) -> PostfixInstance:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- observation ----------------------------------------------------------------

    def queue_count(self) -> int:
        """Messages in the queue that are not yet delivered, bounced or expired."""
        total = 0
        for name in _QUEUE_DIRS:
            for _dirpath, _dirs, files in os.walk(self.queue_dir / name):
                total += len(files)
        return total

    def wait_queue_empty(self, timeout: float = 30.0) -> None:
        """Block until the queue is empty; raise TimeoutError with `postqueue -p` if not."""
        deadline = time.monotonic() + timeout
        while self.queue_count():
            if time.monotonic() > deadline:
                listing = subprocess.run(
                    [require("postqueue"), "-c", str(self.config_dir), "-p"],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                raise TimeoutError(f"Postfix queue not empty after {timeout}s:\n{listing.stdout}{listing.stderr}")
            time.sleep(0.05)

    def flush(self) -> None:
        """Retry deferred mail now (`postqueue -f`), e.g. after a peer came back."""
        subprocess.run(
            [require("postqueue"), "-c", str(self.config_dir), "-f"],
            capture_output=True,
            check=True,
            timeout=30,
        )

    def maildir_path(self, address: str) -> Path:
        """The Maildir virtual(8) delivers `address` to."""
        return self.mail_dir / self.mailboxes[address.lower()]

    def maildir_count(self, address: str) -> int:
        """Messages delivered to `address` (files in its Maildir's new/ and cur/)."""
        maildir = self.maildir_path(address)
        return sum(len(list((maildir / sub).glob("*"))) for sub in ("new", "cur"))

    def log_text(self) -> str:
        """Everything this instance has logged so far (its maillog_file)."""
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""


# -- smtp-source / smtp-sink ----------------------------------------------------------


class SourceRun(NamedTuple):
    """One smtp-source run: the finished process and its wall-clock time in seconds."""

    process: subprocess.CompletedProcess[str]
    elapsed: float


def smtp_source(
    target: str,
    *,
    count: int = 1,
    sessions: int = 1,
    size: int = 1024,
    sender: str = "source@source.test",
    recipient: str = "sink@sink.test",
    reuse_connections: bool = False,
    lmtp: bool = False,
    subject: str | None = None,
    extra_args: Sequence[str] = (),
    timeout: float = 600.0,
    check: bool = True,
) -> SourceRun:
    """Send `count` messages of `size` payload bytes to `target` ("host:port").

    `reuse_connections` is smtp-source -d (several messages per connection);
    otherwise each message gets its own connection. smtp-source exits non-zero on
    an unexpected reply, which raises CalledProcessError when `check` is set.
    """
    args = [require("smtp-source"), "-4", "-m", str(count), "-s", str(sessions)]
    args += ["-l", str(size), "-f", sender, "-t", recipient, "-M", "[127.0.0.1]"]
    if reuse_connections:
        args.append("-d")
    if lmtp:
        args.append("-L")
    if subject is not None:
        args += ["-S", subject]
    args += [*extra_args, target]
    started = time.monotonic()
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    elapsed = time.monotonic() - started
    if check and proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, args, proc.stdout, proc.stderr)
    return SourceRun(proc, elapsed)


@contextlib.contextmanager
def smtp_sink(
    port: int,
    *,
    host: str = "127.0.0.1",
    backlog: int = 256,
    lmtp: bool = False,
    extra_args: Sequence[str] = (),
    user: str = "nobody",
) -> Iterator[subprocess.Popen[bytes]]:
    """Run Postfix's smtp-sink (accept and discard all mail) on host:port.

    smtp-sink refuses to keep root privileges, hence `-u user` when run as root.
    """
    args = [require("smtp-sink"), "-4"]
    if os.geteuid() == 0:
        args += ["-u", user]
    if lmtp:
        args.append("-L")
    args += [*extra_args, f"{host}:{port}", str(backlog)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_port(port, host=host)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
