"""The one TOML configuration file, loaded once and validated at start.

The dataclasses below are the schema *and* its documentation: every field says
what it does.  A bad value stops the program with a message that names the key
(`mta.max_hops: expected a whole number, got "ten"`), the way `postfix check`
would.  Relative paths are taken from the config file's folder, so a whole
installation can live in one directory (`./var` in development).
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from common.endpoint import UNIX_PREFIX, Endpoint
from common.numbers import is_decimal

DEFAULT_PATH = "./var/mailroom.toml"
# The shortest `[queue] lease` (renewed a third of it apart).
MIN_LEASE = 3.0
# The MSA's hand-off to the MTA: a Unix socket in the private run folder (common/hop_secret.py).
INTERNAL_SOCKET = "unix:run/internal.sock"
# More MTA listener processes than this would be a typo, not a host.
MAX_MTA_PROCESSES = 64
# [filter] rspamd: `mailroom run` runs rspamd and its Redis itself.
SUPERVISED = "supervised"
# The certificate key types `[acme] key_type` may name (common/tls.py makes them).
KEY_TYPES = ("ecdsa-p256", "rsa-2048")
# What `mailroom run` may start on a node ([mailroom] roles; docs/cluster.md).
ROLES = ("msa", "mta", "qmgr", "mda", "imap", "web")


class ConfigError(Exception):
    """A configuration value is missing or wrong; the message names the key."""


def _meta(kind: str, doc: str) -> dict[str, str]:
    return {"kind": kind, "doc": doc}


@dataclass(frozen=True)
class MailroomSection:
    hostname: str = field(default="localhost", metadata=_meta("str", "This host's name in greetings, Received headers and Message-IDs"))
    domains: list[str] = field(default_factory=list, metadata=_meta("domains", "Mail domains delivered here (local domains)"))
    database: str = field(default="sqlite:///mailroom.db", metadata=_meta("dburl", "SQLAlchemy URL of the shared database"))
    mail_root: str = field(default="mail", metadata=_meta("path", "Folder under which every mailbox lives"))
    run_dir: str = field(default="run", metadata=_meta("path", "Folder for sockets, pid files and supervisord's own log"))
    log_dir: str = field(default="log", metadata=_meta("path", "Folder of the log files, one per program (msa.log, mta.log, ...), each reopened when logrotate moves it; empty: standard error (the journal when systemd runs a daemon)"))
    log_level: str = field(default="info", metadata=_meta("loglevel", "debug shows every SMTP/LMTP line (AUTH redacted)"))
    log_format: str = field(default="text", metadata=_meta("logformat", "text (one readable line per record) or json (one JSON object per line, trace_id a field)"))
    user: str = field(default="", metadata=_meta("str", "The account every daemon serves as; started as root, they bind ports and then become it (required as root)"))
    mail_group: str = field(default="", metadata=_meta("str", "A group allowed to read the mail root (e.g. Dovecot's); empty: only the user"))
    node: str = field(default="", metadata=_meta("node", "This node's name among the hosts sharing one database (claims on the queue, `mailroom status --cluster`); letters, digits, dots and dashes; empty: the machine's host name"))
    roles: list[str] = field(default_factory=lambda: list(ROLES), metadata=_meta("roles", "What `mailroom run` starts on this node, out of msa, mta, qmgr, mda, imap, web (MX hosts: [\"mta\", \"qmgr\", \"msa\"]; the store: [\"mda\", \"imap\", \"web\"])"))


@dataclass(frozen=True)
class TLSSection:
    cert: str = field(default="tls/cert.pem", metadata=_meta("path", "PEM certificate chain"))
    key: str = field(default="tls/key.pem", metadata=_meta("path", "PEM private key"))


@dataclass(frozen=True)
class SMTPSection:
    """Limits shared by every listener (MSA, MTA, MDA)."""

    idle_timeout: float = field(default=300.0, metadata=_meta("duration", "Close a silent client after this long (421 4.4.2)"))
    session_timeout: float = field(default=1800.0, metadata=_meta("duration", "Close any session after this long, however busy"))
    max_message_size: int = field(default=35 * 1024 * 1024, metadata=_meta("size", "Largest message accepted (SIZE, 552 5.3.4)"))
    max_recipients: int = field(default=100, metadata=_meta("int", "Recipients per message; more get 452 4.5.3"))
    max_connections: int = field(default=1000, metadata=_meta("int", "Connections per listener; more get 421 4.7.0"))
    max_connections_per_client: int = field(default=50, metadata=_meta("int", "Connections per client address; more get 421 4.7.0"))
    max_errors: int = field(default=20, metadata=_meta("int", "Errors in one session before disconnecting"))
    stress_threshold: int = field(default=80, metadata=_meta("int", "Stress mode (as Postfix's smtpd) from this percentage of max_connections open: idle and TLS handshake timeouts become stress_timeout, until the count is back under three quarters of it (0: off)"))
    stress_timeout: float = field(default=10.0, metadata=_meta("duration", "Idle and TLS handshake timeout under stress"))


@dataclass(frozen=True)
class MSASection:
    submission: list[str] = field(default_factory=lambda: ["127.0.0.1:2587"], metadata=_meta("listen", "Submission listener, STARTTLS required (the 587 role)"))
    submissions: list[str] = field(default_factory=lambda: ["127.0.0.1:2465"], metadata=_meta("listen", "Submission listener with implicit TLS (the 465 role)"))
    max_auth_failures: int = field(default=5, metadata=_meta("int", "Failed logins per client address within auth_failure_window before lockout"))
    auth_failure_window: float = field(default=600.0, metadata=_meta("duration", "Window over which failed logins are counted"))
    auth_lockout: float = field(default=600.0, metadata=_meta("duration", "How long a locked-out address is refused (421 4.7.0)"))
    max_connections_per_client: int = field(default=20, metadata=_meta("int", "Submission connections per client address"))
    max_messages_per_hour: int = field(default=500, metadata=_meta("int", "Messages one user may send per hour (451 4.7.1)"))
    max_recipients_per_hour: int = field(default=2000, metadata=_meta("int", "Recipients one user may send to per hour (451 4.7.1)"))


@dataclass(frozen=True)
class MTASection:
    smtp: list[str] = field(default_factory=lambda: ["127.0.0.1:2525"], metadata=_meta("listen", "Public listener (the port 25 role)"))
    internal: list[str] = field(default_factory=lambda: [INTERNAL_SOCKET], metadata=_meta("listen", "Internal listener for the MSA: a Unix socket (only the daemons' uid may connect; a relative path is in the config's folder) or a loopback address (the MSA then logs in with <run_dir>/internal.secret)"))
    trusted_networks: list[str] = field(default_factory=list, metadata=_meta("networks", "Client networks allowed to relay through the public listener"))
    max_hops: int = field(default=50, metadata=_meta("int", "More Received headers than this is a mail loop (554 5.4.6)"))
    min_free_disk: int = field(default=100 * 1024 * 1024, metadata=_meta("size", "Below this much free space, MAIL gets 452 4.3.1"))
    retry_schedule: list[float] = field(default_factory=lambda: [300.0, 600.0, 1200.0, 2400.0, 3600.0], metadata=_meta("durations", "Waits between delivery attempts; the last one repeats"))
    local_retry_schedule: list[float] = field(default_factory=lambda: [1.0, 2.0, 5.0, 10.0, 30.0, 60.0], metadata=_meta("durations", "Waits between hand-offs to our own MDA while it cannot be reached (it is restarting); the last one repeats"))
    max_queue_lifetime: float = field(default=5 * 86400.0, metadata=_meta("duration", "Bounce a message still undelivered after this long"))
    resubmission_window: float = field(default=86400.0, metadata=_meta("duration", "The same message (Message-ID, sender, recipients, body) sent again within this long is answered with its first trace id and not queued twice (0: off)"))
    delay_warning: float = field(default=4 * 3600.0, metadata=_meta("duration", "Warn the sender once when a message is this late (0: never)"))
    relayhost: str = field(default="", metadata=_meta("hostport?", "Send all remote mail through this smart host (host:port)"))
    relayhost_username: str = field(default="", metadata=_meta("str", "AUTH user at the relayhost (only over TLS)"))
    relayhost_password: str = field(default="", metadata=_meta("secret", "AUTH password at the relayhost (`config show` prints ********)"))
    relayhost_tls_verify: bool = field(default=True, metadata=_meta("bool", "Verify the relayhost's certificate and name; false lets anyone in the middle read the mail and the password"))
    relayhost_ca_file: str = field(default="", metadata=_meta("path", "PEM file of CAs the relayhost's certificate must chain to; empty: the system's CAs"))
    transport: dict[str, str] = field(default_factory=dict, metadata=_meta("transport", "domain = host:port, overriding MX for that domain"))
    remote_port: int = field(default=25, metadata=_meta("int", "Port of remote MX hosts (change only in a lab)"))
    poll_interval: float = field(default=1.0, metadata=_meta("duration", "How often qmgr looks for due mail without being woken"))
    connect_timeout: float = field(default=30.0, metadata=_meta("duration", "Timeout for connecting to a next hop"))
    smtp_timeout: float = field(default=300.0, metadata=_meta("duration", "Timeout for each reply of a remote SMTP server (RFC 5321 4.5.3.2 suggests 5 minutes and more)"))
    concurrency_per_destination: int = field(default=10, metadata=_meta("int", "Parallel deliveries to one destination"))
    lmtp_sessions: int = field(default=10, metadata=_meta("int", "Parallel LMTP sessions to the MDA"))
    processes: int = field(default=1, metadata=_meta("int", f"Listener processes sharing the smtp and internal TCP addresses (SO_REUSEPORT), 1 to {MAX_MTA_PROCESSES}; more than 1 only when one listener process is CPU-bound and the host has cores to spare"))


@dataclass(frozen=True)
class QueueSection:
    """The queue the queue managers of every node share (docs/cluster.md)."""

    lease: float = field(default=60.0, metadata=_meta("duration", "How long a queue manager's claim on a recipient lasts unless it renews it (it does, a third of this apart, while it runs); a claim left to expire (its node died, froze or lost the database) is taken over by any queue manager, and its holder can no longer settle it"))


@dataclass(frozen=True)
class ClusterSection:
    """Hops between hosts (docs/cluster.md): LMTP to the store's MDA, the MSA's hand-off to an MTA."""

    ca: str = field(default="", metadata=_meta("path", "The installation's own CA certificate (`mailroom cluster ca`); when set, the TCP addresses of [mda] lmtp and [mta] internal speak TLS from the first byte and take only clients holding a certificate this CA signed, and this node shows its own certificate when it connects to them; empty: off, and those listeners stay on this host (loopback)"))
    cert: str = field(default="cluster/node.pem", metadata=_meta("path", "This node's certificate, signed by the CA (`mailroom cluster cert NODE`)"))
    key: str = field(default="cluster/node.key", metadata=_meta("path", "This node's private key (owner-only)"))
    peers: list[str] = field(default_factory=list, metadata=_meta("nodes", "Node names whose certificates are taken (a retired node left out is refused); empty: every certificate the CA signed"))


@dataclass(frozen=True)
class MDASection:
    lmtp: list[str] = field(default_factory=lambda: ["127.0.0.1:2424"], metadata=_meta("listen", "LMTP listener; loopback or unix:/path only"))
    recipient_delimiter: str = field(default="+", metadata=_meta("str", "user+tag@domain is delivered to user (empty: off)"))
    default_store: str = field(default="maildir", metadata=_meta("store", "Store for new users: maildir or mbox"))
    lock_timeout: float = field(default=30.0, metadata=_meta("duration", "How long to wait for an mbox lock (then 451 4.2.0)"))
    sieve_max_size: int = field(default=64 * 1024, metadata=_meta("size", "Largest Sieve script a user may have (ManageSieve refuses a larger upload; the MDA ignores a larger file and delivers to the inbox)"))


@dataclass(frozen=True)
class IMAPSection:
    """Reading mail: Dovecot, run by `mailroom run` with a configuration generated from this file."""

    enabled: bool = field(default=False, metadata=_meta("bool", "Run Dovecot for IMAP and POP3 (`mailroom init` turns it on when Dovecot is installed)"))
    imap: str = field(default="127.0.0.1:2143", metadata=_meta("listen?", "IMAP with STARTTLS (the 143 role); empty: off"))
    imaps: str = field(default="127.0.0.1:2993", metadata=_meta("listen?", "IMAP over implicit TLS (the 993 role); empty: off"))
    pop3s: str = field(default="127.0.0.1:2995", metadata=_meta("listen?", "POP3 over implicit TLS (the 995 role); empty: off"))
    dovecot: str = field(default="dovecot", metadata=_meta("str", "The dovecot program: a name looked up in PATH and the sbin folders, or a path"))
    sieve: str = field(default="127.0.0.1:2190", metadata=_meta("listen?", "ManageSieve (RFC 5804, the 4190 role; STARTTLS) for users' Sieve filters, when dovecot-managesieved is installed; empty: off"))


@dataclass(frozen=True)
class WebSection:
    listen: list[str] = field(default_factory=lambda: ["127.0.0.1:8025"], metadata=_meta("listen", "HTTP listener of the web program (mail client autoconfig, the live page at /, /metrics); read-only"))
    http: str = field(default="", metadata=_meta("listen?", "Plain HTTP for the Internet (the port 80 role): ACME HTTP-01 challenges and mail client autoconfig, nothing else; empty: off"))
    https: str = field(default="", metadata=_meta("listen?", "HTTPS for the Internet with the [tls] certificate (the port 443 role): the MTA-STS policy at mta-sts.DOMAIN and mail client autoconfig; empty: off"))
    admin: list[str] = field(default_factory=list, metadata=_meta("listen*", "HTTPS listener (TLS only, [tls] cert and key) of the admin page at /admin and users' own page at /account; keep it on loopback or a private network (`mailroom init` writes 127.0.0.1:8443); [] turns it off"))


@dataclass(frozen=True)
class DNSSection:
    """Every daemon has one asynchronous, caching resolver (common/dns.py)."""

    resolver: str = field(default="system", metadata=_meta("resolver", "system: ask the nameservers below (or /etc/resolv.conf's); unbound: `mailroom run` starts a local validating (DNSSEC) unbound on unbound_listen, forwarding to the nameservers below when some are listed, and every daemon asks it"))
    nameservers: list[str] = field(default_factory=list, metadata=_meta("hostports", "host:port of DNS servers; empty: the system's"))
    timeout: float = field(default=10.0, metadata=_meta("duration", "Lifetime of one DNS lookup; a sender check whose lookups take longer is a temperror for that message ([mailauth] dns_error)"))
    cache_entries: int = field(default=10_000, metadata=_meta("int", "Answers each daemon keeps in memory (least recently used dropped first; 0: no cache)"))
    max_ttl: float = field(default=86_400.0, metadata=_meta("duration", "An answer is kept for its TTL, at most this long"))
    max_negative_ttl: float = field(default=3_600.0, metadata=_meta("duration", "\"No such name/record\" is kept for its SOA minimum (RFC 2308), at most this long"))
    failure_ttl: float = field(default=5.0, metadata=_meta("failurettl", "A failed lookup (timeout, SERVFAIL) is remembered this long, 0 to 30 s, so a dead zone is not asked by every message"))
    unbound_listen: str = field(default="127.0.0.1:2053", metadata=_meta("hostport?", "Loopback address of the supervised unbound (resolver = \"unbound\")"))
    trust_anchor: str = field(default="/usr/share/dns/root.key", metadata=_meta("path", "DNSSEC trust anchor file unbound validates from (default: the root's, Debian's dns-root-data)"))


@dataclass(frozen=True)
class OutboundTLSSection:
    """TLS towards other mail hosts (mta/tlspolicy.py): the operator's table, DANE, MTA-STS, TLS-RPT."""

    policy: dict[str, str] = field(default_factory=dict, metadata=_meta("tlspolicy", "domain = none | may | encrypt | verify | dane (\".example.net\": every domain under it); overrides DANE and MTA-STS for that domain; the relayhost keeps its own rule"))
    dane: bool = field(default=True, metadata=_meta("bool", "Use DANE (RFC 7672) where a trusted validating resolver vouches for TLSA records"))
    dnssec_resolvers: list[str] = field(default_factory=list, metadata=_meta("hostports", "Validating resolvers (host:port, loopback only) whose AD bit is believed; empty: [dns] nameservers, believed only if all are loopback"))
    mta_sts: bool = field(default=True, metadata=_meta("bool", "Fetch and obey recipient domains' MTA-STS policies (RFC 8461)"))
    mta_sts_timeout: float = field(default=30.0, metadata=_meta("duration", "Longest a policy fetch may take, whole (then no policy, or the cached one)"))
    mta_sts_max_size: int = field(default=64 * 1024, metadata=_meta("size", "Largest policy file accepted"))
    mta_sts_port: int = field(default=443, metadata=_meta("int", "Port of the policy hosts (change only in a lab)"))
    mta_sts_cache: str = field(default="mta-sts-cache.json", metadata=_meta("path", "Where fetched policies are kept across restarts"))
    ca_file: str = field(default="", metadata=_meta("path", "PEM file of CAs that MX certificates (verify, MTA-STS) and policy hosts must chain to; empty: the system's"))
    tlsrpt: bool = field(default=True, metadata=_meta("bool", "Count outbound TLS sessions and send daily TLS-RPT reports (RFC 8460) to domains that ask"))
    tlsrpt_from: str = field(default="", metadata=_meta("str", "Envelope sender and From: of the reports; empty: postmaster@ the first local domain"))
    tlsrpt_organization: str = field(default="", metadata=_meta("str", "organization-name in the reports; empty: [mailroom] hostname"))
    tlsrpt_https: bool = field(default=False, metadata=_meta("bool", "Also POST reports to https: addresses in a domain's rua"))


@dataclass(frozen=True)
class DKIMSection:
    sign: bool = field(default=True, metadata=_meta("bool", "Sign mail from our domains leaving for other domains (RSA and Ed25519)"))
    key_dir: str = field(default="dkim", metadata=_meta("path", "Folder of DOMAIN.SELECTOR.rsa.key / .ed25519.key files (owner-only)"))
    selectors: dict[str, str] = field(default_factory=dict, metadata=_meta("table", "domain = selector to sign with; a domain not listed uses its newest keys"))


@dataclass(frozen=True)
class MailAuthSection:
    check: bool = field(default=True, metadata=_meta("bool", "Check SPF, DKIM, DMARC and ARC on mail from the public listener"))
    dmarc_reject: bool = field(default=True, metadata=_meta("bool", "Refuse (550 5.7.1) a DMARC failure whose domain says p=reject"))
    quarantine_header: str = field(default="X-Mailroom-Quarantine", metadata=_meta("str", "Header added to DMARC p=quarantine failures, for mail clients to filter on"))
    dns_error: str = field(default="defer", metadata=_meta("dnserror", "A DNS failure that could change the verdict: defer (451 4.7.x) or accept (recorded as temperror)"))
    srs_domain: str = field(default="", metadata=_meta("str", "Domain of rewritten (SRS) senders of forwarded mail; empty: the first local domain"))
    srs_max_age: int = field(default=21, metadata=_meta("int", "Days a bounce to an SRS address is accepted"))


@dataclass(frozen=True)
class FilterSection:
    rspamd: str = field(default="", metadata=_meta("rspamd", "rspamd scanning public mail before the 250: \"supervised\" (`mailroom run` runs Debian's rspamd and a Redis for it, on the addresses below), host:port of an rspamd run elsewhere (its normal worker), or empty: off"))
    scanner: str = field(default="127.0.0.1:2783", metadata=_meta("listen?", "Supervised rspamd: its normal worker (the scanner the MTA asks); loopback only"))
    controller: str = field(default="127.0.0.1:2784", metadata=_meta("listen?", "Supervised rspamd: its controller (learning, statistics, web interface; the password is RUN_DIR/rspamd/controller.secret); loopback only"))
    redis: str = field(default="127.0.0.1:2785", metadata=_meta("listen?", "Supervised rspamd: the Redis holding its Bayes statistics and other state (password RUN_DIR/rspamd/redis.secret); loopback only"))
    spam_score: float = field(default=6.0, metadata=_meta("score", "Supervised rspamd: the score from which a message is spam (rspamd's \"add header\" action): it is delivered to the user's Junk folder"))
    bayes_min_learns: int = field(default=50, metadata=_meta("int", "Supervised rspamd: spam and ham messages each that Bayes must have learnt before it scores (rspamd's own default is 200, which a small site reaches slowly)"))
    timeout: float = field(default=20.0, metadata=_meta("duration", "How long to wait for the filter's verdict"))
    when_down: str = field(default="accept_unscanned", metadata=_meta("whendown", "When the filter fails: accept_unscanned (with a header saying so) or defer (451 4.7.1)"))
    dnsbl_zones: list[str] = field(default_factory=list, metadata=_meta("domains", "DNS blocklist zones checked at connect (554 5.7.1 when listed); empty: off"))

    @property
    def supervised(self) -> bool:
        return self.rspamd == SUPERVISED

    @property
    def scanner_address(self) -> str:
        """The rspamd normal worker the MTA asks (host:port), or "" when there is no filter."""
        return self.scanner if self.supervised else self.rspamd


@dataclass(frozen=True)
class ACMESection:
    """Certificates from an ACME server (RFC 8555; Let's Encrypt): `mailroom cert`, and the renewer `mailroom run` supervises."""

    directory: str = field(default="", metadata=_meta("url?", "The ACME server's directory URL (https://acme-v02.api.letsencrypt.org/directory); empty: off"))
    directory_ca_file: str = field(default="", metadata=_meta("path", "PEM file of CAs to trust for the ACME server's own HTTPS (a private ACME server); empty: the system's CAs"))
    email: str = field(default="", metadata=_meta("str", "Contact address given to the ACME server (expiry notices); empty: none"))
    key_type: str = field(default="ecdsa-p256", metadata=_meta("keytype", "The certificate's key: ecdsa-p256 or rsa-2048"))
    dir: str = field(default="acme", metadata=_meta("path", "Folder of the account key, the next certificate key and the HTTP-01 challenge files (owner-only)"))
    retry_schedule: list[float] = field(default_factory=lambda: [60.0, 300.0, 1800.0, 7200.0, 21600.0], metadata=_meta("durations", "The renewer's waits after a failed attempt (longer when the server asks, as with a 429); the last one repeats"))


@dataclass(frozen=True)
class MTASTSSection:
    """The MTA-STS policy we publish for our own domains (RFC 8461), served at https://mta-sts.DOMAIN/.well-known/mta-sts.txt by [web] https."""

    mode: str = field(default="testing", metadata=_meta("stsmode", "enforce (senders deliver only over verified TLS to the mx below), testing (they deliver anyway and report), or none (withdraw a policy)"))
    mx: list[str] = field(default_factory=list, metadata=_meta("mxpatterns", "MX host names senders may deliver to (*.example.org allowed); empty: [mailroom] hostname"))
    max_age: float = field(default=7 * 86400.0, metadata=_meta("stsmaxage", "How long senders may keep the policy (at most a year)"))


@dataclass(frozen=True)
class LabSection:
    """A lab Internet on loopback addresses for learning (`mailroom lab`, docs/lab.md); never in production."""

    enabled: bool = field(default=False, metadata=_meta("bool", "Run the lab Internet (a DNS server and named MX hosts on 127.0.0.x at [mta] remote_port) with the daemons"))
    dns: str = field(default="127.0.0.1:2553", metadata=_meta("listen?", "UDP and TCP address of the lab DNS server; [dns] nameservers points here"))
    time_warp: float = field(default=1.0, metadata=_meta("speed", "How many times faster than real time every daemon's clock runs (60, 3600: retries, delay warnings and bounces in minutes)"))
    time_warp_since: str = field(default="", metadata=_meta("datetime?", "UTC moment lab time starts from (YYYY-MM-DDTHH:MM:SS); needed when time_warp is not 1"))
    sender: str = field(default="", metadata=_meta("str", "Who `mailroom lab send` submits as (a local user)"))
    sender_password: str = field(default="", metadata=_meta("secret", "That user's password, for the MSA's AUTH"))
    slow_reply: float = field(default=5.0, metadata=_meta("duration", "How long the slow lab MX host waits before each reply"))
    dnssec: str = field(default="", metadata=_meta("listen?", "UDP and TCP address of the lab's validating resolver (unbound, for the DANE scenario; [outbound_tls] dnssec_resolvers points here); empty: off"))


@dataclass(frozen=True)
class DMARCSection:
    """DMARC aggregate reports (RFC 7489 7.2) about the mail we receive (mta/auth/dmarcreport.py)."""

    reports: bool = field(default=True, metadata=_meta("bool", "Record the DMARC verdict of every message from the Internet and send each domain that asks (rua=) a daily report"))
    report_at: str = field(default="00:15", metadata=_meta("time?", "Local time the reports of the UTC days that have ended go out (`mailroom dmarc report`); empty: only by hand"))
    report_from: str = field(default="", metadata=_meta("str", "Sender of the reports; empty: postmaster@ the first local domain"))
    org_name: str = field(default="", metadata=_meta("str", "Who the reports say they are from (org_name); empty: the host name"))


@dataclass(frozen=True)
class BackupSection:
    """Backups (`mailroom backup`, `mailroom restore`; docs/operations.md, "Backups and upgrades")."""

    dir: str = field(default="backup", metadata=_meta("path", "Folder the backups go to (`mailroom backup --to` overrides); better on another disk, copied off the host"))
    key: str = field(default="backup.key", metadata=_meta("path", "The backup key made by `mailroom backup init`; keep a copy away from this host: without it no backup can be read"))
    at: str = field(default="", metadata=_meta("time?", "Local time of the daily backup, HH:MM (\"03:30\"; HH:MM:SS also); empty: no scheduled backup"))
    keep_days: int = field(default=7, metadata=_meta("int", "Keep the last backup of each of this many days"))
    keep_weeks: int = field(default=4, metadata=_meta("int", "Keep the last backup of each of this many weeks, as well"))


@dataclass(frozen=True)
class Config:
    path: Path
    mailroom: MailroomSection = field(default_factory=MailroomSection)
    tls: TLSSection = field(default_factory=TLSSection)
    smtp: SMTPSection = field(default_factory=SMTPSection)
    msa: MSASection = field(default_factory=MSASection)
    mta: MTASection = field(default_factory=MTASection)
    queue: QueueSection = field(default_factory=QueueSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    mda: MDASection = field(default_factory=MDASection)
    dns: DNSSection = field(default_factory=DNSSection)
    outbound_tls: OutboundTLSSection = field(default_factory=OutboundTLSSection)
    imap: IMAPSection = field(default_factory=IMAPSection)
    web: WebSection = field(default_factory=WebSection)
    dkim: DKIMSection = field(default_factory=DKIMSection)
    mailauth: MailAuthSection = field(default_factory=MailAuthSection)
    filter: FilterSection = field(default_factory=FilterSection)
    acme: ACMESection = field(default_factory=ACMESection)
    mta_sts: MTASTSSection = field(default_factory=MTASTSSection)
    lab: LabSection = field(default_factory=LabSection)
    backup: BackupSection = field(default_factory=BackupSection)
    dmarc: DMARCSection = field(default_factory=DMARCSection)

    @property
    def base(self) -> Path:
        return self.path.parent

    def resolve(self, p: str) -> Path:
        """A path from the config, relative to the config file's folder."""
        path = Path(p)
        return path if path.is_absolute() else (self.base / path)

    @property
    def database_url(self) -> str:
        url = self.mailroom.database
        prefix = "sqlite:///"
        if url.startswith(prefix) and not url.startswith(prefix + "/") and ":memory:" not in url:
            return prefix + str(self.resolve(url[len(prefix):]).resolve())
        return url

    @property
    def node(self) -> str:
        """This node's name: `[mailroom] node`, or the machine's host name."""
        if self.mailroom.node:
            return self.mailroom.node
        import socket

        return socket.gethostname() or "localhost"

    @property
    def mail_root(self) -> Path:
        return self.resolve(self.mailroom.mail_root)

    @property
    def run_dir(self) -> Path:
        return self.resolve(self.mailroom.run_dir)

    @property
    def log_dir(self) -> Path | None:
        """Where each program writes its log file; None: to standard error."""
        return self.resolve(self.mailroom.log_dir) if self.mailroom.log_dir else None

    @property
    def queue_dir(self) -> Path:
        """The folder holding the queue: the SQLite database's, else run_dir."""
        url = self.database_url
        if url.startswith("sqlite:///") and ":memory:" not in url:
            return Path(url[len("sqlite:///"):].split("?", 1)[0]).parent
        return self.run_dir

    @property
    def qmgr_socket(self) -> Path:
        """Datagram socket on which the queue manager is woken after a commit."""
        return self.run_dir / "qmgr.sock"

    def endpoints(self, key: str) -> list[Endpoint]:
        """Every address of the listener setting `key` ("mta.smtp"), as typed values
        (validated at load), in the order written."""
        section, _, name = key.partition(".")
        value = getattr(getattr(self, section), name)
        base = str(self.base)  # a relative unix:run/x.sock is in the config's folder, as every path
        return [Endpoint.parse(v, base) for v in ([value] if isinstance(value, str) else value)]

    def endpoint(self, key: str) -> Endpoint:
        """The first address of listener setting `key`: the one to connect to
        (the MSA's hand-off, the queue manager's LMTP, client settings)."""
        return self.endpoints(key)[0]

    def is_local_domain(self, domain: str) -> bool:
        return domain.lower() in self.mailroom.domains

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["path"] = str(self.path)
        return out


def listener_keys() -> list[str]:
    """Every listener setting ("msa.submission", "mta.smtp", ...), in config order."""
    hints = get_type_hints(Config)
    keys = []
    for section in dataclasses.fields(Config):
        cls = hints[section.name]
        if dataclasses.is_dataclass(cls):
            keys += [
                f"{section.name}.{f.name}" for f in dataclasses.fields(cls)
                if f.metadata.get("kind") in ("listen", "listen*")
            ]
    return keys


# --- value parsing ---------------------------------------------------------

# A node's name goes into claim owners ("node:pid") and certificates: no colon, no space.
_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,62}")
# ASCII digits only (re.ASCII): "٥m" is no duration, "١٠MiB" no size.
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$", re.ASCII)
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}
_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]i?b?|b)?\s*$", re.I | re.ASCII)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_duration(value: object) -> float:
    """'5m' -> 300.0; numbers are seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 30s, 5m, 1h or 5d")
    if isinstance(value, int | float):
        return float(value)
    m = _DURATION.match(str(value))
    if not m:
        raise ValueError(f"expected a duration like 30s, 5m, 1h or 5d, got {value!r}")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def parse_size(value: object) -> int:
    """'10MiB' / '10m' -> bytes; numbers are bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError(f"expected a size like 10485760, 512k or 10MiB, got {value!r}")
    unit = (m.group(2) or "").lower()[:1]
    return int(m.group(1)) * _SIZE_UNITS[unit]


def parse_hostport(value: str, default_port: int | None = None) -> tuple[str, int]:
    """'127.0.0.1:25' / '[::1]:25' / 'mx.example:25' -> (host, port)."""
    v = value.strip()
    if v.startswith("["):
        host, _, rest = v[1:].partition("]")
        port_text = rest.lstrip(":")
    elif v.count(":") == 1:
        host, _, port_text = v.partition(":")
    else:
        host, port_text = v, ""
    if not port_text:
        if default_port is None:
            raise ValueError(f"expected host:port, got {value!r}")
        return host, default_port
    if not is_decimal(port_text) or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"bad port in {value!r}")
    if not host:
        raise ValueError(f"missing host in {value!r}")
    return host, int(port_text)


def _convert(kind: str, value: object) -> object:
    def need(t: type | tuple[type, ...], what: str) -> None:
        if not isinstance(value, t) or isinstance(value, bool) and t is not bool:
            raise ValueError(f"expected {what}, got {value!r}")

    match kind:
        case "str" | "secret":
            need(str, "a string")
            return value
        case "bool":
            need(bool, "true or false")
            return value
        case "table":
            need(dict, "a table of name = text")
            assert isinstance(value, dict)
            return {str(k).lower(): str(v) for k, v in value.items()}
        case "url?":
            need(str, "an https:// URL")
            assert isinstance(value, str)
            if value and not re.fullmatch(r"https://[^\s/]+(/\S*)?", value):
                raise ValueError(f"expected an https:// URL (RFC 8555 6.1: ACME is spoken over HTTPS), got {value!r}")
            return value
        case "keytype":
            if value not in KEY_TYPES:
                raise ValueError(f"expected {' or '.join(KEY_TYPES)}, got {value!r}")
            return value
        case "stsmode":
            if value not in ("enforce", "testing", "none"):
                raise ValueError(f"expected enforce, testing or none, got {value!r}")
            return value
        case "mxpatterns":
            need(list, "a list of host names")
            assert isinstance(value, list)
            for v in value:
                # RFC 8461 4.1: a name, or "*." and a name (the wildcard is one whole left-most label).
                if not isinstance(v, str) or not re.fullmatch(r"(\*\.)?[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+\.?", v):
                    raise ValueError(f"not a host name or *.host name: {v!r}")
            return [v.lower().rstrip(".") for v in value]
        case "stsmaxage":
            seconds = parse_duration(value)
            if not 0 <= seconds <= 31557600:
                raise ValueError(f"must be between 0 and 31557600 seconds (RFC 8461 3.2), got {value!r}")
            return seconds
        case "logformat":
            if value not in ("text", "json"):
                raise ValueError(f"expected text or json, got {value!r}")
            return value
        case "resolver":
            if value not in ("system", "unbound"):
                raise ValueError(f"expected system or unbound, got {value!r}")
            return value
        case "failurettl":
            seconds = parse_duration(value)
            if seconds > 30:
                raise ValueError(f"at most 30s (a failure must not outlive the outage), got {value!r}")
            return seconds
        case "dnserror" | "whendown":
            choices = ("defer", "accept") if kind == "dnserror" else ("accept_unscanned", "defer")
            if value not in choices:
                raise ValueError(f"expected {' or '.join(choices)}, got {value!r}")
            return value
        case "int":
            need(int, "a whole number")
            assert isinstance(value, int)
            if value < 0:
                raise ValueError(f"must not be negative, got {value}")
            return value
        case "duration":
            return parse_duration(value)
        case "score":
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"expected a positive number like 6.0, got {value!r}")
            return float(value)
        case "speed":
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"expected a positive number (1 is real time), got {value!r}")
            return float(value)
        case "time?":
            need(str, 'a time of day like "03:30"')
            assert isinstance(value, str)
            if value and not re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d(:[0-5]\d)?", value):
                raise ValueError(f'expected a time of day like "03:30", got {value!r}')
            return value
        case "datetime?":
            need(str, "a date and time like 2026-12-01T18:00:00")
            assert isinstance(value, str)
            if value:
                import datetime as dt

                dt.datetime.fromisoformat(value)
            return value
        case "durations":
            need(list, "a list of durations")
            assert isinstance(value, list)
            out = [parse_duration(v) for v in value]
            if not out:
                raise ValueError("must not be empty")
            return out
        case "size":
            return parse_size(value)
        case "path" | "dburl":
            need(str, "a string")
            return value
        case "loglevel":
            need(str, "a string")
            assert isinstance(value, str)
            if value.lower() not in ("debug", "info", "warning", "error"):
                raise ValueError(f"expected debug, info, warning or error, got {value!r}")
            return value.lower()
        case "node":
            need(str, "a node name")
            assert isinstance(value, str)
            if value and not _NODE_NAME.fullmatch(value):
                raise ValueError(f"expected letters, digits, dots and dashes (at most 63), got {value!r}")
            return value
        case "nodes":
            need(list, "a list of node names")
            assert isinstance(value, list)
            for v in value:
                if not isinstance(v, str) or not _NODE_NAME.fullmatch(v):
                    raise ValueError(f"not a node name: {v!r}")
            return list(value)
        case "roles":
            need(list, "a list of roles")
            assert isinstance(value, list)
            for v in value:
                if v not in ROLES:
                    raise ValueError(f"{v!r} is not a role; expected some of {', '.join(ROLES)}")
            if not value:
                raise ValueError(f"must name at least one of {', '.join(ROLES)}")
            return list(dict.fromkeys(value))
        case "store":
            if value not in ("maildir", "mbox"):
                raise ValueError(f"expected maildir or mbox, got {value!r}")
            return value
        case "domains":
            need(list, "a list of domain names")
            assert isinstance(value, list)
            for d in value:
                if not isinstance(d, str) or not re.fullmatch(r"[A-Za-z0-9.-]+", d):
                    raise ValueError(f"not a domain name: {d!r}")
            return [d.lower().rstrip(".") for d in value]
        case "listen" | "listen*":
            # One address or several, each served alike: ["0.0.0.0:25", "[::1]:25"]; listen* may be [] (off).
            what = "host:port, [IPv6]:port or unix:/path, or a list of them"
            items = [value] if isinstance(value, str) else value
            if not isinstance(items, list) or (not items and kind == "listen"):
                raise ValueError(f"expected {what}, got {value!r}")
            addresses: list[str] = []
            for item in items:
                if not isinstance(item, str):
                    raise ValueError(f"expected {what}, got {item!r}")
                text = item.strip()
                if text.startswith(UNIX_PREFIX) and not text[len(UNIX_PREFIX):].startswith("/"):
                    Endpoint.parse(text, base="/")  # checked now; Config.endpoints puts it in the config's folder
                    addresses.append(text)
                else:
                    addresses.append(str(Endpoint.parse(text)))
            if len(set(addresses)) != len(addresses):
                raise ValueError(f"an address is listed twice in {value!r}")
            return addresses
        case "listen?":
            need(str, "host:port, or empty for off")
            assert isinstance(value, str)
            if value:
                parse_hostport(value)
            return value
        case "rspamd":
            need(str, '"supervised", host:port, or empty for off')
            assert isinstance(value, str)
            if value and value != SUPERVISED:
                parse_hostport(value, 11333)
            return value
        case "hostport?":
            need(str, "host:port")
            assert isinstance(value, str)
            if value:
                parse_hostport(value, 25)
            return value
        case "hostports":
            need(list, "a list of host:port")
            assert isinstance(value, list)
            for v in value:
                parse_hostport(str(v), 53)
            return [str(v) for v in value]
        case "networks":
            import ipaddress

            need(list, "a list of networks like 192.0.2.0/24")
            assert isinstance(value, list)
            for v in value:
                ipaddress.ip_network(str(v), strict=False)
            return [str(v) for v in value]
        case "tlspolicy":
            need(dict, "a table of domain = none, may, encrypt, verify or dane")
            assert isinstance(value, dict)
            for k, v in value.items():
                if v not in ("none", "may", "encrypt", "verify", "dane"):
                    raise ValueError(f"{k}: expected none, may, encrypt, verify or dane, got {v!r}")
                if not re.fullmatch(r"\.?[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*\.?", str(k)):
                    raise ValueError(f"not a domain or .domain: {k!r}")
            return {str(k).lower(): str(v) for k, v in value.items()}
        case "transport":
            need(dict, "a table of domain = host:port")
            assert isinstance(value, dict)
            for v in value.values():
                parse_hostport(str(v), 25)
            return {str(k).lower(): str(v) for k, v in value.items()}
    raise AssertionError(kind)


def _build_section(cls: type[Any], name: str, data: object) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: expected a table [{name}]")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, object] = {}
    for key, value in data.items():
        f = fields.get(key)
        if f is None:
            raise ConfigError(f"{name}.{key}: unknown setting")
        try:
            values[key] = _convert(f.metadata["kind"], value)
        except ValueError as exc:
            raise ConfigError(f"{name}.{key}: {exc}") from None
    return cls(**values)


def load(path: str | os.PathLike[str] | None = None) -> Config:
    """Read and validate the config; raises ConfigError naming the bad key."""
    p = Path(path or os.environ.get("MAILROOM_CONFIG") or DEFAULT_PATH).absolute()
    try:
        raw = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such config file (create one with `mailroom init`)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    return from_dict(raw, p)


def from_dict(raw: dict[str, Any], path: Path) -> Config:
    hints = get_type_hints(Config)
    sections: dict[str, Any] = {}
    for key, value in raw.items():
        cls = hints.get(key)
        if key == "path" or cls is None:
            raise ConfigError(f"{key}: unknown section")
        if get_origin(cls) in (Union, types.UnionType):
            cls = get_args(cls)[0]
        sections[key] = _build_section(cls, key, value)
    cfg = Config(path=path, **sections)
    _check(cfg)
    return cfg


def _check(cfg: Config) -> None:
    """Rules that involve more than one key."""
    if not cfg.mailroom.domains:
        raise ConfigError("mailroom.domains: at least one local domain is needed")
    for key in ("mta.internal", "mda.lmtp"):
        for where in cfg.endpoints(key):
            if not where.is_loopback() and not cfg.cluster.ca:
                # These listeners trust what they are told (relaying, trace ids):
                # only this host may reach them, or peers proven by the cluster's CA.
                raise ConfigError(f"{key}: must be a loopback address or unix:/path, got {str(where)!r} "
                                  "(other hosts may reach it only over TLS with [cluster] ca set)")
    if cfg.queue.lease < MIN_LEASE:
        # Renewed a third of it apart: shorter would be renewals and little else.
        raise ConfigError(f"queue.lease: must be at least {MIN_LEASE:g}s, got {cfg.queue.lease:g}s")
    if not 1 <= cfg.mta.processes <= MAX_MTA_PROCESSES:
        raise ConfigError(f"mta.processes: expected 1 to {MAX_MTA_PROCESSES}, got {cfg.mta.processes}")
    if cfg.mta.processes > 1 and all(e.is_unix for e in cfg.endpoints("mta.smtp")):
        # The processes share TCP ports; a Unix socket is served by one process only.
        raise ConfigError("mta.processes: several processes need a TCP address in mta.smtp to share")
    if cfg.smtp.stress_threshold > 100:
        raise ConfigError(f"smtp.stress_threshold: a percentage of max_connections, 0 (off) to 100, got {cfg.smtp.stress_threshold}")
    if cfg.smtp.max_recipients < 1:
        raise ConfigError("smtp.max_recipients: must be at least 1")
    for resolver in cfg.outbound_tls.dnssec_resolvers:
        host, _ = parse_hostport(resolver, 53)
        if not _loopback_address(host):
            # The AD bit travels unsigned: only a resolver on this host can be believed.
            raise ConfigError(f"outbound_tls.dnssec_resolvers: must be a loopback address, got {resolver!r}")
    if cfg.filter.supervised:
        for key in ("scanner", "controller", "redis"):
            value = getattr(cfg.filter, key)
            # Redis and the controller trust what they are told: only this host may reach them.
            if not value or not Endpoint.parse(value).is_loopback():
                raise ConfigError(f"filter.{key}: a supervised rspamd needs a loopback host:port, got {value!r}")
    if cfg.dns.resolver == "unbound":
        # Answers from it are trusted (DNSSEC's AD flag): only a loopback hop is safe to trust.
        try:
            where = Endpoint.parse(cfg.dns.unbound_listen)
            loopback = not where.is_unix and where.is_loopback()
        except ValueError:
            loopback = False
        if not loopback:
            raise ConfigError(f"dns.unbound_listen: must be a loopback host:port, got {cfg.dns.unbound_listen!r}")
    if cfg.lab.enabled and not cfg.lab.dns:
        raise ConfigError("lab.dns: the lab needs its DNS server's address")
    if cfg.lab.time_warp != 1.0 and not cfg.lab.time_warp_since:
        # Each daemon would otherwise start lab time at its own start.
        raise ConfigError("lab.time_warp_since: needed when lab.time_warp is not 1")


def _loopback_address(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def render_default(domain: str, hostname: str, user: str = "", *, imap: bool = False, rspamd: bool = False) -> str:
    """The config `mailroom init` writes: development ports, everything under one folder."""
    return f"""\
# Mailroom configuration. `mailroom config show` prints every setting with its value.
# Relative paths are relative to this file's folder.

[mailroom]
hostname = "{hostname}"
domains = ["{domain}"]
# Every daemon serves as this account (started as root: after binding its ports).
user = "{user}"
# mail_group = "dovecot"      # a group that may read the mail root (IMAP/POP3 server)
database = "sqlite:///mailroom.db"
mail_root = "mail"
run_dir = "run"
# Each program's log: log/msa.log, log/mta.log, ... (deploy/logrotate.conf rotates them).
log_dir = "log"
log_level = "info"

[tls]
cert = "tls/cert.pem"
key = "tls/key.pem"

[msa]
submission = "127.0.0.1:2587"
submissions = "127.0.0.1:2465"

[mta]
smtp = "127.0.0.1:2525"
# The MSA's hand-off: a Unix socket in the run folder that only the daemons' user may use.
# A loopback address works too (then the MSA logs in with run/internal.secret).
internal = "{INTERNAL_SOCKET}"
trusted_networks = []
max_hops = 50
retry_schedule = ["5m", "10m", "20m", "40m", "1h"]
max_queue_lifetime = "5d"
delay_warning = "4h"
relayhost = ""

[mta.transport]
# "example.net" = "127.0.0.1:2626"

[mda]
lmtp = "127.0.0.1:2424"
recipient_delimiter = "+"

[imap]
# Dovecot for IMAP and POP3, run by `mailroom run` (see docs/operations.md).
enabled = {"true" if imap else "false"}
imap = "127.0.0.1:2143"
imaps = "127.0.0.1:2993"
pop3s = "127.0.0.1:2995"
# ManageSieve for users' filters (Thunderbird, Roundcube); needs dovecot-managesieved.
sieve = "127.0.0.1:2190"

[web]
listen = "127.0.0.1:8025"
# The admin page, over TLS only (`mailroom admin add NAME` makes an account).
admin = "127.0.0.1:8443"
# For the Internet (docs/operations.md, "Putting Mailroom on the Internet"):
# http = "0.0.0.0:80"      # ACME HTTP-01 answers and mail client autoconfig
# https = "0.0.0.0:443"    # the MTA-STS policy at mta-sts.DOMAIN

[acme]
# directory = "https://acme-v02.api.letsencrypt.org/directory"   # then `mailroom cert request`
# email = "postmaster@{domain}"

[mta_sts]
mode = "testing"

[dns]
# system: the nameservers below, or /etc/resolv.conf's; unbound: a local validating
# resolver that `mailroom run` starts (Debian's unbound), which every daemon asks.
resolver = "system"
nameservers = []

[dkim]
sign = true
key_dir = "dkim"

[mailauth]
check = true
dmarc_reject = true
dns_error = "defer"

[filter]
# "supervised": `mailroom run` runs rspamd and its Redis (see docs/operations.md,
# "Spam and filters"); host:port: an rspamd run elsewhere; "": no content filter.
rspamd = "{"supervised" if rspamd else ""}"
scanner = "127.0.0.1:2783"
controller = "127.0.0.1:2784"
redis = "127.0.0.1:2785"
when_down = "accept_unscanned"
dnsbl_zones = []

[backup]
# `mailroom backup init` makes the key; then a backup runs every day at `at`.
dir = "backup"
key = "backup.key"
at = ""
keep_days = 7
keep_weeks = 4
"""
