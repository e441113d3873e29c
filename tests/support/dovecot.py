"""Dovecot as an independent reader of our mailboxes, and as an LMTP peer, for tests.

If Dovecot (what most of our users will read their mail with) counts, lists and
fetches our Maildirs and mbox files the way we meant them, the files are right
by more than our own reading. `doveadm` runs with a throwaway config (no system
config, no service) on a *copy* of the store: Dovecot writes index, uidlist and
status data (and may rewrite an mbox), and the store under test must stay ours.

`DovecotLMTP` runs a private Dovecot with only the LMTP service on one loopback
port, delivering to Maildirs in a temporary directory: the real LMTP server our
MTA can hand mail to.

Dovecot refuses mail access as root, so mail is read and written as the Debian
"mail" user (uid 8); the helpers run as root and make the paths reachable.

`reading_installation` prepares a Mailroom installation whose own Dovecot (the
`imap` program of `mailroom run`) serves IMAP and POP3; `IMAPClient` and
`POP3Client` are imaplib/poplib with the installation's self-signed
certificate accepted and, for the plain-text checks, a chosen source address.
"""

from __future__ import annotations

import imaplib
import itertools
import json
import os
import poplib
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from .peers import free_port, make_searchable, reap_session, require, require_root, wait_for_port
from .suite import PASSWORD, Installation, tls_client_context

MAIL_USER = "mail"

_instance_numbers = itertools.count(1)


def _mail_ids() -> tuple[int, int]:
    entry = pwd.getpwnam(MAIL_USER)
    return entry.pw_uid, entry.pw_gid


def _chown_tree(top: Path, uid: int, gid: int) -> None:
    os.chown(top, uid, gid)
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)


# -- doveadm on a copy of a store ---------------------------------------------------


def fetch(store: Path, fields: Sequence[str], search: Sequence[str] = ("all",)) -> list[dict[str, str]]:
    """Run `doveadm fetch FIELDS mailbox INBOX SEARCH` on a copy of `store`.

    `store` is a Maildir (a directory with cur/ and new/) or an mbox file. Returns one
    dict per message in Dovecot's order (its UIDs), keyed by field name. Non-UTF-8
    bytes in the mail come back as U+FFFD.
    """
    require_root("doveadm on a throwaway store")
    doveadm = require("doveadm")
    store = Path(store)
    uid, gid = _mail_ids()
    # The copy goes under the system temp dir, owned by the mail user, so Dovecot
    # (after dropping root) can write its index files next to it.
    work = Path(tempfile.mkdtemp(prefix="mailroom-doveadm-"))
    try:
        make_searchable(work)
        if (store / "cur").is_dir() or (store / "new").is_dir():
            shutil.copytree(store, work / "Maildir")
            location = f"maildir:{work}/Maildir"
        elif store.is_file():
            (work / "mbox").mkdir()
            shutil.copy2(store, work / "inbox")
            location = f"mbox:{work}/mbox:INBOX={work}/inbox"
        else:
            raise FileNotFoundError(f"not a Maildir or an mbox file: {store}")
        _chown_tree(work, uid, gid)
        config = work / "doveadm.conf"
        config.write_text(
            f"mail_location = {location}:INDEX=MEMORY\n"
            f"mail_uid = {uid}\nmail_gid = {gid}\n"
            f"first_valid_uid = {uid}\nfirst_valid_gid = {gid}\n"
            f"base_dir = {work}/run\nstate_dir = {work}/state\n"
            "log_path = /dev/stderr\n"
        )
        # Without -u, doveadm uses $USER and skips the userdb (no auth service runs).
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "USER": MAIL_USER, "HOME": str(work)}
        cmd = [doveadm, "-c", str(config), "-f", "json", "fetch", " ".join(fields)]
        cmd += ["mailbox", "INBOX", *search]
        result = subprocess.run(cmd, capture_output=True, env=env, timeout=60, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"doveadm fetch failed ({result.returncode}): {result.stderr.decode(errors='replace')}")
        out = result.stdout.decode(errors="replace").strip()
        rows: list[dict[str, str]] = json.loads(out) if out else []
        return rows
    finally:
        shutil.rmtree(work, ignore_errors=True)


def message_count(store: Path) -> int:
    """Number of messages Dovecot sees in a Maildir or mbox file."""
    return len(fetch(store, ["uid"]))


def subjects(store: Path, *, decoded: bool = True) -> list[str]:
    """Subject header of every message, in Dovecot's order (sort before comparing).

    decoded=True gives Dovecot's RFC 2047-decoded, unfolded text (hdr.subject.utf8);
    decoded=False gives the raw header value as stored, folding included.
    """
    field = "hdr.subject.utf8" if decoded else "hdr.subject"
    return [row[field] for row in fetch(store, [field])]


def fetch_body(store: Path, seq: int = 1) -> str:
    """Body (after the header's blank line, line ends as stored) of message `seq` (1-based)."""
    rows = fetch(store, ["body"], [str(seq)])
    if not rows:
        raise IndexError(f"no message {seq} in {store}")
    return rows[0]["body"]


def fetch_message(store: Path, seq: int = 1) -> str:
    """Whole message (header and body, line ends as stored) number `seq` (1-based)."""
    rows = fetch(store, ["text"], [str(seq)])
    if not rows:
        raise IndexError(f"no message {seq} in {store}")
    return rows[0]["text"]


# -- Dovecot as an LMTP server ---------------------------------------------------------


class DovecotLMTP:
    """A private Dovecot with only LMTP on 127.0.0.1:`port`, storing under `root`.

    Every recipient is accepted (static userdb) and delivered to the Maildir
    `maildir(address)` = root/mail/<lowercased address>; Dovecot's own index and
    control files go elsewhere, so those Maildirs hold only tmp/, new/, cur/ and
    Dovecot's empty `maildirfolder` marker.
    """

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = Path(root).resolve()
        self.port = port if port is not None else free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.config_file = self.root / "dovecot.conf"
        self.log_file = self.root / "dovecot.log"
        self.mail_dir = self.root / "mail"
        self.process: subprocess.Popen[bytes] | None = None
        self._name = f"mailroom-lmtp-{os.getpid()}-{next(_instance_numbers)}"

    def write_config(self) -> None:
        """Create the directories and write dovecot.conf (start() calls this)."""
        uid, gid = _mail_ids()
        r = self.root
        for sub in ("mail", "home", "index", "run", "state"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        for sub in ("mail", "home", "index"):
            os.chown(r / sub, uid, gid)
        make_searchable(r)
        location = f"maildir:{r}/mail/%Lu:INDEX={r}/index/%Lu:CONTROL={r}/index/%Lu"
        self.config_file.write_text(
            f"""\
# No include of /etc/dovecot: this instance must not depend on the system config.
base_dir = {r}/run
state_dir = {r}/state
instance_name = {self._name}
protocols = lmtp
listen = 127.0.0.1
log_path = {self.log_file}
ssl = no
first_valid_uid = {uid}
first_valid_gid = {gid}
passdb {{
  driver = static
  args = nopassword=y
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={r}/home/%Lu mail={location}
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {self.port}
  }}
}}
"""
        )

    def start(self, timeout: float = 20.0) -> DovecotLMTP:
        """Start `dovecot -F -c CONFIG` and wait until the LMTP port answers."""
        require_root("DovecotLMTP")
        self.write_config()
        log = open(self.root / "dovecot.stderr", "wb")  # noqa: SIM115 -- lives as long as Dovecot
        # A new session lets stop() find every process of this instance by session id.
        self.process = subprocess.Popen(
            [require("dovecot"), "-F", "-c", str(self.config_file)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        log.close()
        try:
            wait_for_port(self.port, timeout=timeout)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"Dovecot LMTP did not start:\n{self.log_text()}") from None
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop Dovecot by its pid and make sure none of its processes remain."""
        if self.process is None:
            return
        pid = self.process.pid
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        reap_session(pid, timeout)
        self.process = None

    def __enter__(self) -> DovecotLMTP:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def maildir(self, address: str) -> Path:
        """The Maildir Dovecot delivers `address` to."""
        return self.mail_dir / address.lower()

    def maildir_count(self, address: str) -> int:
        """Messages delivered to `address` (files in its Maildir's new/ and cur/)."""
        maildir = self.maildir(address)
        return sum(len(list((maildir / sub).glob("*"))) for sub in ("new", "cur"))

    def log_text(self) -> str:
        """Dovecot's log (log_path) plus anything it wrote to stderr."""
        parts = []
        for path in (self.log_file, self.root / "dovecot.stderr"):
            if path.exists():
                parts.append(path.read_text(errors="replace"))
        return "".join(parts)


# -- Mailroom's own Dovecot (the `imap` program) -----------------------------------------

# Who the daemons and Dovecot's mail processes run as in these tests, when the
# installation names nobody itself (Dovecot will not read mail as root).
READER_USER = "nobody"


def reading_installation(root: Path, users: Sequence[tuple[str, str, int]] = (), extra: str = "") -> Installation:
    """An installation with IMAP/POP3 on, users (address, store, quota) added, and the
    folder handed to its `[mailroom] user` as an operator would (chown), the TLS key
    staying root's."""
    require("dovecot")
    inst = Installation(root, extra=extra)
    inst.set("imap", "enabled", "true")
    for address, store, quota in users:
        r = inst.cli("user", "add", address, "--password-stdin", "--store", store, "--quota", str(quota),
                     stdin=PASSWORD + "\n")
        assert r.returncode == 0, r.stderr
    if os.geteuid() == 0:
        user = inst.config.mailroom.user
        if not user:
            user = READER_USER
            inst.set("mailroom", "user", f'"{user}"')
        pw = pwd.getpwnam(user)
        for folder, dirs, files in os.walk(root):
            if Path(folder).name == "tls":
                dirs[:] = []
                continue
            os.chown(folder, pw.pw_uid, pw.pw_gid)
            for name in files:
                os.chown(os.path.join(folder, name), pw.pw_uid, pw.pw_gid)
        make_searchable(root)  # pytest's tmp_path sits under root-only folders
    return inst


class IMAPClient(imaplib.IMAP4):
    """imaplib.IMAP4 from a chosen loopback source address (plain, until STARTTLS)."""

    def __init__(self, port: int, source: str = "127.0.0.1") -> None:
        self.source = source
        super().__init__("127.0.0.1", port, timeout=30)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout, source_address=(self.source, 0))


class _IMAPS(imaplib.IMAP4_SSL):
    def __init__(self, port: int, source: str) -> None:
        self.source = source
        super().__init__("127.0.0.1", port, ssl_context=tls_client_context(), timeout=30)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout, source_address=(self.source, 0))
        return self.ssl_context.wrap_socket(sock, server_hostname=self.host)


def imaps(port: int, source: str = "127.0.0.1") -> imaplib.IMAP4_SSL:
    """An IMAPS client from loopback address `source`.  Dovecot holds back every login,
    right or wrong, from an address that has just failed one (up to 15 s: its auth
    penalty), so a test that tries a wrong password and then a right one uses two."""
    return _IMAPS(port, source)


def imap_starttls(port: int, source: str = "127.0.0.1") -> IMAPClient:
    client = IMAPClient(port, source)
    client.starttls(ssl_context=tls_client_context())
    return client


class _POP3S(poplib.POP3_SSL):
    def __init__(self, port: int, source: str) -> None:
        self.source = source
        super().__init__("127.0.0.1", port, context=tls_client_context(), timeout=30)

    def _create_socket(self, timeout: float) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout, source_address=(self.source, 0))
        return self.context.wrap_socket(sock, server_hostname=self.host)


def pop3s(port: int, source: str = "127.0.0.1") -> poplib.POP3_SSL:
    """A POP3S client from loopback address `source` (see imaps)."""
    return _POP3S(port, source)
