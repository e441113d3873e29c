"""What the sender asked of delivery, and what that means for one next hop.

The listener stored it with the message and each recipient (DSN: RET, ENVID,
NOTIFY, ORCPT, RFC 3461; BODY=8BITMIME, RFC 6152; SMTPUTF8, RFC 6531;
REQUIRETLS, RFC 8689).  The queue manager reads it back with its claim
(`queue.claim` fills an `Asked` per message, and each `queue.Claimed`
recipient carries its own NOTIFY and ORCPT), and before MAIL FROM
`refusal` says whether this next hop may take the message at all,
`mail_params`/`rcpt_params` what to declare to it.

An 8-bit message to a hop without 8BITMIME is bounced (5.6.3), not converted:
converting would change a signed body and is not needed by any peer we know.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from common import dsn, message
from common.reply import Reply

if TYPE_CHECKING:  # a type only: mta/queue.py imports this module (Asked), not the other way round
    from mta.queue import Claimed

NEEDS_SMTPUTF8 = Reply(553, "5.6.7", "The next hop does not support SMTPUTF8, which this message needs")  # RFC 6531 3.2
NEEDS_8BITMIME = Reply(554, "5.6.3", "The next hop does not support 8BITMIME, which this message needs")  # RFC 6152 3
NEEDS_BINARYMIME = Reply(
    554, "5.6.3", "The next hop does not support BINARYMIME and CHUNKING, which this message needs"
)  # RFC 3030 3
NEEDS_REQUIRETLS = Reply(550, "5.7.10", "REQUIRETLS needed")  # RFC 8689 5


@dataclass
class Asked:
    """One message's options (its recipients' own are in their `queue.Claimed`)."""

    ret: str = ""
    envid: str = ""
    body_type: str = "7BIT"
    smtputf8: bool = False
    requiretls: bool = False


@dataclass
class Outbound:
    """What goes with one transaction to one next hop (recipients in send order)."""

    asked: Asked
    recipients: list[Claimed]
    # Set by the delivery: the hop offered DSN and got NOTIFY/ORCPT, so it (or
    # a later hop) reports success itself; we report "relayed" only otherwise.
    dsn_passed: bool = False

    @property
    def binary(self) -> bool:
        """Declared BODY=BINARYMIME: it goes only with BDAT to a hop offering both (RFC 3030 3)."""
        return self.asked.body_type == "BINARYMIME"

    def needs_8bit(self, body: bytes) -> bool:
        # The content decides, not what was declared: a 7-bit body declared
        # 8BITMIME goes to any hop.  Checked in C (isascii: no octet >= 0x80);
        # a Python loop over the octets was a tenth of the queue manager's
        # busy samples (py-spy, load 1).
        return self.asked.body_type != "7BIT" and not body.isascii()

    def needs_utf8(self, sender: str, recipients: list[str], body: bytes) -> bool:
        if not self.asked.smtputf8:
            return False
        if not (sender + "".join(recipients)).isascii():
            return True
        return not message.header_of(body).isascii()

    def refusal(self, extensions: dict[str, str], sender: str, recipients: list[str], body: bytes) -> Reply | None:
        """Why this hop may not have the message (a permanent reply), or None."""
        if self.needs_utf8(sender, recipients, body) and "SMTPUTF8" not in extensions:
            return NEEDS_SMTPUTF8
        if self.binary and not ("BINARYMIME" in extensions and "CHUNKING" in extensions):
            return NEEDS_BINARYMIME
        if self.needs_8bit(body) and "8BITMIME" not in extensions:
            return NEEDS_8BITMIME
        if self.asked.requiretls and "REQUIRETLS" not in extensions:
            return NEEDS_REQUIRETLS.with_text("REQUIRETLS needed: the next hop does not offer it")
        return None

    def mail_params(self, extensions: dict[str, str], body: bytes) -> list[str]:
        a, out = self.asked, []
        if self.binary:
            out.append("BODY=BINARYMIME")  # refusal() made sure the hop offers it
        elif self.needs_8bit(body) and "8BITMIME" in extensions:
            out.append("BODY=8BITMIME")
        if a.smtputf8 and "SMTPUTF8" in extensions:
            out.append("SMTPUTF8")
        if a.requiretls:
            out.append("REQUIRETLS")
        if "DSN" in extensions:
            out += dsn.mail_params(ret=a.ret, envid=a.envid)
        return out

    def local_params(self, body: bytes) -> tuple[str, ...]:
        """For our own MDA (LMTP), which takes 8-bit, binary and UTF-8 mail and is the last hop."""
        if self.binary:
            out: tuple[str, ...] = ("BODY=BINARYMIME",)
        else:
            out = ("BODY=8BITMIME",) if self.needs_8bit(body) else ()
        return (*out, "SMTPUTF8") if self.asked.smtputf8 else out

    def rcpt_params(self, extensions: dict[str, str]) -> list[tuple[str, ...]] | None:
        if "DSN" not in extensions:
            return None
        self.dsn_passed = True
        return [tuple(dsn.rcpt_params(notify=r.notify, orcpt=r.orcpt)) for r in self.recipients]
