"""What a mail client needs to know to use this host, as text and as autoconfig XML.

Thunderbird (and K-9, Evolution, others) look for
`http://autoconfig.DOMAIN/mail/config-v1.1.xml` and
`http://DOMAIN/.well-known/autoconfig/mail/config-v1.1.xml` when an account is
added: with it, adding an account is typing an address and a password.  The
format is Mozilla's "clientConfig 1.1".  Both `mailroom client-config` and the
web program build their answer from `settings()`, so they never disagree.

Only servers that are configured are offered; the implicit-TLS ports come first
because RFC 8314 prefers them to STARTTLS.
"""

from __future__ import annotations

from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

from common.config import Config, parse_hostport

# Usernames are the full address, as the MSA and Dovecot both expect.
USERNAME = "%EMAILADDRESS%"


@dataclass(frozen=True)
class Server:
    kind: str  # imap | pop3 | smtp
    hostname: str
    port: int
    socket_type: str  # SSL (implicit TLS) | STARTTLS

    @property
    def security(self) -> str:
        return "SSL/TLS" if self.socket_type == "SSL" else "STARTTLS"


@dataclass(frozen=True)
class ClientSettings:
    hostname: str
    incoming: list[Server]
    outgoing: list[Server]


def _port(listen: str) -> int | None:
    """The port of a Dovecot listener setting; None when it is off (empty)."""
    return parse_hostport(listen)[1] if listen else None


def settings(cfg: Config) -> ClientSettings:
    """The servers a client should use, in order of preference."""
    host = cfg.mailroom.hostname
    incoming: list[Server] = []
    if cfg.imap.enabled:
        for kind, listen, socket_type in (
            ("imap", cfg.imap.imaps, "SSL"),
            ("imap", cfg.imap.imap, "STARTTLS"),
            ("pop3", cfg.imap.pop3s, "SSL"),
        ):
            port = _port(listen)
            if port is not None:
                incoming.append(Server(kind, host, port, socket_type))
    outgoing: list[Server] = []
    for key, socket_type in (("msa.submissions", "SSL"), ("msa.submission", "STARTTLS")):
        where = cfg.endpoint(key)  # the first address; a Unix socket is no use to a client
        if not where.is_unix:
            outgoing.append(Server("smtp", host, where.port, socket_type))
    return ClientSettings(host, incoming, outgoing)


def render_text(s: ClientSettings, address: str) -> str:
    """The settings as an operator reads them out to a user."""
    lines = [
        f"Account:   {address}",
        f"User name: {address} (the whole address)",
        "Password:  the one set with `mailroom user`",
    ]
    names = {"imap": "IMAP", "pop3": "POP3", "smtp": "SMTP"}
    for label, servers in (("Incoming", s.incoming), ("Outgoing", s.outgoing)):
        if not servers:
            lines.append(f"{label}:  none configured")
        for srv in servers:
            kind = names[srv.kind]
            lines.append(f"{label}:  {kind:4} {srv.hostname} port {srv.port} {srv.security}, normal password")
    return "\n".join(lines) + "\n"


def render_xml(s: ClientSettings, domain: str) -> str:
    """Mozilla autoconfig (clientConfig version 1.1) for accounts in `domain`."""
    out = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        '<clientConfig version="1.1">',
        f"  <emailProvider id={quoteattr(domain)}>",
        f"    <domain>{escape(domain)}</domain>",
        f"    <displayName>{escape(domain)} mail</displayName>",
        f"    <displayShortName>{escape(domain)}</displayShortName>",
    ]
    for srv in s.incoming:
        out.append(_server_xml("incomingServer", srv))
    for srv in s.outgoing:
        out.append(_server_xml("outgoingServer", srv))
    out += ["  </emailProvider>", "</clientConfig>", ""]
    return "\n".join(out)


def _server_xml(tag: str, srv: Server) -> str:
    return (
        f'    <{tag} type="{srv.kind}">\n'
        f"      <hostname>{escape(srv.hostname)}</hostname>\n"
        f"      <port>{srv.port}</port>\n"
        f"      <socketType>{srv.socket_type}</socketType>\n"
        f"      <username>{USERNAME}</username>\n"
        "      <authentication>password-cleartext</authentication>\n"
        f"    </{tag}>"
    )
