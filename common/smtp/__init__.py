"""Mailroom's own SMTP/LMTP engine, used by every listener (MSA, MTA, MDA).

- `wire`: bytes to command lines, DATA messages and BDAT chunks (pure; limits, bare CR/LF);
- `session`: the state machine from greeting to QUIT, and the one function that writes replies;
- `handler`: the contract a daemon implements (return data, or raise `SMTPError(Reply)`);
- `serve`: serving sessions on a bound socket;
- `admission`: the connection caps (IPv6 by /64) and stress mode;
- `params`: the arguments the engine checks itself (HELO name, BDAT size, SIZE=).
"""

from common.smtp.admission import Connections
from common.smtp.handler import Handler, MailEnvelope, MailSession
from common.smtp.serve import in_networks, limits_from, serve
from common.smtp.session import Limits

__all__ = [
    "Connections", "Handler", "Limits", "MailEnvelope", "MailSession",
    "in_networks", "limits_from", "serve",
]  # fmt: skip
