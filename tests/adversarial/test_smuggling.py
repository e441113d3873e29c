"""SMTP smuggling (CVE-2023-51764 and family): no end-of-data variant ever starts a second message.

Each variant ends the first message with something a lenient server might
take for <CRLF>.<CRLF>, followed by a complete smuggled transaction, and only
then the real end of data.  Every listener must either refuse and hang up
(521 5.5.2: a bare CR or LF) or keep it all as one message's body; never
queue or deliver the smuggled one.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness.client import CLOSED, line, run
from tests.harness.openings import LISTENERS, transaction
from tests.harness.services import Since, Stack, listeners

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One installation's listeners for the module: starting them cost more than each
    variant's session; each test sees only what arrived since it began (`Since`)."""
    with listeners(tmp_path_factory.mktemp("smuggling") / "mailroom") as stack:
        yield stack


@pytest.fixture
def stack(shared: Stack) -> Since:
    return Since(shared)

ENDINGS = {
    "LF.LF": b"\n.\n",
    "CR.CR": b"\r.\r",
    "LF.CRLF": b"\n.\r\n",
    "CRLF.LF": b"\r\n.\n",
    "CR.CRLF": b"\r.\r\n",
    "CRLF.CR": b"\r\n.\r",
    "CR.LF": b"\r.\n",
    "LF.CR": b"\n.\r",
    "NUL-before-dot": b"\r\n\x00.\r\n",
    "NUL-after-dot": b"\r\n.\x00\r\n",
}
BARE = {"NUL-before-dot": False, "NUL-after-dot": False}  # the others contain a bare CR or LF


@pytest.mark.parametrize("listener", ["msa", "mta", "mda"])
@pytest.mark.parametrize("ending", list(ENDINGS))
def test_no_ending_variant_smuggles_a_second_message(stack: Since, listener: str, ending: str) -> None:
    key, hello, sender, rcpt = LISTENERS[listener]
    smuggled = (
        b"MAIL FROM:<" + sender.encode() + b">\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n"
        b"Subject: smuggled\r\n\r\nI was never sent.\r\n"
    )
    data = b"Subject: first\r\n\r\nhello" + ENDINGS[ending] + smuggled + b".\r\n"
    if BARE.get(ending, True):
        run(stack.ports[key], [*hello(), *transaction(sender, rcpt), (data, "521 5.5.2"), (None, CLOSED)]).close()
        stored: list[bytes] = []
    else:
        # No bare line ending: the whole thing is one message, smuggled lines and all.
        run(stack.ports[key], [
            *hello(), *transaction(sender, rcpt), (data, "250 2.0.0"),
            (line("NOOP"), "250 2.0.0"),  # and the session is still in step
        ]).close()
        stored = [q.body for q in stack.queued()] + stack.mailbox(rcpt)
        assert len(stored) == 1
        assert b"Subject: smuggled" in stored[0] and b"hello" in stored[0]
    # Never anything for bob (the smuggled recipient) and never a second message.
    assert stack.mailbox("bob@example.org") == []
    assert all(q.recipients == (rcpt,) for q in stack.queued())
    assert len(stack.queued()) + len(stack.mailbox(rcpt)) == len(stored)
