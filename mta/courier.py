"""One interface for carrying a message to its next hop: a courier.

The queue manager (mta/qmgr.py) groups a message's due recipients by next hop
and hands each group to a courier as one `Attempt`; the courier answers with
`Delivered`, one reply per recipient in the order given.  It never decides
what a reply means (delivered, deferred, bounced: mta/queue.py `classify`),
and it never writes to the database.  Two couriers implement it
(mta/delivery.py):

- `LocalDelivery`, the last hop: LMTP (RFC 2033) to our own MDA, which answers
  once per recipient after DATA, because each mailbox succeeds or fails on its
  own.  Sessions are pooled and reused.  Where the MDA offers them, MAIL FROM
  says XRECORD (the MDA writes no event row; its outcome comes back in the
  reply, with the path of the copy, and the queue manager records it with its
  own settle) and XRETRY (an earlier attempt may have stored the message
  already: look for that copy); common/lmtp_ext.py explains both.
  The MDA takes 8-bit, binary and UTF-8 mail, so nothing is ever refused here
  for its content; the body type is only declared.

- `RemoteDelivery`: SMTP (RFC 5321) to another mail host.  It looks up the
  route (mta/routing.py: a transport map entry, the relayhost, or the domain's
  MX hosts with A/AAAA fallback, null MX and loops refused), tries the hosts in
  order until one answers, and uses STARTTLS when offered.  Before MAIL FROM it
  checks the host can honour what the sender asked (SMTPUTF8, 8BITMIME,
  BINARYMIME, REQUIRETLS: else a permanent reply, nothing sent) and passes on
  DSN requests (NOTIFY, ORCPT, RET, ENVID) to a host that offers DSN.  A
  refused RCPT gets its own reply; the others share the reply to DATA.

A hop that cannot be reached yields temporary (4xx) replies for every
recipient, so the mail waits and is tried again rather than bounced.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from common.address import domain_of
from common.reply import Reply
from mta import options


@dataclass(frozen=True)
class Attempt:
    """One message for one group of recipients that share a next hop."""

    trace: str
    sender: str  # the envelope sender to give this hop ("" is <>; SRS-rewritten for a forward)
    recipients: list[str]
    body: bytes
    # What the sender asked for (DSN, body type, SMTPUTF8, REQUIRETLS), with
    # these recipients' ids in the same order: each courier declares what its
    # hop understands.
    outbound: options.Outbound
    # An earlier attempt may have reached the hop (its 250 was lost to a crash).
    retry: bool = False

    @property
    def domain(self) -> str:
        """The recipients' domain: a group to a remote hop shares one."""
        return domain_of(self.recipients[0])


@dataclass(frozen=True)
class Delivered:
    """What the next hop answered: one reply per recipient, in the attempt's order."""

    replies: list[Reply]
    # Who answered: the MX or relay host, the MDA's endpoint for LMTP; "" when
    # no host answered at all (none reachable, or refused before connecting).
    host: str = ""
    # The MDA wrote no event of its own (XRECORD): its outcomes, carried in its
    # replies, are ours to record.
    ours_to_record: bool = False
    # Then, for each recipient in the attempt's order, the file the MDA stored
    # its copy in ("" where it refused), taken out of the reply's text.
    paths: list[str] = field(default_factory=list)
    # The hop took NOTIFY/ORCPT: reporting success is its job from now on (RFC 3461 5.2.2).
    dsn_passed: bool = False


class Courier(Protocol):
    """Carries messages to one kind of next hop; see the module docstring."""

    @property
    def local(self) -> bool:
        """True for our own MDA: the last hop, whose failures are our host's (short retries)."""
        ...

    async def deliver(self, attempt: Attempt) -> Delivered:
        """One transaction; failures come back as replies, never as exceptions."""
        ...

    async def close(self) -> None:
        """Say QUIT on the sessions kept for reuse (at shutdown)."""
        ...
