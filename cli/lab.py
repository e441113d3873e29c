"""`mailroom lab`: start Mailroom inside a lab Internet, and send each scenario's message.

`mailroom lab create` makes a lab installation (`mailroom init` in ./var-lab, a
user to send as, DNS pointed at the lab's own server, MX hosts on 127.0.0.x,
lab time running [lab] time_warp times faster) without starting it;
`mailroom lab start` (or plain `mailroom lab`) makes one the first time too,
then runs it as `mailroom run` does.  Ports are chosen at creation
(--dns-port, --mx-port, --port-offset for Mailroom's own listeners) and live
in the config file after that ([lab] dns, [mta] remote_port, the listeners).
`mailroom lab env` prints them as shell variables, which the commands in
docs/lab.md use.  `mailroom lab send SCENARIO` submits that scenario's message
through the MSA, as a mail client would.  docs/lab.md walks through every
scenario.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from cli.show import clean
from common import config as configmod
from lab import scenarios

LAB_DIR = "./var-lab"
LAB_DOMAIN = "mailroom.test"
LAB_HOSTNAME = "mail.mailroom.test"
LAB_SENDER = f"learner@{LAB_DOMAIN}"
LAB_DNS_PORT = 2553
LAB_DNS = f"127.0.0.1:{LAB_DNS_PORT}"
LAB_MX_PORT = 2526  # every lab MX host listens here, each at its own 127.0.0.x
LAB_POLICY_PORT = 2443  # the MTA-STS policy host (real ones on 443)
LAB_DNSSEC = "127.0.0.1:2554"  # the validating resolver of the DANE scenario
DEFAULT_WARP = 3600.0
# How often the queue manager looks for due mail, in lab time: the default poll of
# one real second would be an hour of lab time at 3600x, and a delay warning due at
# 4 h would come up to an hour late.
LAB_POLL = 300.0
MIN_POLL = 0.1  # real seconds: the scans cost little, but not nothing


def config_path(args: argparse.Namespace) -> Path:
    if getattr(args, "dir", None):
        return (Path(args.dir) / "mailroom.toml").absolute()
    return Path(args.config or os.environ.get("MAILROOM_CONFIG") or Path(LAB_DIR) / "mailroom.toml").absolute()


# What a creation option sets, and where it lives in the config afterwards.
_CREATION = {"warp": "[lab] time_warp", "dns_port": "[lab] dns and [dns] nameservers",
             "mx_port": "[mta] remote_port", "port_offset": "the listener settings"}


def run(args: argparse.Namespace) -> int:
    action = args.action or "start"
    if action == "list":
        for s in scenarios.SCENARIOS:
            print(f"{s.name:<15} {s.recipient:<28} {s.summary}\n{'':<15} expect: {s.outcome}")
        return 0
    path = config_path(args)
    chosen: dict[str, float] = {k: getattr(args, k) for k in _CREATION if getattr(args, k, None) is not None}
    if action == "create" and path.exists():
        print(f"mailroom lab create: {clean(path)} exists; `mailroom lab start --dir {clean(path.parent)}` runs it",
              file=sys.stderr)
        return 1
    if action in ("create", "start") and not path.exists():
        made = create(path.parent, float(chosen.get("warp", DEFAULT_WARP)),
                      dns_port=int(chosen.get("dns_port", LAB_DNS_PORT)),
                      mx_port=int(chosen.get("mx_port", LAB_MX_PORT)), port_offset=int(chosen.get("port_offset", 0)))
        if made or action == "create":
            return made
    elif chosen:
        where = ", ".join(_CREATION[k] for k in chosen)
        print(f"mailroom lab: --{'/--'.join(k.replace('_', '-') for k in chosen)} only choose for a new lab; "
              f"this one's are in {clean(path)} ({where})", file=sys.stderr)
    try:
        cfg = configmod.load(path)
    except configmod.ConfigError as exc:
        print(f"mailroom lab: config error: {clean(exc)}", file=sys.stderr)
        return 2
    if not cfg.lab.enabled:
        print(f"mailroom lab: {clean(path)} is not a lab installation ([lab] enabled = false); "
              f"`mailroom lab start --dir {LAB_DIR}` makes one", file=sys.stderr)
        return 1
    if action == "send":
        return send(cfg, scenarios.BY_NAME[args.scenario])
    if action == "env":
        print(env(cfg), end="")
        return 0
    print(f"lab Internet: DNS at {cfg.lab.dns}, MX hosts on 127.0.0.11-21 port {cfg.mta.remote_port}, "
          f"lab time {cfg.lab.time_warp:g}x; send with `mailroom --config {path} lab send SCENARIO`", flush=True)
    from cli import supervise  # late, as every heavy import of a command (cli/main.py says why)

    return supervise.run(cfg)


def create(
    base: Path, warp: float, *, dns_port: int = LAB_DNS_PORT, mx_port: int = LAB_MX_PORT, port_offset: int = 0,
    listeners: dict[str, int] | None = None,
) -> int:
    """A new lab installation in `base`: `mailroom init`, lab settings, a user to send as.

    Ports: the lab DNS on 127.0.0.1:`dns_port`, every lab MX host on `mx_port`;
    each of Mailroom's listeners on its development port plus `port_offset`, or
    on the port `listeners` names for it (by setting name: "submission", "lmtp"...)."""
    cli = [sys.executable, "-m", "cli.main"]
    r = subprocess.run([*cli, "init", "--dir", str(base), "--domain", LAB_DOMAIN, "--hostname", LAB_HOSTNAME])
    if r.returncode:
        return r.returncode
    conf = base.absolute() / "mailroom.toml"
    password = secrets.token_urlsafe(12)
    since = dt.datetime.now(dt.UTC).replace(tzinfo=None, microsecond=0).isoformat()
    text = conf.read_text()
    dns = f"127.0.0.1:{dns_port}"
    poll = max(MIN_POLL, min(1.0, LAB_POLL / warp))
    edits = [
        ("nameservers = []", f'nameservers = ["{dns}"]'),
        ("[mta]\n", f"[mta]\n# The lab's MX hosts listen here (real ones on 25).\nremote_port = {mx_port}\n"
                    f"# Look for due mail every {LAB_POLL / 60:g} lab minutes (real seconds here).\n"
                    f'poll_interval = "{poll:g}s"\n'),
    ]
    edits += _listener_edits(text, port_offset, listeners or {})
    for old, new in edits:
        if old not in text:
            print(f"mailroom lab: {conf} does not look as `mailroom init` writes it ({old!r})", file=sys.stderr)
            return 1
        text = text.replace(old, new, 1)
    text += f"""
[lab]
# The lab Internet (docs/lab.md): a DNS server and MX hosts on 127.0.0.x, run with the daemons.
enabled = true
dns = "{dns}"
# Lab time runs this many times faster: retries, delay warnings and bounces in minutes.
time_warp = {warp:g}
time_warp_since = "{since}"
sender = "{LAB_SENDER}"
sender_password = "{password}"
"""
    text += _outbound_tls()
    conf.write_text(text)
    added = subprocess.run([*cli, "--config", str(conf), "user", "add", LAB_SENDER, "--password-stdin"],
                           input=password + "\n", text=True)
    if added.returncode:
        return added.returncode
    print(f"lab installation in {base}: {LAB_SENDER} (password {password}, also in {conf}) sends; "
          f"`export MAILROOM_CONFIG={conf}` and every `mailroom` command uses it")
    return 0


def _outbound_tls() -> str:
    """The settings of the MTA-STS and DANE scenarios (lab/tlslab.py; the lab program makes
    its CA when it first starts, as the Mailroom user); the DANE scenario only where
    unbound is installed."""
    text = f"""dnssec = "{LAB_DNSSEC}"

[outbound_tls]
# The lab's MTA-STS policy host listens here, and its certificates come from the lab's own CA.
mta_sts_port = {LAB_POLICY_PORT}
ca_file = "run/lab/tls/ca.pem"
# The lab's validating resolver (unbound): its AD bit is believed, for DANE.
dnssec_resolvers = ["{LAB_DNSSEC}"]
"""
    if shutil.which("unbound", path="/usr/sbin:/usr/local/sbin:/usr/bin:/sbin") is None:
        print("mailroom lab: unbound is not installed: the DANE scenario is off (apt install unbound)",
              file=sys.stderr)
        text = text.replace(f'dnssec = "{LAB_DNSSEC}"\n', "").replace(f'dnssec_resolvers = ["{LAB_DNSSEC}"]\n', "")
    return text


# Mailroom's own TCP listeners as `mailroom init` writes them (setting = "127.0.0.1:PORT").
_LISTENER = re.compile(r'^(submission|submissions|smtp|internal|lmtp|imap|imaps|pop3s|listen) = "127\.0\.0\.1:(\d+)"$',
                       re.M)


def _listener_edits(text: str, offset: int, chosen: dict[str, int]) -> list[tuple[str, str]]:
    """(line, new line) for each listener moved: to chosen[setting], or by `offset`."""
    edits = []
    for m in _LISTENER.finditer(text):
        key, port = m.group(1), int(m.group(2))
        new = chosen.get(key, port + offset)
        if new != port:
            if not 0 < new < 65536:
                raise SystemExit(f"mailroom lab: --port-offset {offset} puts {key} on {new}, not a port")
            edits.append((m.group(0), f'{key} = "127.0.0.1:{new}"'))
    return edits


def env(cfg: configmod.Config) -> str:
    """The lab's ports and sender as shell assignments (docs/lab.md's commands use them)."""
    _, dns_port = configmod.parse_hostport(cfg.lab.dns)
    host, port = cfg.endpoint("msa.submission").hostport
    values = {
        "MAILROOM_CONFIG": str(cfg.path),
        "LAB_DNS_PORT": str(dns_port),
        "LAB_MX_PORT": str(cfg.mta.remote_port),
        "LAB_SUBMISSION": f"{host}:{port}",
        "LAB_SENDER": cfg.lab.sender,
        "LAB_PASSWORD": cfg.lab.sender_password,
    }
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in values.items())


def send(cfg: configmod.Config, s: scenarios.Scenario) -> int:
    """Submit the scenario's message as [lab] sender, over STARTTLS and AUTH, as a mail client does."""
    import smtplib
    import ssl

    sender = cfg.lab.sender
    if not sender:
        print("mailroom lab send: [lab] sender is not set", file=sys.stderr)
        return 1
    body = (
        f"From: {sender}\r\nTo: {s.recipient}\r\nSubject: lab scenario {s.name}\r\n\r\n"
        f"Sent by `mailroom lab send {s.name}`: {s.summary}.\r\nExpected: {s.outcome}.\r\n"
    ).encode()
    host, port = cfg.endpoint("msa.submission").hostport
    tls = ssl.create_default_context()
    tls.check_hostname = False
    tls.verify_mode = ssl.CERT_NONE  # the lab's certificate is self-signed
    try:
        with smtplib.SMTP(host, port, timeout=30) as client:
            client.starttls(context=tls)
            client.login(sender, cfg.lab.sender_password)
            client.mail(sender)
            code, text = client.rcpt(s.recipient)
            if code != 250:
                print(f"RCPT TO:<{s.recipient}>: {code} {text.decode(errors='replace')}", file=sys.stderr)
                return 1
            code, text = client.data(body)
    except (OSError, smtplib.SMTPException) as exc:
        print(f"mailroom lab send: the MSA at {host}:{port}: {exc}", file=sys.stderr)
        return 1
    reply = text.decode(errors="replace")
    print(f"{s.name}: {s.recipient}: {code} {reply}")
    trace = reply.rsplit(" ", 1)[-1]
    print(f"expect: {s.outcome}\nfollow it: mailroom --config {cfg.path} trace {trace}")
    return 0 if code == 250 else 1
