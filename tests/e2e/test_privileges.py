"""Least privilege, end to end: the daemons never serve as root, and nothing is open to others.

Started as root (as CI and a production host start them), every daemon binds
its listeners, loads its TLS key, becomes the Mailroom user and only then
listens; `mailroom init` as root creates that user (`mailroom`) and gives it
a private installation.  Each test runs the real processes and reads what the
kernel says: uids from /proc, owners and modes from stat.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.users import add_user
from tests.support import peers
from tests.support.ports import free_port
from tests.support.suite import Daemons, Installation, ids, maildir_messages, wait_port

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
ALICE = "alice@example.org"
# The daemons with a listener, and the setting each one binds first.
RUNUSER = shutil.which("runuser") or "/usr/sbin/runuser"
LISTENING = [("msa", "submission"), ("mta", "smtp"), ("mda", "lmtp")]


@pytest.fixture
def inst(tmp_path: Path) -> Iterator[Installation]:
    peers.require_root("starting the daemons as root")
    yield Installation(tmp_path / "mailroom")


@pytest.fixture
def daemons(inst: Installation) -> Iterator[Daemons]:
    d = Daemons(inst)
    try:
        yield d
    finally:
        d.stop()


def mailroom_user() -> pwd.struct_passwd:
    return pwd.getpwnam("mailroom")


def test_init_as_root_writes_the_mailroom_system_user_into_the_config(inst: Installation) -> None:
    pw = mailroom_user()
    assert pw.pw_shell.endswith("nologin") and pw.pw_dir == "/nonexistent"
    assert 0 < pw.pw_uid < 1000  # a system account
    assert inst.config.mailroom.user == "mailroom"
    assert (inst.root.stat().st_uid, inst.root.stat().st_gid) == (pw.pw_uid, pw.pw_gid)


def test_init_as_root_creates_a_missing_user_without_login_or_home(tmp_path: Path) -> None:
    peers.require_root("creating a system user")
    name = f"mrtest{os.getpid() % 100000}"
    subprocess.run(["userdel", name], capture_output=True, check=False)
    try:
        r = subprocess.run(
            [sys.executable, "-m", "cli.main", "init", "--dir", str(tmp_path / "m"), "--domain", "example.org",
             "--user", name],
            capture_output=True, text=True, cwd=ROOT, timeout=60,
        )
        assert r.returncode == 0, r.stderr
        pw = pwd.getpwnam(name)
        assert pw.pw_shell.endswith("nologin") and pw.pw_dir == "/nonexistent" and pw.pw_uid < 1000
        assert f'user = "{name}"' in (tmp_path / "m" / "mailroom.toml").read_text()
        assert (tmp_path / "m" / "mailroom.db").stat().st_uid == pw.pw_uid
    finally:
        subprocess.run(["userdel", name], capture_output=True, check=False)


@pytest.mark.parametrize(("module", "key"), LISTENING)
def test_a_connection_made_as_soon_as_the_port_opens_is_served_by_the_mailroom_user(
    inst: Installation, daemons: Daemons, module: str, key: str
) -> None:
    pw = mailroom_user()
    for f in inst.root.glob("mailroom.db*"):
        f.unlink()  # the daemon creates the database itself, after the switch
    port = inst.ports[key]
    proc = daemons.start(module)
    deadline = time.monotonic() + 60
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                # The port has just opened: who is the process behind it?
                uid, gid, groups = ids(proc.pid)
                s.settimeout(30)
                greeting = s.recv(512)
                break
        assert proc.poll() is None, daemons.log(module)
        assert time.monotonic() < deadline, daemons.log(module)
    assert uid == [pw.pw_uid] * 4, daemons.log(module)
    assert gid == [pw.pw_gid] * 4
    assert groups == ""  # root's supplementary groups are gone too
    assert greeting.startswith(b"220 "), greeting
    db_files = sorted(inst.root.glob("mailroom.db*"))
    assert db_files and all(f.stat().st_uid == pw.pw_uid for f in db_files), db_files
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in db_files)
    assert "dropped privileges to mailroom" in daemons.log(module)


def _open_to_others(root: Path) -> list[str]:
    found = []
    # Dovecot sets the modes of its own runtime files: the socket folder its login
    # processes (chrooted there) need, and the list of its instances.  They hold no
    # mail and no secret, and lie behind run/, which is the Mailroom user's alone.
    dovecot_sockets = root / "run" / "dovecot" / "run"
    dovecot_own = {dovecot_sockets, root / "run" / "dovecot" / "state" / "instances"}
    if dovecot_sockets.exists():
        assert stat.S_IMODE((root / "run").stat().st_mode) == 0o700
    for folder, dirs, files in os.walk(root):
        if Path(folder) == dovecot_sockets or dovecot_sockets in Path(folder).parents:
            continue
        for name in [*dirs, *files]:
            path = Path(folder, name)
            st = path.lstat()
            if path not in dovecot_own and not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o007:
                found.append(f"{stat.S_IMODE(st.st_mode):04o} {path}")
    return found


def test_after_init_and_a_delivery_every_daemon_is_the_mailroom_user_and_nothing_is_open_to_others(
    suite: Installation,
) -> None:
    pw = mailroom_user()
    code, _ = suite.submit(ALICE, [ALICE, "bob@example.org"], b"From: alice@example.org\r\nSubject: x\r\n\r\nhi\r\n")
    assert code == 250
    inbox = suite.mailbox(ALICE)
    suite.wait_for(lambda: len(maildir_messages(inbox)) == 1, what="the delivery")
    for program in ("msa", "mta", "qmgr", "mda"):
        uid, gid, _ = ids(suite.program_pid(program))
        assert uid == [pw.pw_uid] * 4, program
        assert gid == [pw.pw_gid] * 4, program
    assert _open_to_others(suite.root) == []
    # What the daemons wrote (mailboxes, the database, sockets) is the Mailroom user's.
    written = [inbox, *maildir_messages(inbox), suite.mailbox("bob@example.org"), *suite.root.glob("mailroom.db*"),
               suite.root / "run" / "qmgr.sock"]
    assert {p.stat().st_uid for p in written} == {pw.pw_uid}, written
    # The DKIM keys init made as root are the MTA's to read, and nobody else's.
    keys = [suite.root / "dkim", *(suite.root / "dkim").iterdir()]
    assert len(keys) >= 3 and {p.stat().st_uid for p in keys} == {pw.pw_uid}, keys


@pytest.mark.parametrize("module", ["msa", "mta", "mta.qmgr", "mda"])
def test_started_as_root_without_a_user_a_daemon_refuses_with_one_line(
    inst: Installation, daemons: Daemons, module: str
) -> None:
    inst.set("mailroom", "user", '""')
    proc = daemons.start(module)
    assert proc.wait(60) == 78
    lines = daemons.output(module).splitlines()
    assert len(lines) == 1, lines
    assert "started as root with no [mailroom] user" in lines[0] and 'set user = "mailroom"' in lines[0]


def test_started_as_root_without_a_user_mailroom_run_refuses_before_starting_anything(inst: Installation) -> None:
    inst.set("mailroom", "user", '""')
    r = inst.cli("run")
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "started as root with no [mailroom] user" in r.stderr, r.stderr
    assert not (inst.root / "run" / "supervisord.pid").exists()


def test_a_world_readable_database_key_and_config_are_made_private_at_start(
    inst: Installation, daemons: Daemons
) -> None:
    private = [inst.root / "mailroom.db", inst.root / "tls" / "key.pem", inst.config_path]
    for f in private:
        f.chmod(0o644)
    os.chown(inst.root / "mailroom.db", 0, 0)  # as if root had made it
    daemons.start("mda")
    wait_port(inst.ports["lmtp"], 60)
    assert [stat.S_IMODE(f.stat().st_mode) for f in private] == [0o600] * 3
    assert (inst.root / "mailroom.db").stat().st_uid == mailroom_user().pw_uid
    log = daemons.log("mda")
    for f in private:
        assert f"{f} was readable by others (mode 0644): made it 0600" in log, log


def test_a_root_owned_installation_is_refused_with_the_fix(inst: Installation, daemons: Daemons) -> None:
    os.chown(inst.root, 0, 0)  # the folder is root's: SQLite cannot create its journal there
    proc = daemons.start("msa")
    assert proc.wait(60) == 78
    assert f"msa: running as mailroom, cannot create files in {inst.root}: give mailroom the installation's " \
           f"folder (chown -R mailroom: {inst.root})" in daemons.log("msa")


def test_a_key_that_cannot_be_loaded_is_one_line(inst: Installation, daemons: Daemons) -> None:
    (inst.root / "tls" / "key.pem").write_text("not a key\n")
    proc = daemons.start("mta")
    assert proc.wait(60) == 78
    lines = daemons.output("mta").splitlines()
    assert len(lines) == 1 and lines[0].startswith("mta: [tls] cert = tls/cert.pem, key = tls/key.pem: "), lines


# --- a listener that cannot be bound -----------------------------------------------------


def test_a_port_in_use_stops_the_daemon_with_one_line_naming_the_setting(
    inst: Installation, daemons: Daemons
) -> None:
    port = inst.ports["smtp"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen(1)
        proc = daemons.start("mta")
        assert proc.wait(60) == 73
    assert daemons.output("mta") == f"[mta] smtp = 127.0.0.1:{port}: address already in use\n"


def test_an_address_not_on_this_host_is_one_line(inst: Installation, daemons: Daemons) -> None:
    inst.set("msa", "submissions", '"192.0.2.1:2465"')
    proc = daemons.start("msa")
    assert proc.wait(60) == 73
    assert daemons.output("msa") == "[msa] submissions = 192.0.2.1:2465: cannot assign requested address\n"


def test_a_port_in_use_stops_mailroom_run_with_that_line(inst: Installation) -> None:
    port = inst.ports["lmtp"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen(1)
        started = time.monotonic()
        r = inst.cli("run")
    assert r.returncode == 1
    assert r.stderr == f"mailroom run: [mda] lmtp = 127.0.0.1:{port}: address already in use\n"
    assert time.monotonic() - started < 30
    assert not (inst.root / "run" / "supervisord.pid").exists()


def test_a_mail_group_reads_the_mail_root_and_nothing_else(inst: Installation, daemons: Daemons) -> None:
    import grp
    import smtplib

    mail = grp.getgrnam("mail")  # Debian's; Dovecot's group would do the same
    inst.set("mailroom", "mail_group", '"mail"')
    add_user(inst, ALICE)
    daemons.start("mda")
    wait_port(inst.ports["lmtp"], 60)
    with smtplib.LMTP("127.0.0.1", inst.ports["lmtp"], timeout=30) as lmtp:
        assert lmtp.sendmail("bob@example.net", [ALICE], b"Subject: for the reader\r\n\r\nhi\r\n") == {}
    root = inst.config.mail_root
    message = maildir_messages(inst.mailbox(ALICE))[0]
    assert (stat.S_IMODE(root.stat().st_mode), root.stat().st_gid) == (0o2750, mail.gr_gid)
    for path in (message, message.parent, inst.mailbox(ALICE)):
        assert path.stat().st_gid == mail.gr_gid, path
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 in (0o040, 0o050), path  # group reads, others nothing
    assert stat.S_IMODE((inst.root / "mailroom.db").stat().st_mode) == 0o600
    assert ids(daemons.procs["mda"].pid)[2] == ""  # not through membership: the setgid mail root


# --- started as an ordinary user ------------------------------------------------------------


def _python_for(user: str) -> tuple[str, dict[str, str]]:
    """A Python interpreter `user` can run, with this checkout and its packages importable.

    The test's own interpreter may live where only root can reach it (a pyenv
    under /root); Debian's /usr/bin/python3 of the same version reads the same
    installed packages.
    """
    site = [p for p in sys.path if p.endswith("site-packages")]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": os.pathsep.join([str(ROOT), *site]), "HOME": "/nonexistent"}
    probe = subprocess.run([RUNUSER, "-u", user, "--", sys.executable, "-c", "pass"], capture_output=True)
    if probe.returncode == 0:
        return sys.executable, env
    system = "/usr/bin/python3"
    version = subprocess.run([system, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True,
                             text=True).stdout.strip()
    assert version == str(sys.version_info[:2]), f"no Python {sys.version_info[:2]} that {user} can run"
    return system, env


def _stop_session(run: subprocess.Popen[bytes]) -> None:
    """Stop `mailroom run` (runuser's child: runuser itself would kill it outright) and
    wait until every process of its session is gone, so the user can be deleted."""
    for task in Path(f"/proc/{run.pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            os.kill(int(child), signal.SIGTERM)
    deadline = time.monotonic() + 40
    while [p for p in peers.session_members(run.pid) if p != run.pid] and time.monotonic() < deadline:
        time.sleep(0.2)
    if [p for p in peers.session_members(run.pid) if p != run.pid]:
        os.killpg(run.pid, signal.SIGKILL)
    run.wait(30)


@pytest.fixture
def ordinary_user() -> Iterator[str]:
    peers.require_root("creating a throwaway user")
    name = f"mrdev{os.getpid() % 100000}"
    subprocess.run(["userdel", name], capture_output=True, check=False)
    subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True)
    try:
        yield name
    finally:
        r = subprocess.run(["userdel", name], capture_output=True, text=True, check=False)
        assert r.returncode == 0, r.stderr  # a process of it left behind would be a leak


def test_as_an_ordinary_user_init_and_run_serve_as_that_user(tmp_path: Path, ordinary_user: str) -> None:
    from tests.support.suite import PASSWORD, tls_client_context

    pw = pwd.getpwnam(ordinary_user)
    home = Path(tempfile.mkdtemp(prefix="mailroom-dev-"))
    try:
        os.chown(home, pw.pw_uid, pw.pw_gid)
        home.chmod(0o755)
        python, env = _python_for(ordinary_user)

        def as_user(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
            return subprocess.run([RUNUSER, "-u", ordinary_user, "--", python, "-m", "cli.main", *args],
                                  capture_output=True, text=True, env=env, cwd=home, timeout=120, **kw)  # type: ignore[call-overload]

        r = as_user("init", "--dir", str(home / "var"), "--domain", "example.org")
        assert r.returncode == 0, r.stderr
        conf = home / "var" / "mailroom.toml"
        text = conf.read_text()
        assert f'user = "{ordinary_user}"' in text
        # (The internal listener is a Unix socket in var/run: no port.)
        ports = {key: free_port() for key in ("2587", "2465", "2525", "2424")}
        for old, new in ports.items():
            text = text.replace(f":{old}\"", f":{new}\"")
        conf.write_text(text)
        r = as_user("--config", str(conf), "user", "add", ALICE, "--password-stdin", input=PASSWORD + "\n")
        assert r.returncode == 0, r.stderr
        # Binding a privileged port is the one thing an ordinary user cannot do: one line, exit 1.
        conf.write_text(text.replace(f'smtp = "127.0.0.1:{ports["2525"]}"', 'smtp = "127.0.0.1:25"'))
        r = as_user("--config", str(conf), "run")
        assert (r.returncode, r.stderr) == (1, "mailroom run: [mta] smtp = 127.0.0.1:25: permission denied\n")
        conf.write_text(text)
        log = open(home / "run.log", "wb")  # noqa: SIM115 - closed below
        # The output file is root's, as the terminal is after runuser or su from a root
        # shell: supervisord cannot reopen it by name, so `mailroom run` relays its output.
        run = subprocess.Popen([RUNUSER, "-u", ordinary_user, "--", python, "-m", "cli.main", "--config", str(conf),
                                "run"], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=home,
                               start_new_session=True)
        try:
            for port in ports.values():
                wait_port(port, 60)
            import smtplib

            with smtplib.SMTP("127.0.0.1", ports["2587"], timeout=30) as client:
                client.starttls(context=tls_client_context())
                client.login(ALICE, PASSWORD)
                assert client.sendmail(ALICE, [ALICE], b"Subject: dev\r\n\r\nhi\r\n") == {}
            box = home / "var" / "mail" / "example.org" / "alice"
            deadline = time.monotonic() + 30
            while not maildir_messages(box):
                assert time.monotonic() < deadline, (home / "run.log").read_text()[-3000:]
                time.sleep(0.1)
            served = [pid for pid in peers.session_members(run.pid) if pid != run.pid]  # runuser stays root
            # mailroom run (relaying the output), supervisord, its watcher, four daemons, web,
            # and Dovecot's processes where it runs: every one of them is the user.
            assert len(served) >= 8
            for pid in served:
                assert ids(pid)[0] == [pw.pw_uid] * 4
            # The MDA logs the delivery just after the file is in new/: wait for the line
            # (read at once it raced the log write on a loaded machine).  Its log is a
            # file of its own, the user's; `mailroom run`'s output has supervisord's lines.
            mda_log = home / "var" / "log" / "mda.log"
            while "delivered to=<alice@example.org>" not in (mda_log.read_text() if mda_log.exists() else ""):
                assert time.monotonic() < deadline, (home / "run.log").read_text()[-3000:]
                time.sleep(0.1)
            assert mda_log.stat().st_uid == pw.pw_uid and stat.S_IMODE(mda_log.stat().st_mode) == 0o600
            assert "success: mda entered RUNNING state" in (home / "run.log").read_text()
            assert _open_to_others(home / "var") == []
        finally:
            _stop_session(run)
            log.close()
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_a_daemon_that_cannot_start_under_supervisord_stops_mailroom_run_with_its_line(inst: Installation) -> None:
    # What the check before supervisord cannot see: the folder is root's, so no
    # daemon can open the database once it serves as mailroom.
    os.chown(inst.root, 0, 0)
    started = time.monotonic()
    r = inst.cli("run")
    assert r.returncode == 1, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"mailroom run: (msa|mta|qmgr|mda): running as mailroom, cannot create files in {re.escape(str(inst.root))}: "
        rf"give mailroom the installation's folder \(chown -R mailroom: {re.escape(str(inst.root))}\)", last
    ), r.stderr
    assert time.monotonic() - started < 60  # once, not a loop of restarts
    assert r.stdout.count("could not be started") == 0


def test_an_ipv6_listener_setting_is_bound_and_served(inst: Installation, daemons: Daemons) -> None:
    port = free_port("::1")
    inst.set("mta", "smtp", f'"[::1]:{port}"')
    daemons.start("mta")
    deadline = time.monotonic() + 60
    while True:
        with socket.socket(socket.AF_INET6) as s:
            if s.connect_ex(("::1", port)) == 0:
                s.settimeout(30)
                assert s.recv(512).startswith(b"220 ")
                break
        assert time.monotonic() < deadline, daemons.log("mta")
        time.sleep(0.05)
    assert f"SMTP listening on [::1]:{port}" in daemons.log("mta")


def test_init_as_root_says_when_the_mailroom_user_cannot_reach_the_folder(tmp_path: Path) -> None:
    peers.require_root("mailroom init as root")
    closed = Path(tempfile.mkdtemp(prefix="mailroom-closed-"))  # 0700, root's: as /root would be
    try:
        r = subprocess.run(
            [sys.executable, "-m", "cli.main", "init", "--dir", str(closed / "var"), "--domain", "example.org"],
            capture_output=True, text=True, cwd=ROOT, timeout=60,
        )
        assert r.returncode == 0, r.stderr
        assert r.stderr == (f"warning: mailroom cannot reach {closed}/var: {closed} is closed to it "
                            f"(chmod o+x {closed}, or choose a folder such as /srv/mailroom)\n")
    finally:
        shutil.rmtree(closed, ignore_errors=True)


def test_a_unix_socket_listener_belongs_to_the_mailroom_user(inst: Installation, daemons: Daemons) -> None:
    path = inst.root / "run" / "lmtp.sock"
    inst.set("mda", "lmtp", f'"unix:{path}"')
    daemons.start("mda")
    deadline = time.monotonic() + 60
    while not path.exists():
        assert time.monotonic() < deadline, daemons.log("mda")
        time.sleep(0.05)
    st = path.stat()
    assert stat.S_ISSOCK(st.st_mode) and st.st_uid == mailroom_user().pw_uid and stat.S_IMODE(st.st_mode) == 0o600
    while True:
        with socket.socket(socket.AF_UNIX) as s:
            if s.connect_ex(str(path)) == 0:
                s.settimeout(30)
                assert s.recv(512).startswith(b"220 ")
                break
        assert time.monotonic() < deadline, daemons.log("mda")
        time.sleep(0.05)
