"""Mailroom's own SMTP/LMTP engine, used by every listener (MSA, MTA, MDA).

- `wire`: bytes to command lines, DATA messages and BDAT chunks (pure; limits, bare CR/LF);
- `session`: the state machine from greeting to QUIT, and the one function that writes replies;
- `handler`: the contract a daemon implements (return data, or raise `SMTPError(Reply)`);
- `serve`: serving sessions on a bound socket; `Limits` and `Listener`, set once per listener;
- `admission`: the connection caps (IPv6 by /64) and stress mode;
- `schedule`: which commands a session executes at once and which in its task;
- `params`: the arguments the engine checks itself (HELO name, BDAT size, MAIL and RCPT parameters);
- `sasl`: AUTH PLAIN and LOGIN as a pure exchange (challenges out, answers in).
"""

from common.smtp.admission import Connections
from common.smtp.handler import Handler, MailEnvelope, MailSession
from common.smtp.serve import Limits, in_networks, limits_from, serve

__all__ = [
    "Connections", "Handler", "Limits", "MailEnvelope", "MailSession",
    "in_networks", "limits_from", "serve",
]  # fmt: skip
