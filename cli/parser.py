"""The `mailroom` command line: every command, its arguments and their help.

Only the parser lives here, so that building it (for any command, and for
`mailroom --help`) imports nothing but the standard library and a few light
modules for default values.  The code that runs a command is in its own module,
which cli/main.py imports only when that command runs (why: cli/main.py).
Keep it so: a module imported here must not import SQLAlchemy, cryptography,
dnspython, alembic or argon2 (tests/unit/test_cli_startup.py checks).
"""

from __future__ import annotations

import argparse

from cli import lab as labcmd
from cli.roles import SUPERVISED
from cli.setup import SYSTEM_USER
from lab import scenarios

DESCRIPTION = ("`mailroom`: the operator's command "
               "(init, run, status, reload, user, alias, queue, trace, config, cert, lab...).")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mailroom", description=DESCRIPTION)
    p.add_argument("--config", help="config file (default $MAILROOM_CONFIG or ./var/mailroom.toml)")
    sub = p.add_subparsers(dest="command", required=True)

    init = sub.add_parser("init", help="create a config, database and TLS certificate")
    init.add_argument("--dir", default="./var")
    init.add_argument("--domain", required=True)
    init.add_argument("--hostname", default="localhost")
    init.add_argument("--postmaster", metavar="ADDRESS",
                      help="where postmaster@ and abuse@ the domain go (default: the first user added)")
    init.add_argument("--user", default=SYSTEM_USER,
                      help="as root: the account the daemons serve as, created when missing "
                      f"(default {SYSTEM_USER}); otherwise the current user")

    sub.add_parser("run", help="run every daemon under supervisord, in the foreground")
    status = sub.add_parser("status", help="each daemon's state")
    status.add_argument("--cluster", action="store_true",
                        help="every node sharing the database: its roles, last heartbeat and leases")
    sub.add_parser("reload", help="every daemon takes a new certificate and the settings that can change "
                   "safely (SIGHUP), without a restart")
    for name in ("stop", "start", "restart"):
        sp = sub.add_parser(name, help=f"{name} a daemon (or all)")
        sp.add_argument("program", nargs="?", default="all", choices=(*SUPERVISED, "all"))

    user = sub.add_parser("user", help="mail users")
    uact = user.add_subparsers(dest="action", required=True)
    for name in ("add", "passwd", "del"):
        u = uact.add_parser(name)
        u.add_argument("address")
        if name != "del":
            u.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
        if name == "add":
            u.add_argument("--store", choices=("maildir", "mbox"))
            u.add_argument("--quota", type=int, default=0, help="bytes; 0 is unlimited")
    uq = uact.add_parser("quota", help="set a user's quota")
    uq.add_argument("address")
    uq.add_argument("bytes", type=int, help="0 is unlimited")
    for name, text in (("disable", "turn a user's logins off (mail is still delivered)"),
                       ("enable", "turn a user's logins on again")):
        uact.add_parser(name, help=text).add_argument("address")
    uact.add_parser("list")
    uact.add_parser("sync", help="rewrite the users file Dovecot reads (after changing users by other means)")

    alias = sub.add_parser("alias", help="aliases and forwarding (SOURCE may be @domain)")
    aact = alias.add_subparsers(dest="action", required=True)
    for name in ("add", "del"):
        a = aact.add_parser(name)
        a.add_argument("source")
        a.add_argument("targets", nargs="*")
    aact.add_parser("list")

    q = sub.add_parser("queue", help="list and steer the queue")
    q.add_argument("action", nargs="?", choices=("list", "show", "flush", "hold", "release", "delete", "bounce"))
    q.add_argument("id", nargs="?")
    q.add_argument("--json", action="store_true")

    t = sub.add_parser("trace", help="one message's journey (trace id or Message-ID)")
    t.add_argument("id", nargs="?")
    t.add_argument("--json", action="store_true")
    t.add_argument("--follow", "-f", action="store_true",
                   help="print each hop as it happens (without ID: every message's, until Ctrl-C; with ID: "
                   "until every recipient has its final outcome; an unknown ID is waited for 10 s)")

    cc = sub.add_parser("client-config", help="the settings a mail client needs for ADDRESS")
    cc.add_argument("address")
    cc.add_argument("--xml", action="store_true", help="the autoconfig XML the web program serves")
    _dkim(sub)
    _cert(sub)
    _cluster(sub)
    _dns(sub)
    _status_checks(sub)
    _backup(sub)
    _restore(sub)
    _check(sub)
    _admin(sub)
    _dmarc(sub)
    _lab(sub)

    c = sub.add_parser("config", help="the effective configuration")
    c.add_argument("action", choices=("show",))
    c.add_argument("--json", action="store_true")
    return p


def _dkim(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("dkim", help="DKIM signing keys")
    act = p.add_subparsers(dest="action", required=True)
    k = act.add_parser("keygen", help="make a new RSA-2048 + Ed25519 key set and print its DNS records")
    k.add_argument("domain")
    k.add_argument("--selector", help="name of the key set (default: mrYYYYMM)")
    act.add_parser("list", help="the key sets and their DNS records")


def _cert(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("cert", help="the TLS certificate: request and renew it by ACME, or show it")
    act = p.add_subparsers(dest="action", required=True)
    req = act.add_parser("request", help="get a certificate from the ACME server now, and reload the daemons")
    ren = act.add_parser("renew", help="renew the ACME certificate when two thirds of its lifetime have passed")
    ren.add_argument("--force", action="store_true", help="renew now, however young the certificate")
    ren.add_argument("--new-key", action="store_true",
                     help="move to the next key (publish its TLSA record first: `mailroom dns DOMAIN`)")
    for sp in (req, ren):
        sp.add_argument("--no-reload", action="store_true", help="write the files only (the renewer reloads itself)")
    act.add_parser("status", help="the certificate's names, expiry, renewal and TLSA records")


def _cluster(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("cluster", help="several hosts on one database: the installation's CA and node certificates")
    act = p.add_subparsers(dest="action", required=True)
    ca = act.add_parser("ca", help="make the installation's own CA (its key stays here; ca.pem goes to every node)")
    ca.add_argument("--dir", default="cluster", help="folder for ca.pem and ca.key (default: cluster/ by the config)")
    cert = act.add_parser("cert", help="sign a certificate for NODE with the installation's CA")
    cert.add_argument("node")
    cert.add_argument("--name", action="append", default=[], metavar="HOST_OR_ADDRESS",
                      help="a host name or address other nodes dial to reach NODE (repeat for more)")
    cert.add_argument("--dir", default="cluster", help="folder of the CA (default: cluster/ beside the config)")
    cert.add_argument("--out", default="", help="where NODE.pem and NODE.key go (default: the CA's folder; "
                      "for this node itself, [cluster] cert and key)")


def _dns(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("dns", help="the DNS records to publish for a domain (--check: compare with DNS)")
    p.add_argument("domain")
    p.add_argument("--check", action="store_true",
                   help="ask DNS: present / weak / missing / different (exit 1; 2 when DNS cannot be reached)")
    p.add_argument("--json", action="store_true", help="with --check: the report as JSON")


def _status_checks(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("status-checks", help="every status check: DNS of each domain, the host, certificate, backup")
    p.add_argument("--json", action="store_true", help="the report as JSON (what the admin page shows)")


def _backup(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("backup", help="an encrypted snapshot of the installation while mail flows (init: the key)")
    p.add_argument("action", nargs="?", choices=("init", "list"),
                   help="init: make the backup key; list: the snapshots; none: make a snapshot")
    p.add_argument("--to", metavar="DIR", help="the backup folder (default [backup] dir)")


def _restore(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("restore", help="a whole installation back from a backup, into an empty folder")
    p.add_argument("source", metavar="FROM", help="a backup folder (its newest snapshot) or a snapshot file")
    p.add_argument("--into", metavar="DIR", required=True, help="an empty or new folder")
    p.add_argument("--key", metavar="FILE", help="the backup key (default: [backup] key of --config)")
    p.add_argument("--snapshot", metavar="NAME", help="which snapshot of the folder (default: the newest)")


def _check(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("check", help="do the database and the mailboxes agree (every delivery has its file)?")
    p.add_argument("--json", action="store_true")


def _admin(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("admin", help="accounts of the admin page ([web] admin)")
    act = p.add_subparsers(dest="action", required=True)
    for name in ("add", "passwd", "del"):
        a = act.add_parser(name)
        a.add_argument("name")
        if name != "del":
            a.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    act.add_parser("list")


def _dmarc(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("dmarc", help="DMARC aggregate reports (RFC 7489) about the mail received")
    act = p.add_subparsers(dest="action", required=True)
    r = act.add_parser("report", help="send the reports of the UTC days that have ended")
    r.add_argument("--before", metavar="YYYY-MM-DD", help="report the days before this one (default: today, UTC)")
    r.add_argument("--dry-run", action="store_true", help="say what would be sent; send and forget nothing")


def _lab(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "lab", help="a lab Internet for learning: start Mailroom in it, send a scenario's message",
        description="Mailroom in a lab Internet on loopback addresses (docs/lab.md).  Scenarios:\n"
        + scenarios.help_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    act = p.add_subparsers(dest="action")
    create = act.add_parser("create", help="make a lab installation, without starting it")
    start = act.add_parser("start", help="create the lab installation if needed, and run it (the default)")
    for sp in (create, start):
        sp.add_argument("--dir", help=f"the lab installation's folder (default {labcmd.LAB_DIR}, or --config's)")
        sp.add_argument("--warp", type=float, default=None,
                        help=f"lab time speed for a new installation (default {labcmd.DEFAULT_WARP:g}x)")
        sp.add_argument("--dns-port", type=_port, default=None,
                        help=f"a new lab's DNS server port on 127.0.0.1 (default {labcmd.LAB_DNS_PORT})")
        sp.add_argument("--mx-port", type=_port, default=None,
                        help=f"the port every lab MX host of a new lab listens on (default {labcmd.LAB_MX_PORT})")
        sp.add_argument("--port-offset", type=int, default=None,
                        help="added to each of Mailroom's own development ports in a new lab (2587, 2525, ... "
                        "and the web's 8025), to run it beside another Mailroom (default 0)")
    act.add_parser("env", help="the lab's ports and sender as shell variables: eval \"$(mailroom lab env)\"")
    send = act.add_parser("send", help="submit one scenario's message through the MSA",
                          description="Scenarios:\n" + scenarios.help_text(),
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    send.add_argument("scenario", choices=[s.name for s in scenarios.SCENARIOS], metavar="SCENARIO")
    act.add_parser("list", help="the scenarios, their addresses and what to expect")


def _port(text: str) -> int:
    if not (text.isascii() and text.isdigit() and 0 < int(text) < 65536):
        raise argparse.ArgumentTypeError(f"not a port: {text!r}")
    return int(text)
