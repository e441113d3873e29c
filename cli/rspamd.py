"""rspamd and its Redis, run by `mailroom run` (`[filter] rspamd = "supervised"`).

`mailroom run` writes RUN_DIR/rspamd/ (rspamd's LOCAL_CONFDIR: a few files in
local.d/ and override.d/ on top of Debian's stock /etc/rspamd/rspamd.conf) and
RUN_DIR/redis/redis.conf, checks rspamd's configuration with `rspamadm
configtest` (as it checks that Dovecot can run), and adds two supervisord
programs, `redis` and `rspamd`.  Nothing of the system's rspamd or Redis
service is used or changed: Debian starts its own rspamd on 11333/11334 and
Redis on 6379 when the packages are installed, so ours use other ports.

What the generated configuration says, and why:
- every worker listens on loopback only (`[filter] scanner`, `controller`,
  `redis`; the config check refuses anything else): the scanner is what the
  MTA asks (mta/contentfilter.py), the controller is where IMAP moves teach
  Bayes (cli/dovecot.py), Redis keeps the statistics;
- the controller wants a password, RUN_DIR/rspamd/controller.secret (made on
  first use, owner-only), and trusts no address without it (Debian's stock
  file trusts 127.0.0.1 with the password "q1"); only rspamd's hash of it is
  in the configuration.  Learning from IMAP goes through a second controller
  socket, a Unix socket only the Mailroom user can open (rspamd takes a
  connection on a Unix socket as trusted), so the password is never on a
  command line;
- Redis wants a password too (RUN_DIR/rspamd/redis.secret), keeps its data in
  RUN_DIR/redis (snapshots, so Bayes survives a restart) and binds only to
  its loopback address;
- rspamd asks the DNS servers the daemons ask (`resolvers`); its DNS
  blocklists (the `rbl` module: Spamhaus, Mailspike, ...) are on only when
  those servers are on this host, because the blocklist operators refuse
  queries that come through the big public resolvers (`dnsbl_active`);
- Bayes needs `[filter] bayes_min_learns` messages of each class before it
  scores; the proxy worker and the fuzzy storage worker are off (the stock
  fuzzy check still asks rspamd.com's public fuzzy storage).
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import subprocess
from pathlib import Path

from common.config import Config, parse_hostport
from common.privileges import Account

RSPAMD = "/usr/bin/rspamd"
RSPAMADM = "/usr/bin/rspamadm"
RSPAMC = "/usr/bin/rspamc"
REDIS = "/usr/bin/redis-server"
STOCK_CONFIG = "/etc/rspamd/rspamd.conf"
# Unix socket paths are limited to 107 bytes.
MAX_SOCKET_PATH = 100


def conf_dir(cfg: Config) -> Path:
    return cfg.run_dir.resolve() / "rspamd"


def redis_dir(cfg: Config) -> Path:
    return cfg.run_dir.resolve() / "redis"


def find(program: str) -> str | None:
    return program if os.access(program, os.X_OK) else shutil.which(Path(program).name)


def installed() -> bool:
    """Are Debian's rspamd and redis-server there?  (`mailroom init` turns the filter on then.)"""
    return find(RSPAMD) is not None and find(REDIS) is not None


def secret(cfg: Config, name: str) -> str:
    """The installation's secret `name` (RUN_DIR/rspamd/NAME.secret), made owner-only on first use."""
    folder = conf_dir(cfg)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = folder / f"{name}.secret"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first
        return path.read_text().strip()
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(24) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return path.read_text().strip()


def resolvers(cfg: Config) -> list[str]:
    """host:port of the DNS servers rspamd asks: the daemons' own, so that blocklist
    operators see one local resolver (the supervised unbound with `[dns] resolver =
    "unbound"`, else `[dns] nameservers`, else the system's)."""
    if cfg.dns.resolver == "unbound":
        return [_with_port(cfg.dns.unbound_listen)]
    if cfg.dns.nameservers:
        return [_with_port(s) for s in cfg.dns.nameservers]
    return [_with_port(s) for s in system_nameservers()]


def system_nameservers(path: Path = Path("/etc/resolv.conf")) -> list[str]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    return [parts[1] for line in lines if len(parts := line.split()) >= 2 and parts[0] == "nameserver"]


def _with_port(server: str) -> str:
    try:
        ipaddress.ip_address(server)
        host, port = server, 53
    except ValueError:
        host, port = parse_hostport(server, 53)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _is_local(server: str) -> bool:
    host = server.rsplit(":", 1)[0].strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def dnsbl_active(cfg: Config) -> bool:
    """Are DNS blocklist checks on?  Yes with a supervised rspamd whose resolvers are all on
    this host (a caching resolver of our own; the public resolvers are refused by the
    blocklist operators, and their "listed" answers then mean nothing)."""
    servers = resolvers(cfg)
    return cfg.filter.supervised and bool(servers) and all(_is_local(s) for s in servers)


def why_not(cfg: Config) -> str | None:
    """One line saying why the supervised rspamd will not run, or None when it will."""
    if not cfg.filter.supervised:
        return "rspamd is not run by Mailroom ([filter] rspamd is not \"supervised\")"
    for program, package in ((RSPAMD, "rspamd"), (REDIS, "redis-server")):
        if find(program) is None:
            return (f"the content filter is down: {program} is not installed (apt-get install {package}); "
                    f"[filter] when_down = {cfg.filter.when_down!r} decides what happens to mail")
    return None


def learn_socket(cfg: Config) -> Path:
    """The controller's Unix socket for learning (trusted by rspamd; the Mailroom user's alone)."""
    natural = conf_dir(cfg) / "run" / "learn.sock"
    if len(str(natural)) <= MAX_SOCKET_PATH:
        return natural
    import hashlib
    import tempfile

    digest = hashlib.sha256(str(cfg.run_dir.resolve()).encode()).hexdigest()[:12]
    short = Path(tempfile.gettempdir()) / f"mailroom-rspamd-{os.geteuid()}-{digest}"
    short.mkdir(mode=0o700, exist_ok=True)
    if short.is_symlink() or short.lstat().st_uid != os.geteuid():
        raise RuntimeError(f"{short} exists and is not ours; remove it")
    return short / "learn.sock"


def _hash_password(password: str) -> str:
    rspamadm = find(RSPAMADM) or RSPAMADM
    out = subprocess.run([rspamadm, "pw", "--encrypt", "-p", password], capture_output=True, text=True, timeout=30)
    hashed = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    if out.returncode != 0 or not hashed.startswith("$"):
        raise RuntimeError(f"rspamadm pw failed: {out.stderr.strip() or out.stdout.strip()}")
    return hashed


def _ucl(text: str) -> str:
    """A UCL string literal."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render(cfg: Config, account: Account | None) -> Path:
    """Write rspamd's LOCAL_CONFDIR and redis.conf; returns the LOCAL_CONFDIR."""
    f = cfg.filter
    d = conf_dir(cfg)
    for sub in ("local.d", "override.d", "db", "run", "log"):
        (d / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
    rdir = redis_dir(cfg)
    rdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    sock = learn_socket(cfg)
    redis_host, redis_port = parse_hostport(f.redis)
    controller_hash = _hash_password(secret(cfg, "controller"))
    redis_password = secret(cfg, "redis")
    owner = f" owner={account.name}" if account is not None else ""
    files = {
        # override.d replaces the keys it names: the stock file's `password = "q1"` and
        # `secure_ip = 127.0.0.1` (loopback needs no password) must each be named.
        "override.d/worker-normal.inc": f"bind_socket = {_ucl(f.scanner)};\ncount = 1;\nmime = true;\n",
        "override.d/worker-controller.inc": (
            f"bind_socket = {_ucl(f.controller)};\n"
            f"bind_socket = {_ucl(f'{sock} mode=0600{owner}')};\n"
            f"count = 1;\npassword = {_ucl(controller_hash)};\nenable_password = {_ucl(controller_hash)};\n"
            "secure_ip = [];\n"
            'static_dir = "${WWWDIR}";\n'
        ),
        "override.d/worker-proxy.inc": "enabled = false;\n",
        "override.d/worker-fuzzy.inc": "enabled = false;\n",
        "override.d/logging.inc": 'type = "console";\nlevel = "notice";\nsystemd = false;\n',
        "local.d/redis.conf": f"servers = {_ucl(f'{redis_host}:{redis_port}')};\npassword = {_ucl(redis_password)};\n",
        "local.d/classifier-bayes.conf": f'backend = "redis";\nmin_learns = {f.bayes_min_learns};\n',
        "local.d/options.inc": _options(cfg),
        "local.d/actions.conf": f"add_header = {f.spam_score};\n",
        # The blocklists: on only behind a resolver of our own (see dnsbl_active).
        "override.d/rbl.conf": "" if dnsbl_active(cfg) else "enabled = false;\n",
    }
    for name, text in files.items():
        path = d / name
        if text:
            _write_private(path, f"# Generated by `mailroom run` from {cfg.path}: edit that file, not this one.\n"
                           + text)
        else:
            path.unlink(missing_ok=True)
    _write_private(rdir / "redis.conf", _redis_conf(cfg, redis_host, redis_port, redis_password))
    if account is not None:
        for top in (d, rdir, sock.parent):
            os.chown(top, account.uid, account.gid)
            for folder, dirs, names in os.walk(top):
                for name in dirs + names:
                    os.chown(os.path.join(folder, name), account.uid, account.gid, follow_symlinks=False)
    return d


def _options(cfg: Config) -> str:
    servers = ", ".join(_ucl(s) for s in resolvers(cfg))
    return (
        f"dns {{\n  nameserver = [{servers}];\n  timeout = 2s;\n  retransmits = 2;\n}}\n"
        # Mail from loopback is checked like any other: the MTA passes the real client
        # address in the IP header, and only the MTA talks to the scanner.
        "local_addrs = [];\n"
    )


def _redis_conf(cfg: Config, host: str, port: int, password: str) -> str:
    return f"""\
# Generated by `mailroom run` from {cfg.path}: edit that file, not this one.
# The Redis of the supervised rspamd (Bayes statistics, greylisting, rate limits).
bind {host}
port {port}
protected-mode yes
requirepass {password}
unixsocket ""
daemonize no
supervised no
logfile ""
loglevel warning
dir {redis_dir(cfg)}
dbfilename dump.rdb
save 900 1
save 300 10
save 60 10000
appendonly no
"""


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def rspamd_argv(cfg: Config) -> list[str]:
    """How supervisord starts rspamd: Debian's stock configuration under our LOCAL_CONFDIR."""
    d = conf_dir(cfg)
    return [
        find(RSPAMD) or RSPAMD, "-f", "-c", STOCK_CONFIG, "--var", f"LOCAL_CONFDIR={d}", "--var", f"DBDIR={d}/db",
        "--var", f"RUNDIR={d}/run", "--var", f"LOGDIR={d}/log", "-p", f"{d}/run/rspamd.pid",
    ]


def check(cfg: Config) -> str | None:
    """`rspamadm configtest` on the generated configuration: None when good, else its complaint."""
    d = conf_dir(cfg)
    # rspamadm takes its --var options only as --var=NAME=VALUE, before the command.
    argv = [find(RSPAMADM) or RSPAMADM, f"--var=LOCAL_CONFDIR={d}", f"--var=DBDIR={d}/db",
            f"--var=RUNDIR={d}/run", f"--var=LOGDIR={d}/log", "configtest", "-c", STOCK_CONFIG]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"rspamadm configtest could not run: {exc}"
    if out.returncode != 0 or "syntax OK" not in out.stdout:
        text = " ".join((out.stdout + out.stderr).split())
        return f"rspamd's configuration is refused by rspamadm configtest: {text[-400:]}"
    return None


def prepare(cfg: Config, account: Account | None) -> str | None:
    """For `mailroom run`: write and check the configurations.

    Returns one line saying why rspamd will not run, or None when it will.
    """
    reason = why_not(cfg)
    if reason is not None:
        return reason
    try:
        render(cfg, account)
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        return f"the content filter is down: rspamd's configuration could not be written: {exc}"
    problem = check(cfg)
    if problem is not None:
        return f"the content filter is down: {problem}"
    return None


_PROGRAMS = """
[program:redis]
command = {redis} {redis_conf}
priority = 3
{user}{common}

[program:rspamd]
command = {rspamd}
priority = 4
{user}{common}
"""


def programs(cfg: Config, common: str, account: Account | None) -> str:
    """The supervisord programs `redis` and `rspamd`."""
    user = f"user = {account.name}\n" if account is not None else ""
    return _PROGRAMS.format(
        redis=find(REDIS) or REDIS, redis_conf=redis_dir(cfg) / "redis.conf",
        rspamd=" ".join(rspamd_argv(cfg)), user=user, common=common,
    )
