"""Outbound TLS policy: for each MX host of a destination, what TLS it must give before it gets mail.

Where the rule for a host comes from, first match wins:

1. `[outbound_tls.policy]`, the operator's table for the recipient domain
   (Postfix's smtp_tls_policy_maps), overriding everything discovered:
   - `none`: no STARTTLS at all (for a host whose TLS is broken);
   - `may`: STARTTLS when offered, certificate unchecked (RFC 3207);
   - `encrypt`: TLS required, certificate unchecked;
   - `verify`: TLS required, the certificate must chain to a trusted CA and
     name the MX host (as the MX lookup found it);
   - `dane`: DANE required (Postfix's "dane-only"): DNSSEC-validated, usable
     TLSA records for every MX host used, and a certificate matching them;
     without them the mail waits.  (Discovery below already uses DANE where
     it is published; this entry makes its absence an error.)
2. DANE (RFC 7672, mta/dane.py), per MX host, when a trusted validating
   resolver vouches for the records.  DANE comes before MTA-STS (RFC 8461 2:
   a host with DANE is checked by DANE alone).
3. MTA-STS (RFC 8461, mta/mtasts.py), per domain: `enforce` lets mail go
   only to MX hosts the policy lists, over TLS with a certificate verified for
   that host name; a listed host that fails, and every unlisted one, is
   skipped, and when none is left the mail waits (4.7.5, retried on the
   usual schedule; the policy is looked at again each time).  `testing`
   checks the same, reports what fails (TLS-RPT), and delivers anyway.
4. Otherwise opportunistic STARTTLS, as before.

Mail that asked for REQUIRETLS (RFC 8689) needs at least `verify` whatever
the rule says.  The relayhost is none of this: it keeps its own verified-TLS
rule (`[mta] relayhost_tls_verify`), and transport-map hosts follow only the
operator's table.

Every new session to an MX host is counted for TLS-RPT (mta/tlsrpt.py), with
the policy it was made under and its result.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import IntEnum

from common import reply as R
from common.reply import Reply
from common.smtp_client import Client, NextHopError, NoStartTLS
from common.tls import client_context
from mta import dane, mtasts, tlsrpt
from mta.routing import Route
from mta.tlsdns import PolicyResolver

log = logging.getLogger("tlspolicy")


class Level(IntEnum):
    """How much TLS a host must give, weakest first."""

    NONE = 0
    MAY = 1
    ENCRYPT = 2
    VERIFY = 3
    DANE = 4


LEVELS = {level.name.lower(): level for level in Level}


class Table:
    """`[outbound_tls.policy]`: "example.net" is that domain, ".example.net" every domain under it."""

    def __init__(self, entries: dict[str, str]) -> None:
        self.entries = {k.lower().rstrip("."): LEVELS[v] for k, v in entries.items()}

    def lookup(self, domain: str) -> Level | None:
        domain = domain.lower().rstrip(".")
        if domain in self.entries:
            return self.entries[domain]
        labels = domain.split(".")
        for i in range(1, len(labels)):
            parent = "." + ".".join(labels[i:])
            if parent in self.entries:
                return self.entries[parent]
        return None


@dataclass(frozen=True)
class Rule:
    """What TLS one MX host must give (see the module docstring)."""

    level: Level
    name: str  # the MX host name: SNI, what `verify` checks, DANE-TA's reference identifier
    source: str  # where the rule came from, for the log: "DANE", "MTA-STS enforce", ...
    report: tlsrpt.PolicyRef | None = None  # the policy TLS-RPT counts the session under (None: not counted)
    tlsa: tuple[dane.TLSA, ...] = ()
    names: tuple[str, ...] = ()  # the names a DANE-TA certificate may carry: the MX host, the domain
    enforce: bool = True  # False: MTA-STS testing: a failed check is reported, and the mail goes anyway
    refusal: Reply | None = None  # this host must not be used now
    failure: str = ""  # a TLS-RPT result counted even when the session works (testing mismatch, ...)
    reason: str = ""  # its words, for the report and the log


def _refused(name: str, source: str, report: tlsrpt.PolicyRef | None, result: str, text: str) -> Rule:
    return Rule(Level.VERIFY, name, source, report, refusal=R.TLS_FAILED.with_text(text), failure=result, reason=text)


# An ssl verify code -> its TLS-RPT result type (OpenSSL's X509_V_ERR_* numbers).
_VERIFY_RESULTS = {
    10: tlsrpt.EXPIRED,  # certificate has expired
    62: tlsrpt.HOST_MISMATCH,  # hostname mismatch
    **dict.fromkeys((2, 18, 19, 20, 21, 27, 28), tlsrpt.NOT_TRUSTED),  # no issuer, self-signed, untrusted...
}


def tls_result(exc: NextHopError) -> str | None:
    """The TLS-RPT result type of a failed session, None when it failed before TLS was in question."""
    if isinstance(exc, NoStartTLS):
        return tlsrpt.STARTTLS_NOT_SUPPORTED
    cause = exc.__cause__
    if isinstance(cause, ssl.SSLCertVerificationError):
        return _VERIFY_RESULTS.get(cause.verify_code, tlsrpt.VALIDATION_FAILURE)
    if isinstance(cause, ssl.SSLError | OSError) and exc.reply.status == "4.7.5":
        return tlsrpt.VALIDATION_FAILURE  # the handshake itself failed
    return None


Connect = Callable[[ssl.SSLContext | None, bool], Awaitable[Client]]


class Planner:
    """Decides the rules (`rules`) and opens sessions that keep them (`open`)."""

    def __init__(
        self, *, table: Table, resolver: PolicyResolver | None = None,
        policies: mtasts.Policies | None = None, use_dane: bool = True, ca_file: str = "",
        recorder: tlsrpt.Recorder | None = None,
    ) -> None:
        self.table = table
        self.resolver = resolver
        self.policies = policies
        self.use_dane = use_dane and resolver is not None
        self.recorder = recorder
        self.ca_file = ca_file
        self.opportunistic = client_context(verify=False)

    @functools.cached_property
    def verified(self) -> ssl.SSLContext:
        """For `verify` and MTA-STS: a trusted CA and the MX host's name.  Made at first use:
        a lab makes its CA file when it starts, perhaps after the queue manager."""
        ctx = ssl.create_default_context(cafile=self.ca_file or None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    async def rules(self, domain: str, route: Route, *, requiretls: bool = False) -> dict[str, Rule]:
        """The rule for each host of `route` (by lower-case MX host name, or host for a fixed route)."""
        names = list(dict.fromkeys(route.names.get(h, h).lower() for h, _ in route.hosts))
        configured = self.table.lookup(domain)
        if route.via != "mx":
            # A transport-map host or an address literal: no MX to discover anything for.
            level = Level.MAY if configured is None or configured is Level.DANE else configured
            rules = {n: Rule(level, n, "policy table" if configured is not None else "opportunistic") for n in names}
        elif configured is not None and configured is not Level.DANE:
            rules = {n: Rule(configured, n, "policy table") for n in names}
        else:
            rules = await self._discover(domain, names, dane_required=configured is Level.DANE)
        if requiretls:
            rules = {
                n: r if r.refusal or (r.level >= Level.VERIFY and r.enforce)
                else dataclasses.replace(r, level=Level.VERIFY, enforce=True, source=f"{r.source}, REQUIRETLS")
                for n, r in rules.items()
            }
        return rules

    async def _discover(self, domain: str, names: list[str], *, dane_required: bool) -> dict[str, Rule]:
        found = dane.Discovery(secure=False)
        if self.resolver is not None and (self.use_dane or dane_required):
            found = await dane.discover(self.resolver, domain, names)
        sts = mtasts.Found()
        if self.policies is not None and not dane_required:
            sts = await self.policies.find(domain)
        rules: dict[str, Rule] = {}
        for name in names:
            host = found.host(name)
            tlsa_ref = tlsrpt.PolicyRef(tlsrpt.TLSA, domain, host.records, (name,))
            if host.state == dane.DANE:
                rules[name] = Rule(Level.DANE, name, "DANE", tlsa_ref, tlsa=host.usable, names=(name, domain))
            elif host.state == dane.FAILED:
                rules[name] = _refused(name, "DANE", tlsa_ref, tlsrpt.DNSSEC_INVALID, f"DANE: {host.reason}")
            elif dane_required:
                text = f"DANE required for {domain} ([outbound_tls.policy]) but {host.reason}"
                rules[name] = _refused(name, "policy table", tlsa_ref, tlsrpt.DANE_REQUIRED, text)
            elif host.state == dane.UNUSABLE:
                rules[name] = Rule(Level.ENCRYPT, name, "DANE", tlsa_ref, failure=tlsrpt.TLSA_INVALID,
                                   reason=host.reason)
            else:
                rules[name] = self._sts_rule(domain, name, sts)
        return rules

    @staticmethod
    def _sts_rule(domain: str, name: str, sts: mtasts.Found) -> Rule:
        policy = sts.policy
        if policy is None or policy.mode == mtasts.NONE:
            if sts.failure is not None:  # announced, but no policy could be had: reported, then opportunistic
                ref = tlsrpt.PolicyRef(tlsrpt.STS, domain)
                return Rule(Level.MAY, name, "opportunistic", ref, failure=sts.failure[0], reason=sts.failure[1])
            return Rule(Level.MAY, name, "opportunistic", tlsrpt.PolicyRef(tlsrpt.NO_POLICY, domain))
        ref = tlsrpt.PolicyRef(tlsrpt.STS, domain, policy.lines, policy.mx)
        source = f"MTA-STS {policy.mode}"
        if policy.allows(name):
            return Rule(Level.VERIFY, name, source, ref, enforce=policy.mode == mtasts.ENFORCE)
        text = f"MX host {name} is not allowed by the MTA-STS policy of {domain} (mx: {', '.join(policy.mx)})"
        if policy.mode == mtasts.ENFORCE:
            return _refused(name, source, ref, tlsrpt.VALIDATION_FAILURE, text)
        return Rule(Level.MAY, name, source, ref, enforce=False, failure=tlsrpt.VALIDATION_FAILURE, reason=text)

    async def open(self, rule: Rule, ip: str, connect: Connect) -> Client:
        """A session with host `ip` that keeps `rule`; raises NextHopError (4.7.5 when the rule forbids it)."""
        if rule.refusal is not None:
            log.warning("not delivering to %s (%s): %s", rule.name, ip, rule.refusal.text)
            self._count(rule, rule.failure, ip, "", rule.reason)
            raise NextHopError(rule.refusal)
        tls, required = {
            Level.NONE: (None, False), Level.MAY: (self.opportunistic, False),
            Level.ENCRYPT: (self.opportunistic, True), Level.VERIFY: (self.verified, rule.enforce),
            Level.DANE: (self.opportunistic, True),
        }[rule.level]
        try:
            client = await connect(tls, required)
        except NextHopError as exc:
            result = tls_result(exc)
            if result is None:
                raise  # not reached, or refused before TLS: no TLS session to count
            self._count(rule, result, ip, "", exc.reply.text)
            if rule.enforce or rule.level is not Level.VERIFY:
                log.warning("%s (%s): %s: %s", rule.name, ip, rule.source, exc.reply.text)
                raise
            # MTA-STS testing: reported; the mail goes as it would without a policy.
            log.warning("%s (%s): %s failed (%s): delivering anyway, as the policy is only testing",
                        rule.name, ip, rule.source, exc.reply.text)
            return await connect(self.opportunistic, False)
        if rule.level is Level.DANE:
            # Real time, not the queue's clock (a lab's runs fast): certificates live in the real world.
            now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
            problem = dane.check_chain(rule.tlsa, client.peer_chain(), rule.names, now)
            if problem:
                text = f"DANE: {rule.name} ({ip}): {problem}"
                log.warning("not delivering to %s", text)
                result = tlsrpt.EXPIRED if "not valid at validation time" in problem else tlsrpt.HOST_MISMATCH
                self._count(rule, result, ip, client.local_address(), problem)
                client.close()
                raise NextHopError(R.TLS_FAILED.with_text(text))
        if rule.failure:
            self._count(rule, rule.failure, ip, client.local_address(), rule.reason)
        elif not client.tls and rule.level is not Level.NONE:
            self._count(rule, tlsrpt.STARTTLS_NOT_SUPPORTED, ip, client.local_address(), "no STARTTLS")
        else:
            self._count(rule, "", ip, client.local_address(), "")
        log.info("%s (%s): %s, %s", rule.name, ip, "TLS" if client.tls else "no TLS", _how(rule))
        return client

    def _count(self, rule: Rule, result: str, ip: str, sending_ip: str, reason: str) -> None:
        if self.recorder is None or rule.report is None:
            return
        if result:
            self.recorder.failure(rule.report, result, rule.name, ip, sending_ip, reason)
        else:
            self.recorder.success(rule.report, rule.name, ip, sending_ip)


def _how(rule: Rule) -> str:
    if rule.level is Level.DANE:
        return "certificate matched the DANE TLSA records"
    if rule.level is Level.VERIFY and rule.enforce:
        return f"certificate verified for {rule.name} ({rule.source})"
    return f"{rule.level.name.lower()} ({rule.source})"
