"""The lab's scenarios: one domain each, its DNS records, and how its MX hosts behave.

Every MX host has its own loopback address (127.0.0.11 and up) and listens on
`[mta] remote_port`, as real MX hosts all listen on port 25 at their own
addresses.  A host listed here with behaviour DOWN has an address and nothing
listening: a connection there is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# How an MX host answers (lab/mx.py).
ACCEPT = "accept"  # 250 to everything
GREYLIST = "greylist"  # 451 4.7.1 to the first try of each (client, sender, recipient), then 250
REFUSE = "refuse"  # 550 5.1.1 to every RCPT
SLOW = "slow"  # 250 to everything, each reply after [lab] slow_reply
NEEDS_TLS = "needs-tls"  # 530 5.7.0 to MAIL before STARTTLS
WRONG_CERT = "wrong-cert"  # 250 to everything, over TLS with a certificate for another name (lab/tlslab.py)
DANE = "dane"  # 250 to everything, over TLS with a self-signed certificate its TLSA record names
DOWN = "down"  # nothing listens

# The MTA-STS policy host (lab/tlslab.py) answers at this address, on [outbound_tls] mta_sts_port.
POLICY_HOST = "127.0.0.20"


@dataclass(frozen=True)
class Host:
    name: str
    address: str
    behaviour: str


@dataclass(frozen=True)
class Scenario:
    name: str
    domain: str
    summary: str
    outcome: str  # what the learner should see at the end
    mx: list[tuple[int, str]] = field(default_factory=list)  # (preference, host name); [(0, ".")] is a null MX
    hosts: list[Host] = field(default_factory=list)
    exists: bool = True  # False: NXDOMAIN
    records: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # more of the domain's DNS
    policy: str = ""  # the MTA-STS policy served at https://mta-sts.DOMAIN/.well-known/mta-sts.txt

    @property
    def recipient(self) -> str:
        return f"someone@{self.domain}"


SCENARIOS: list[Scenario] = [
    Scenario("accepts", "accepts.test", "its MX host accepts the message", "delivered",
             [(10, "mx.accepts.test")], [Host("mx.accepts.test", "127.0.0.11", ACCEPT)]),
    Scenario("greylists", "greylist.test", "its MX host answers 451 4.7.1 on the first try, then accepts",
             "deferred once, then delivered",
             [(10, "mx.greylist.test")], [Host("mx.greylist.test", "127.0.0.12", GREYLIST)]),
    Scenario("refuses", "refuses.test", "its MX host has no such user: 550 5.1.1",
             "bounced at once; the sender gets a DSN",
             [(10, "mx.refuses.test")], [Host("mx.refuses.test", "127.0.0.13", REFUSE)]),
    Scenario("slow", "slow.test", "its MX host accepts, but waits before every reply", "delivered, late",
             [(10, "mx.slow.test")], [Host("mx.slow.test", "127.0.0.14", SLOW)]),
    Scenario("needs-tls", "tls.test", "its MX host refuses MAIL without STARTTLS (530 5.7.0)",
             "delivered over TLS (Mailroom uses STARTTLS when offered)",
             [(10, "mx.tls.test")], [Host("mx.tls.test", "127.0.0.15", NEEDS_TLS)]),
    Scenario("backup-mx", "backup.test", "its primary MX host is down; the backup MX accepts",
             "delivered by the backup",
             [(10, "mx1.backup.test"), (20, "mx2.backup.test")],
             [Host("mx1.backup.test", "127.0.0.16", DOWN), Host("mx2.backup.test", "127.0.0.17", ACCEPT)]),
    Scenario("null-mx", "nullmx.test", "the domain publishes a null MX (RFC 7505): it takes no mail",
             "bounced at once (556 5.1.10) without a connection", [(0, ".")]),
    Scenario("no-such-domain", "nowhere.test", "the domain does not exist (NXDOMAIN)",
             "bounced at once (550 5.1.2)", exists=False),
    Scenario("unreachable", "unreachable.test", "its only MX host is down",
             "retried, a delay warning to the sender, then bounced when the queue lifetime ends",
             [(10, "mx.unreachable.test")], [Host("mx.unreachable.test", "127.0.0.18", DOWN)]),
    Scenario("mta-sts-wrong-cert", "sts.test",
             "MTA-STS enforce policy; its MX host's certificate names another host",
             "deferred on every try (451 4.7.5 certificate verify failed), never sent in clear, "
             "bounced when the queue lifetime ends",
             [(10, "mx.sts.test")], [Host("mx.sts.test", "127.0.0.19", WRONG_CERT)],
             records={"_mta-sts.sts.test": {"TXT": ['"v=STSv1; id=lab1"']},
                      "mta-sts.sts.test": {"A": [POLICY_HOST]}},
             policy="version: STSv1\r\nmode: enforce\r\nmx: mx.sts.test\r\nmax_age: 86400\r\n"),
    Scenario("dane", "dane.test", "DNSSEC-signed; its MX host's TLSA record names its self-signed certificate",
             "delivered over TLS, the certificate matched by its TLSA record (DANE-EE), no CA involved",
             [(10, "mx.dane.test")], [Host("mx.dane.test", "127.0.0.21", DANE)]),
]

BY_NAME = {s.name: s for s in SCENARIOS}


def records() -> dict[str, dict[str, list[str]]]:
    """The lab zone: name -> {type: [zone-file text]}; a name not here does not exist."""
    out: dict[str, dict[str, list[str]]] = {}
    for s in SCENARIOS:
        if not s.exists:
            continue
        out[s.domain] = {"MX": [f"{pref} {name}." if name != "." else f"{pref} ." for pref, name in s.mx]}
        for h in s.hosts:
            out[h.name] = {"A": [h.address]}
        out.update(s.records)
    return out


def policies() -> dict[str, str]:
    """mta-sts.DOMAIN -> its policy's text, for the lab's policy host."""
    return {f"mta-sts.{s.domain}": s.policy for s in SCENARIOS if s.policy}


def listening_hosts() -> list[Host]:
    return [h for s in SCENARIOS for h in s.hosts if h.behaviour != DOWN]


def help_text() -> str:
    width = max(len(s.name) for s in SCENARIOS)
    return "\n".join(f"  {s.name:<{width}}  {s.recipient}: {s.summary}" for s in SCENARIOS)
