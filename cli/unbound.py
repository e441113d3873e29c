"""A local validating resolver for the daemons: Debian's unbound, run by `mailroom run`.

With `[dns] resolver = "unbound"`, `mailroom run` writes RUN_DIR/unbound.conf
and supervisord runs `unbound -d -c RUN_DIR/unbound.conf` as the program
`unbound`, started before the daemons; each daemon's resolver then asks it
(common/daemon.py `resolver_settings`).  Nothing of /etc/unbound is used.

Why a local resolver: a caching resolver on the host keeps answers across
every daemon and message, retries and recurses by itself, validates DNSSEC
(whose AD flag DANE needs: the answer is trustworthy only when the
validation happened on this host), and DNS blocklists refuse queries that
come through the big public resolvers.  Mail-in-a-Box and mailcow run one
for the same reasons.

The configuration: loopback only (`[dns] unbound_listen`, answering
127.0.0.0/8 and ::1 alone), DNSSEC validation from `[dns] trust_anchor`
(the root's key, which Debian's dns-root-data keeps up to date), its cache
capped like the daemons' (`max_ttl`, `max_negative_ttl`), full recursion
from the root servers, or, when `[dns] nameservers` lists servers,
forwarding to them (validating what they answer).  Started as root it
becomes `[mailroom] user` after binding, like the daemons.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from common.config import Config, parse_hostport
from common.dns import validates_now

SEARCH_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")
CONFIG_NAME = "unbound.conf"

# Unbound in the foreground (-d), logging to stderr (which supervisord keeps).
_PROGRAM = """
[program:unbound]
command = {unbound} -d -c {conf}
priority = 3
{common}
"""


def find_unbound() -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), *SEARCH_DIRS])
    return shutil.which("unbound", path=path)


def config_file(cfg: Config) -> Path:
    return cfg.run_dir.resolve() / CONFIG_NAME


def render(cfg: Config, *, user: str | None = None) -> str:
    """unbound.conf for this installation (`user`: whom to become after binding, if root)."""
    host, port = parse_hostport(cfg.dns.unbound_listen)
    d = cfg.dns
    lines = [
        "# Written by `mailroom run` from the [dns] settings; changes here are lost.",
        "server:",
        f"    interface: {host}",
        f"    port: {port}",
        "    do-ip4: yes",
        "    do-ip6: yes",
        "    do-udp: yes",
        "    do-tcp: yes",
        "    access-control: 0.0.0.0/0 refuse",
        "    access-control: ::0/0 refuse",
        "    access-control: 127.0.0.0/8 allow",
        "    access-control: ::1/128 allow",
        f'    username: "{user or ""}"',
        '    chroot: ""',
        f'    directory: "{cfg.run_dir.resolve()}"',
        '    pidfile: ""',
        "    use-syslog: no",
        '    logfile: ""',
        "    log-servfail: yes",
        "    verbosity: 1",
        "    val-log-level: 2",
        "    num-threads: 1",
        '    module-config: "validator iterator"',
        f'    trust-anchor-file: "{cfg.resolve(d.trust_anchor)}"',
        "    harden-dnssec-stripped: yes",
        "    harden-glue: yes",
        "    qname-minimisation: yes",
        "    prefetch: yes",
        f"    cache-max-ttl: {int(d.max_ttl)}",
        f"    cache-max-negative-ttl: {int(d.max_negative_ttl)}",
        "    hide-identity: yes",
        "    hide-version: yes",
        # The forwarders below may be on this host (a lab, a test zone).
        "    do-not-query-localhost: no",
        "remote-control:",
        "    control-enable: no",
    ]
    if d.nameservers:
        # The servers forwarded to answer for every name, the special-use ones that
        # unbound otherwise answers itself too ("test.", RFC 6761: a lab, a test zone).
        # ... and no trust anchor reaches them, so they are taken as unsigned unless an
        # anchor of their own says otherwise.
        at = lines.index("remote-control:")
        lines[at:at] = ['    local-zone: "test." nodefault', '    domain-insecure: "test."']
        lines += ["forward-zone:", '    name: "."']
        for ns in d.nameservers:
            ns_host, ns_port = parse_hostport(ns, 53)
            lines.append(f"    forward-addr: {ns_host}@{ns_port}")
    return "\n".join(lines) + "\n"


def why_not(cfg: Config) -> str | None:
    """One line saying why unbound cannot be run for `cfg`, or None."""
    if find_unbound() is None:
        return "[dns] resolver = \"unbound\": unbound is not installed (apt-get install unbound)"
    anchor = cfg.resolve(cfg.dns.trust_anchor)
    if not anchor.is_file():
        return f"[dns] trust_anchor = {anchor}: no such file (apt-get install dns-root-data)"
    return None


def prepare(cfg: Config, *, user: str | None = None) -> str | None:
    """For `mailroom run`: write unbound.conf and check it with unbound-checkconf.
    Returns one line saying why unbound will not run, or None when it will."""
    reason = why_not(cfg)
    if reason is not None:
        return reason
    conf = config_file(cfg)
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(render(cfg, user=user))
    conf.chmod(0o644)
    checker = shutil.which("unbound-checkconf", path=os.pathsep.join([os.environ.get("PATH", ""), *SEARCH_DIRS]))
    if checker is not None:
        done = subprocess.run([checker, str(conf)], capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            return f"unbound.conf: {(done.stderr or done.stdout).strip().splitlines()[-1]}"
    return None


def program(cfg: Config, common: str) -> str:
    """The supervisord program block for unbound ("" unless `[dns] resolver = "unbound"`)."""
    if cfg.dns.resolver != "unbound":
        return ""
    return _PROGRAM.format(unbound=find_unbound() or "unbound", conf=config_file(cfg), common=common)


def validation_line(cfg: Config, *, name: str = ".") -> str:
    """For `mailroom dns --check`: does the resolver the daemons use validate DNSSEC?"""
    from common.daemon import resolver_settings

    servers = resolver_settings(cfg).nameservers
    which = ", ".join(servers) if servers else "the system's (/etc/resolv.conf)"
    found = validates_now(servers, name=name, timeout=min(cfg.dns.timeout, 5.0))
    if found is None:
        return f"DNSSEC    resolver {which}: no answer, cannot tell whether it validates"
    if found:
        return f"DNSSEC    resolver {which} validates (answers carry the AD flag)"
    return (f"DNSSEC    resolver {which} does not validate: DANE cannot be used"
            " ([dns] resolver = \"unbound\" runs one that does)")
