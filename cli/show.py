"""What the CLI prints: outside text made safe for a terminal, the config without its secrets.

Anything a sender, a remote server or a client's HELO chose can reach the
operator's terminal through `mailroom queue`, `trace`, `user list` and the
rest.  A control character there could move the cursor, retitle the window or
hide a line, so each one is shown as an escape (ESC as `\\x1b`) instead.  JSON
output needs none of this: JSON escapes control characters itself.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from common.config import Config

# C0 and C1 controls and DEL, the Unicode line and paragraph separators, and the
# bidirectional overrides and isolates that can reorder what the eye reads.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escape(m: re.Match[str]) -> str:
    code = ord(m.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def clean(value: object) -> str:
    """`value` as text with every control character escaped, on one line."""
    return _UNSAFE.sub(_escape, str(value))


SECRET = "********"


def public_config(cfg: Config) -> dict[str, Any]:
    """The effective configuration as `config show` prints it: every secret as ********.

    Secrets are the settings the schema marks as such, and every credential in
    the database URL (`mask_url`).
    """
    data = cfg.as_dict()
    for section in dataclasses.fields(cfg):
        value = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(value):
            continue
        for setting in dataclasses.fields(value):
            if setting.metadata.get("kind") == "secret" and data[section.name][setting.name]:
                data[section.name][setting.name] = SECRET
    data["mailroom"]["database"] = mask_url(data["mailroom"]["database"])
    return data


# user:PASSWORD@ before the path or query (a password may itself hold an @ or a /).
_URL_PASSWORD = re.compile(r"^([a-z0-9+.-]+://[^:/@?#]*:)[^?#]*@", re.I)
# A query parameter whose name says it carries a secret: libpq's password and
# sslpassword, and the tokens and keys of other drivers.  Masking a harmless one
# (sslkey, a file name) costs nothing; printing a password costs much.
_SECRET_NAME = re.compile(r"pass|pwd|secret|token|key|auth|cred", re.I)


def mask_url(url: str) -> str:
    """A database URL with every credential in it as ********: the password of the
    user part (postgresql+psycopg://user:PASSWORD@host/db) and the value of every
    query parameter that holds one (?password=..., &sslpassword=...)."""
    url = _URL_PASSWORD.sub(rf"\1{SECRET}@", url)
    base, sep, query = url.partition("?")
    if not sep:
        return url
    query, hash_sep, fragment = query.partition("#")
    pairs = []
    for pair in query.split("&"):
        name, eq, value = pair.partition("=")
        pairs.append(f"{name}={SECRET}" if eq and value and _SECRET_NAME.search(name) else pair)
    return base + sep + "&".join(pairs) + hash_sep + (SECRET if fragment else "")
