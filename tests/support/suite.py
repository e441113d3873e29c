"""A throwaway Mailroom installation for tests: config, database, users, processes.

`Installation` runs `mailroom init` in a temporary folder (as root, the daemons
then serve as the `mailroom` user that init creates, as in production), moves
every listener to a free loopback port, and can start the real daemons the way `mailroom run`
does (supervisord with the four programs).  `Installation.context()` gives an
in-process `Context` for component tests that drive one listener directly.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cli.main import main as mailroom_main
from common import config as configmod
from common.clock import Clock, SystemClock
from common.daemon import Context
from common.db import Database
from tests.support.ports import free_port as free_port

LISTENERS = {
    ("msa", "submission"): "127.0.0.1:2587",
    ("msa", "submissions"): "127.0.0.1:2465",
    ("mta", "smtp"): "127.0.0.1:2525",
    ("mda", "lmtp"): "127.0.0.1:2424",
    ("imap", "imap"): "127.0.0.1:2143",
    ("imap", "imaps"): "127.0.0.1:2993",
    ("imap", "pop3s"): "127.0.0.1:2995",
    ("web", "listen"): "127.0.0.1:8025",
    ("imap", "sieve"): "127.0.0.1:2190",
    ("filter", "scanner"): "127.0.0.1:2783",
    ("filter", "controller"): "127.0.0.1:2784",
    ("filter", "redis"): "127.0.0.1:2785",
    ("web", "admin"): "127.0.0.1:8443",
}
# The password of the users tests make (tests/harness/users.py).
PASSWORD = "purple otter kettle mirror"  # long enough, on no list (common/passwords.py)
# Served by Dovecot, which `mailroom run` starts only when it can (cli/dovecot.py).
DOVECOT_PORTS = ("imap", "imaps", "pop3s", "sieve")
# Served by the supervised rspamd and its Redis, only with [filter] rspamd = "supervised".
FILTER_PORTS = ("scanner", "controller", "redis")


def tls_client_context() -> ssl.SSLContext:
    """A client's TLS context that takes any certificate: test installations' are self-signed."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def wait_port(port: int | str, timeout: float = 20.0) -> None:
    """Until something listens on 127.0.0.1:`port`, or on the Unix socket at the path `port`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_UNIX if isinstance(port, str) else socket.AF_INET) as s:
            s.settimeout(0.5)
            if s.connect_ex(port if isinstance(port, str) else ("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {port if isinstance(port, str) else f'127.0.0.1:{port}'}")


def _reachable(root: Path) -> Path:
    """Where the installation really lives: `root` when the Mailroom user can reach it.

    As root, `mailroom init` gives the installation to the `mailroom` user, and
    the daemons serve as it, as in production.  pytest's tmp_path sits under
    /tmp/pytest-of-root, which every pytest session started as root on this
    machine closes again (0700): then the installation goes to a folder of its
    own under /tmp that only search permission leads to, `root` becomes a link
    to it, and it is removed when the test process ends.
    """
    if os.getuid() != 0 or all(p.stat().st_mode & 0o001 for p in root.parents if p.exists()):
        return root
    real = Path(tempfile.mkdtemp(prefix="mailroom-test-"))
    real.chmod(0o711)
    atexit.register(shutil.rmtree, str(real), True)
    root.parent.mkdir(parents=True, exist_ok=True)
    root.symlink_to(real / root.name)
    return real / root.name


class Installation:
    def __init__(self, root: Path, *, domain: str = "example.org", extra: str = "") -> None:
        root = _reachable(root)
        self.root = root
        self.domain = domain
        assert mailroom_main(["init", "--dir", str(root), "--domain", domain, "--hostname", "mail.test"]) == 0
        self.config_path = root / "mailroom.toml"
        self.ports: dict[str, int] = {}
        text = self.config_path.read_text()
        for (_, key), default in LISTENERS.items():
            port = free_port()
            self.ports[key] = port
            text = text.replace(f'{key} = "{default}"', f'{key} = "127.0.0.1:{port}"')
        # Sender checks ask DNS for every public message; tests talk only to loopback,
        # so a test that wants them turns them on with its own DNS server.
        text = text.replace("[mailauth]\ncheck = true", "[mailauth]\ncheck = false")
        # `mailroom init` runs rspamd when it is installed; a test that wants the filter says so
        # (`Installation.supervise_filter`), the others deliver unscanned, as before.
        text = re.sub(r'(?m)^rspamd = "supervised"$', 'rspamd = ""', text)
        self.config_path.write_text(text + extra)
        self.supervisor: subprocess.Popen[bytes] | None = None
        self.log_path = root / "suite.log"

    @property
    def config(self) -> configmod.Config:
        return configmod.load(self.config_path)

    @property
    def internal_socket(self) -> str:
        """The MTA's internal listener as `mailroom init` sets it: a Unix socket in the run folder."""
        return self.config.endpoint("mta.internal").path

    def set(self, section: str, key: str, value: str) -> None:
        """Change one setting (a TOML value) in the config file."""
        text = self.config_path.read_text()
        # The section's own lines only: a line opening another section ends the search,
        # so a key missing here is added here, not changed in a later section.
        pattern = re.compile(rf"(?m)^(\[{re.escape(section)}\]\n(?:(?!\[).*\n)*?){re.escape(key)} = .*$")
        if pattern.search(text):
            text = pattern.sub(lambda m: f"{m.group(1)}{key} = {value}", text, count=1)
        elif f"[{section}]\n" in text:
            text = text.replace(f"[{section}]\n", f"[{section}]\n{key} = {value}\n", 1)
        else:  # a section `mailroom init` does not write ([smtp], say)
            text = text.rstrip("\n") + f"\n\n[{section}]\n{key} = {value}\n"
        self.config_path.write_text(text)

    def supervise_filter(self, *, min_learns: int = 50, nameserver: str = "") -> None:
        """Let `mailroom run` run rspamd and its Redis (`[filter] rspamd = "supervised"`), asking
        the DNS server `nameserver` (a test's own; none: a closed loopback port, so rspamd never
        asks outside this host)."""
        self.set("filter", "rspamd", '"supervised"')
        self.set("filter", "bayes_min_learns", str(min_learns))
        self.set("dns", "nameservers", f'["{nameserver or f"127.0.0.1:{free_port()}"}"]')

    def cli(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run the real `mailroom` command against this installation."""
        return subprocess.run(
            [sys.executable, "-m", "cli.main", "--config", str(self.config_path), *args],
            input=stdin, capture_output=True, text=True, timeout=60,
            cwd=Path(__file__).resolve().parents[2],
        )

    def mailbox(self, address: str) -> Path:
        """Where ADDRESS's mail is stored: the path `mailroom user list` shows, read
        here from the database (a `mailroom` process would cost a second a call)."""
        from sqlalchemy import select

        from common.models import User

        config = self.config  # read from the file at each use: once here
        db = Database(config.database_url, threads=1)
        try:
            with db.read() as s:
                box = s.scalar(select(User.mailbox).where(User.address == address))
        finally:
            db.close()
        if box is None:
            raise KeyError(address)
        return config.mail_root / box

    def give(self, path: Path | None = None) -> None:
        """As root: files a test made (mailboxes, say) become the Mailroom user's, as
        if the daemons had written them (`chown -R mailroom: PATH`; default the mail root)."""
        if os.getuid() != 0:
            return
        import pwd

        pw = pwd.getpwnam(self.config.mailroom.user)
        top = path or self.config.mail_root
        os.chown(top, pw.pw_uid, pw.pw_gid)
        for folder, dirs, files in os.walk(top):
            for name in dirs + files:
                os.chown(os.path.join(folder, name), pw.pw_uid, pw.pw_gid, follow_symlinks=False)

    def db(self) -> Database:
        db = Database(self.config.database_url, threads=2)
        db.create_schema()
        return db

    def context(self, clock: Clock | None = None) -> Context:
        """For in-process component tests (call inside a running event loop)."""
        return Context(config=self.config, db=self.db(), clock=clock or SystemClock(), stop=asyncio.Event())

    # --- the real processes ------------------------------------------------------

    def start(self, timeout: float = 20.0) -> None:
        """Start supervisord with every program, as `mailroom run` does; each listener
        must answer within `timeout` seconds."""
        # Private like everything else in the installation (what the daemons log names users).
        log = os.fdopen(os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")
        self.supervisor = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "--config", str(self.config_path), "run"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            cwd=Path(__file__).resolve().parents[2],
        )
        self._log = log
        from cli import dovecot

        with_dovecot = dovecot.why_not(self.config) is None
        try:
            with_filter = self.config.filter.supervised
            for key, port in self.ports.items():
                if (with_dovecot or key not in DOVECOT_PORTS) and (with_filter or key not in FILTER_PORTS):
                    # rspamadm (hashing, configtest) runs before supervisord: longer with the filter.
                    wait_port(port, max(timeout, 90) if with_filter else timeout)
        except TimeoutError:
            self.stop()
            raise AssertionError("the suite did not start:\n" + self.log_path.read_text()[-4000:]) from None

    def stop(self) -> None:
        if self.supervisor is None:
            return
        proc, self.supervisor = self.supervisor, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        self._log.close()

    def output(self) -> str:
        """What `mailroom run` printed: supervisord's lines, and what a program printed
        when it could not start or crashed."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log(self, program: str) -> str:
        """Program `program`'s own log file ([mailroom] log_dir/PROGRAM.log), "" if none yet."""
        folder = self.config.log_dir
        path = folder / f"{program}.log" if folder is not None else None
        return path.read_text(errors="replace") if path is not None and path.exists() else ""

    def log_text(self) -> str:
        """Everything the suite wrote: `mailroom run`'s output, then each program's log file."""
        folder = self.config.log_dir
        files = sorted(folder.glob("*.log")) if folder is not None and folder.is_dir() else []
        return self.output() + "".join(f.read_text(errors="replace") for f in files)

    def program_pid(self, name: str) -> int:
        r = self.cli("status")
        m = re.search(rf"^{name}\s+RUNNING\s+pid (\d+)", r.stdout, re.M)
        assert m, r.stdout
        return int(m.group(1))

    def program_pids(self, name: str) -> dict[str, int]:
        """The running processes of program `name` by supervisord's name: {"mta": pid}, or
        {"mta:mta_0": pid, "mta:mta_1": pid} with `[mta] processes = 2`."""
        r = self.cli("status")
        return {m.group(1): int(m.group(2))
                for m in re.finditer(rf"^({name}(?::\S+)?)\s+RUNNING\s+pid (\d+)", r.stdout, re.M)}

    # --- clients ------------------------------------------------------------------

    def submit(
        self, sender: str, recipients: list[str], message: bytes, *, password: str = PASSWORD,
        implicit_tls: bool = False,
    ) -> tuple[int, bytes]:
        """Submit with smtplib over STARTTLS (or implicit TLS) + AUTH; returns the final reply."""
        client: smtplib.SMTP
        if implicit_tls:
            client = smtplib.SMTP_SSL(
                "127.0.0.1", self.ports["submissions"], timeout=30, context=tls_client_context()
            )
        else:
            client = smtplib.SMTP("127.0.0.1", self.ports["submission"], timeout=30)
            client.starttls(context=tls_client_context())
        with client:
            client.login(sender, password)
            client.mail(sender)
            for r in recipients:
                code, text = client.rcpt(r)
                assert code == 250, (r, code, text)
            return client.data(message)

    def trace(self, ident: str) -> dict[str, Any]:
        import json

        r = self.cli("trace", ident, "--json")
        assert r.returncode == 0, r.stderr
        return dict(json.loads(r.stdout))

    def wait_for(self, predicate: Any, timeout: float = 20.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}\n--- log ---\n{self.log_text()[-3000:]}")


def maildir_messages(path: Path) -> list[Path]:
    return sorted(p for sub in ("new", "cur") if (path / sub).is_dir() for p in (path / sub).iterdir())


def running(installation: Installation) -> Iterator[Installation]:
    installation.start()
    try:
        yield installation
    finally:
        installation.stop()


def mbox_messages(path: Path) -> list[bytes]:
    """The messages of an mbox file as Python's mailbox module reads them."""
    import mailbox

    if not path.exists():
        return []
    box = mailbox.mbox(path, create=False)
    try:
        return [box.get_bytes(key) for key in box.keys()]  # noqa: SIM118 - mbox order
    finally:
        box.close()


def ids(pid: int) -> tuple[list[int], list[int], str]:
    """A process's (real, effective, saved, filesystem) uids and gids and its
    supplementary groups, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return [int(x) for x in fields["Uid"].split()], [int(x) for x in fields["Gid"].split()], fields["Groups"].strip()


class Daemons:
    """Single daemons of an installation started the way supervisord starts them
    (`python -m msa --config FILE`): what each prints (stdout and stderr) goes to a
    file of the test's, and each writes its log where the config says."""

    def __init__(self, inst: Installation) -> None:
        self.inst = inst
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, module: str) -> subprocess.Popen[bytes]:
        log = open(self.log_path(module), "ab")  # noqa: SIM115 - the child keeps it
        proc = subprocess.Popen(
            [sys.executable, "-m", module, "--config", str(self.inst.config_path)],
            stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[2],
            start_new_session=True,
        )
        log.close()
        self.procs[module] = proc
        return proc

    def log_path(self, module: str) -> Path:
        return self.inst.root.parent / f"{self.inst.root.name}-{module}.log"

    def output(self, module: str) -> str:
        """What the daemon printed (the one line of a daemon that cannot start)."""
        return self.log_path(module).read_text(errors="replace")

    def log(self, module: str) -> str:
        """What the daemon printed, then its log file ([mailroom] log_dir/PROGRAM.log)."""
        program = module.rsplit(".", 1)[-1]  # mta.qmgr -> qmgr
        return self.output(module) + self.inst.log(program)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
