"""The MDA's LMTP listener with the real handler, for tests that talk LMTP to it line by line.

`MDA` is `Stack.listen_mda` on an installation, with the listener's limits
(1 MiB messages unless told) kept for the test to compare replies against.
"""

from __future__ import annotations

from common.smtp import Limits
from tests.harness.services import Stack
from tests.support.suite import Installation


class MDA:
    """The MDA's LMTP listener and handler on the harness's event loop."""

    def __init__(self, inst: Installation, limits: Limits | None = None) -> None:
        self.limits = limits or Limits(max_message_size=1024 * 1024)
        self.stack = Stack(inst)
        self.ctx, self.port = self.stack.listen_mda(limits=self.limits)

    def close(self) -> None:
        self.stack.close()
