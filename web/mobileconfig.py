"""An Apple configuration profile (.mobileconfig) that sets up a mail account on iOS and macOS.

Opened on an iPhone, iPad or Mac, the profile offers to add one IMAP (or POP)
account with this host's servers: the user confirms and types the password.
The servers are web/autoconfig.py's `settings()`, like every other answer:
IMAP with implicit TLS first, then STARTTLS, then POP3; submission likewise.
The password is never in the profile.

The profile is NOT signed, so the device shows it as "Unverified" before it is
installed.  Signing needs a certificate from a CA the devices trust and the
signing key on this host; a signed profile can be made from this one with
`openssl smime -sign -nodetach -outform der` by whoever holds such a key.

The payload identifiers and UUIDs are derived from the host and the address
(UUID version 5), so a second download replaces the installed profile instead
of adding a second account.  With no address (none given, or not in a local
domain), the profile leaves the address and user name out and the device asks
for them.  Like Autodiscover, it says nothing about which users exist.
"""

from __future__ import annotations

import plistlib
import uuid

from web.autoconfig import ClientSettings

CONTENT_TYPE = "application/x-apple-aspen-config"
_NAMESPACE = uuid.UUID("5f0c7a8e-3b1d-4c2e-9a57-6d8e1f2b3c4d")  # Mailroom's, for the profiles' UUIDs


def render(s: ClientSettings, domain: str, address: str = "") -> bytes:
    """The profile as an XML property list."""
    incoming = next((srv for srv in s.incoming if srv.kind == "imap"), s.incoming[0] if s.incoming else None)
    outgoing = s.outgoing[0] if s.outgoing else None
    if incoming is None or outgoing is None:
        raise LookupError("no incoming or no outgoing server is configured")
    reverse = ".".join(reversed(s.hostname.split(".")))
    ident = f"{reverse}.mailroom.{address or domain}"
    account: dict[str, object] = {
        "PayloadType": "com.apple.mail.managed",
        "PayloadVersion": 1,
        "PayloadIdentifier": f"{ident}.account",
        "PayloadUUID": str(uuid.uuid5(_NAMESPACE, f"{ident}.account")).upper(),
        "PayloadDisplayName": f"{address or domain} mail",
        "EmailAccountDescription": f"{address or domain} mail",
        "EmailAccountType": "EmailTypeIMAP" if incoming.kind == "imap" else "EmailTypePOP",
        "IncomingMailServerHostName": incoming.hostname,
        "IncomingMailServerPortNumber": incoming.port,
        "IncomingMailServerUseSSL": True,  # implicit TLS, or STARTTLS on a STARTTLS port
        "IncomingMailServerAuthentication": "EmailAuthPassword",
        "OutgoingMailServerHostName": outgoing.hostname,
        "OutgoingMailServerPortNumber": outgoing.port,
        "OutgoingMailServerUseSSL": True,
        "OutgoingMailServerAuthentication": "EmailAuthPassword",
        "OutgoingPasswordSameAsIncomingPassword": True,
    }
    if address:  # the whole address is the user name, on the MSA and in Dovecot alike
        account.update(EmailAddress=address, IncomingMailServerUsername=address,
                       OutgoingMailServerUsername=address)
    profile = {
        "PayloadType": "Configuration",
        "PayloadVersion": 1,
        "PayloadIdentifier": ident,
        "PayloadUUID": str(uuid.uuid5(_NAMESPACE, ident)).upper(),
        "PayloadDisplayName": f"Mail for {address or domain}",
        "PayloadDescription": f"Sets up the mail account {address or 'of ' + domain} on {s.hostname}. "
                              "Unsigned: the device shows it as unverified.",
        "PayloadOrganization": domain,
        "PayloadRemovalDisallowed": False,
        "PayloadContent": [account],
    }
    return plistlib.dumps(profile, fmt=plistlib.FMT_XML, sort_keys=True)
