"""Microsoft's Autodiscover for Outlook: the "plain old XML" (POX) answer with this host's servers.

Outlook, when an account is added, POSTs to
`https://autodiscover.DOMAIN/autodiscover/autodiscover.xml` (and to
`https://DOMAIN/autodiscover/autodiscover.xml`) a request naming the address:

    <Autodiscover xmlns="http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006">
      <Request>
        <EMailAddress>alice@example.org</EMailAddress>
        <AcceptableResponseSchema>http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a</AcceptableResponseSchema>
      </Request>
    </Autodiscover>

and reads an `Account` of type `email` with one `Protocol` per server (IMAP,
POP3, SMTP; [MS-OXDSCLI] 2.2.4).  Implicit TLS is `<SSL>on</SSL>`; STARTTLS is
`<Encryption>TLS</Encryption>`, which takes precedence over SSL.  The servers are
web/autoconfig.py's `settings()`, so Thunderbird's answer, this one, the Apple
profile and `mailroom client-config` never disagree.  A GET with
`?emailaddress=` gets the same answer (some clients and people ask that way).

The request is read with a regular expression, not an XML parser: it is a few
hundred bytes from anyone on the Internet, and an XML parser would offer entity
expansion for nothing.  Any address in a local domain gets the same answer,
whether or not the user exists, so Autodiscover tells nobody who has a mailbox.
Outlook asks over HTTPS only: serve `[web] listen` behind a TLS proxy (or the
web program's own TLS, when it has one) for it to be found.
"""

from __future__ import annotations

import re
from xml.sax.saxutils import escape

from web.autoconfig import ClientSettings, Server

RESPONSE_NS = "http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006"
OUTLOOK_SCHEMA = "http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a"
MAX_REQUEST = 16 * 1024  # bytes of a POSTed request; a real one is a few hundred

_EMAIL = re.compile(r"<(?:[\w.-]+:)?EMailAddress\s*>\s*([^<\s]{1,320})\s*</", re.I)
_SCHEMA = re.compile(r"<(?:[\w.-]+:)?AcceptableResponseSchema\s*>\s*([^<\s]{1,500})\s*</", re.I)

# [MS-OXDSCLI] error codes: 600 the request was not understood, 601 the schema asked for is not served.
INVALID_REQUEST = 600
SCHEMA_NOT_SERVED = 601


def read_request(body: bytes) -> tuple[str, str]:
    """(the address, the response schema asked for) from a POX request ('' where absent)."""
    text = body[:MAX_REQUEST].decode("utf-8", "replace")
    email = _EMAIL.search(text)
    schema = _SCHEMA.search(text)
    return (email.group(1).lower() if email else "", schema.group(1) if schema else "")


def render(s: ClientSettings, address: str) -> str:
    """The POX answer: one email account with every configured server, incoming first."""
    out = [
        '<?xml version="1.0" encoding="utf-8"?>',
        f'<Autodiscover xmlns="{RESPONSE_NS}">',
        f'  <Response xmlns="{OUTLOOK_SCHEMA}">',
        "    <Account>",
        "      <AccountType>email</AccountType>",
        "      <Action>settings</Action>",
    ]
    for srv in [*s.incoming, *s.outgoing]:
        out.append(_protocol(srv, address))
    out += ["    </Account>", "  </Response>", "</Autodiscover>", ""]
    return "\n".join(out)


def _protocol(srv: Server, address: str) -> str:
    lines = [
        "      <Protocol>",
        f"        <Type>{srv.kind.upper()}</Type>",
        f"        <Server>{escape(srv.hostname)}</Server>",
        f"        <Port>{srv.port}</Port>",
        "        <DomainRequired>off</DomainRequired>",
    ]
    if address:
        lines.append(f"        <LoginName>{escape(address)}</LoginName>")  # the whole address, as everywhere
    lines += ["        <SPA>off</SPA>", "        <SSL>on</SSL>"]
    if srv.socket_type == "STARTTLS":
        lines.append("        <Encryption>TLS</Encryption>")
    lines.append("        <AuthRequired>on</AuthRequired>")
    if srv.kind == "smtp":
        lines.append("        <UsePOPAuth>on</UsePOPAuth>")  # the same name and password as for reading
    lines.append("      </Protocol>")
    return "\n".join(lines)


def render_error(code: int, message: str) -> str:
    """An Autodiscover error answer (Outlook then tries its next way)."""
    return "\n".join([
        '<?xml version="1.0" encoding="utf-8"?>',
        f'<Autodiscover xmlns="{RESPONSE_NS}">',
        "  <Response>",
        '    <Error Id="0">',
        f"      <ErrorCode>{code}</ErrorCode>",
        f"      <Message>{escape(message)}</Message>",
        "      <DebugData />",
        "    </Error>",
        "  </Response>",
        "</Autodiscover>",
        "",
    ])
