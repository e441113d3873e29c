"""STARTTLS command injection (CVE-2011-0411, CVE-2024-34083): what was pipelined after
STARTTLS in plaintext is thrown away, never answered inside the TLS session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness.client import STARTTLS_HANDSHAKE, line, run
from tests.harness.services import Since, Stack, listeners

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One installation's listeners for the module: starting them cost more than
    each test's session; each sees only what was queued since it began (`Since`)."""
    with listeners(tmp_path_factory.mktemp("starttls") / "mailroom") as stack:
        yield stack


@pytest.fixture
def stack(shared: Stack) -> Since:
    return Since(shared)


@pytest.mark.parametrize("key", ["submission", "smtp"])
@pytest.mark.parametrize(
    "injected", [b"RSET\r\n", b"MAIL FROM:<evil@remote.example>\r\nRCPT TO:<alice@example.org>\r\n"],
    ids=["RSET", "envelope"],
)
def test_commands_pipelined_after_starttls_are_discarded(stack: Since, key: str, injected: bytes) -> None:
    s = run(stack.ports[key], [
        (None, "220 "), (line("EHLO client.example"), "250 "),
        (b"STARTTLS\r\n" + injected, "220 "),  # one packet
        (STARTTLS_HANDSHAKE, None),
        # The first reply inside TLS must be EHLO's, not an answer to the injected lines.
        (line("EHLO client.example"), "250 "),
    ])
    try:
        first_tls_reply = s.transcript[s.transcript.index("   <TLS handshake>") + 2]
        assert first_tls_reply == "S: 250-mail.test", "\n".join(s.transcript)
        # Nothing is pending either: the next command gets its own answer.
        s.send(line("HELP"))
        s.expect("250 2.0.0 Supported commands")
    finally:
        s.close()
    assert stack.queued() == []
