"""`mailroom reload` (SIGHUP): a new certificate and the settings that can change safely, without a restart.

Every daemon (the skeleton, common/daemon.py) and the web program answer
SIGHUP the same way, and keep serving throughout:

1. read the config file again; a file that no longer loads is one error line,
   and everything stays as it was;
2. take from it the settings in `RELOADABLE`, which are read where they are
   used and nowhere held for longer than one message or one request; every
   other setting that changed is named in one line ("takes effect at the next
   restart"), because the listeners, limits and paths were fixed at the start
   (a port cannot move under a listener; a new database would split the queue);
3. load the certificate and key again (`[tls] cert`, `key`) for the next TLS
   handshakes (common/tls.py, ServerTLS); a pair that does not load is one
   error line, and the certificate served so far stays.

DKIM keys need nothing more: the MTA reads `[dkim] key_dir` again whenever
the folder changes, and every reload gives it a new config object, from
which it builds its signer (and resolver and filter client) again, so its
keys are read afresh, a selector changed in `[dkim]` included (mta/auth/mailauth.py).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from common import config as configmod
from common.config import Config

if TYPE_CHECKING:
    from common.tls import ServerTLS

log = logging.getLogger("reload")

# section -> the settings a reload takes (None: the whole section).  Every other
# setting, including those of sections added later, waits for a restart.
RELOADABLE: dict[str, frozenset[str] | None] = {
    "tls": None,  # the certificate and key files (and the files they name)
    "dkim": None,  # signing on/off, selectors, the key folder
    "mailauth": frozenset({"check", "dmarc_reject", "quarantine_header", "dns_error"}),
    "filter": None,  # rspamd's address, timeout, when_down, DNS blocklists
    "mta_sts": None,  # the policy the web program serves
    "acme": None,  # read by `mailroom cert` and the renewer at each attempt
    "mailroom": frozenset({"log_level"}),
}


def merge(old: Config, new: Config) -> tuple[Config, list[str]]:
    """`old` with the reloadable settings of `new`; and the names ("mta.smtp") of the other
    settings that differ, which keep their old values until a restart."""
    waiting: list[str] = []
    sections: dict[str, Any] = {}
    for f in dataclasses.fields(Config):
        if f.name == "path":
            continue
        before, after = getattr(old, f.name), getattr(new, f.name)
        if before == after:
            continue
        allowed = RELOADABLE.get(f.name, frozenset())
        changes = {}
        for setting in dataclasses.fields(before):
            value = getattr(after, setting.name)
            if getattr(before, setting.name) == value:
                continue
            if allowed is None or setting.name in allowed:
                changes[setting.name] = value
            else:
                waiting.append(f"{f.name}.{setting.name}")
        if changes:
            sections[f.name] = dataclasses.replace(before, **changes)
    return (dataclasses.replace(old, **sections) if sections else old), waiting


def reread(current: Config) -> Config:
    """The config to serve with from now on (see the module docstring); `current` when
    the file does not load.  Logs what changed and what waits for a restart."""
    try:
        fresh = configmod.load(current.path)
    except configmod.ConfigError as exc:
        log.error("reload: config error, nothing changed: %s", exc)
        return current
    merged, waiting = merge(current, fresh)
    # A new object even when nothing changed: what a daemon built from its config (the
    # MTA's DKIM keys, resolver, filter client) is built again, so a key file replaced
    # in place, which the folder's time does not show, is read again too.
    merged = dataclasses.replace(merged)
    if waiting:
        log.warning("reload: changed in the file, takes effect at the next restart: %s", ", ".join(waiting))
    if merged.mailroom.log_level != current.mailroom.log_level:
        logging.getLogger().setLevel(merged.mailroom.log_level.upper())
    return merged


def certificate(tls: ServerTLS, cfg: Config) -> bool:
    """Load the certificate and key again for new handshakes; False (logged) when they do not load."""
    cert, key = cfg.resolve(cfg.tls.cert), cfg.resolve(cfg.tls.key)
    try:
        tls.reload(cert, key)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        log.error("reload: cannot load %s with %s, still serving the previous certificate: %s", cert, key, exc)
        return False
    log.info("reload: certificate %s loaded for new connections", cert)
    return True
