"""The MTA's two listeners (public, internal) with the real handler, for tests that talk SMTP to them.

`MTA` is `Stack.listen_mta` on an installation (with [mta] settings changed for
this stack only), smtplib clients of either listener (the internal one's after
AUTH with the hop secret, as our MSA logs in) and the queued message read back.
`MSG` is the message these tests send; `queued_id` reads the trace id from
the 250 reply to DATA.
"""

from __future__ import annotations

import re
import smtplib
from typing import Any

from sqlalchemy import select

from common import hop_secret
from common.models import Message, Recipient
from tests.harness.services import Stack
from tests.support.suite import Installation

MSG = b"From: someone@far.test\r\nSubject: hi\r\nMessage-ID: <m1@far.test>\r\n\r\nhello\r\n"


class MTA:
    """Public and internal listeners on the harness's event loop (Stack.listen_mta)."""

    def __init__(self, inst: Installation, **mta: Any) -> None:
        self.inst = inst
        self.stack = Stack(inst)
        self.ctx, self.public_port, self.internal_port = self.stack.listen_mta(mta=mta)

    def close(self) -> None:
        self.stack.close()

    def client(self, internal: bool = False) -> smtplib.SMTP:
        s = smtplib.SMTP("127.0.0.1", self.internal_port if internal else self.public_port, timeout=15)
        s.ehlo("client.test")
        if internal:  # over TCP the internal listener takes our MSA only, after AUTH with the secret
            s.login(hop_secret.LOGIN, hop_secret.load(self.inst.config.run_dir))
        return s

    def message(self, trace: str) -> tuple[Message, list[Recipient]]:
        with self.ctx.db.read() as s:
            m = s.get(Message, trace)
            assert m is not None, trace
            return m, list(s.scalars(select(Recipient).where(Recipient.message_id == trace)))


def queued_id(text: bytes) -> str:
    """The trace id in the MTA's reply to DATA ("2.0.0 Ok: queued as ...", without the code)."""
    m = re.fullmatch(rb"2\.0\.0 Ok: queued as ([0-9A-F]{18})", text)
    assert m, text
    return m.group(1).decode()
