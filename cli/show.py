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

    Secrets are the settings the schema marks as such, and the password in a
    database URL (postgresql+psycopg://user:PASSWORD@host/db).
    """
    data = cfg.as_dict()
    for section in dataclasses.fields(cfg):
        value = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(value):
            continue
        for setting in dataclasses.fields(value):
            if setting.metadata.get("kind") == "secret" and data[section.name][setting.name]:
                data[section.name][setting.name] = SECRET
    data["mailroom"]["database"] = _URL_PASSWORD.sub(rf"\1{SECRET}@", data["mailroom"]["database"])
    return data


_URL_PASSWORD = re.compile(r"^([a-z0-9+.-]+://[^:/@]*:)[^@]*@", re.I)
