"""A listener on [::] serves IPv4 and IPv6 clients, and policies see IPv4 clients as IPv4.

An IPv4 client of a dual-stack socket arrives as ::ffff:127.0.0.1; the engine
turns that into 127.0.0.1 before trusted_networks, the per-client connection
cap and the Received field see it.  The real MTA public listener and handler,
over loopback (127.0.0.1 and ::1).
"""

from __future__ import annotations

import smtplib
import socket
from collections.abc import Iterator
from functools import partial

import pytest

from common.models import Message
from common.smtp import limits_from
from mta.auth.mailauth import Current
from mta.smtpd import ReceivePolicy, SMTPHandler
from tests.harness.mta import MSG, queued_id
from tests.harness.services import Stack, installation
from tests.support.suite import Installation

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Installation:
    # The same message goes in more than once here, each time to be queued.
    return installation(tmp_path_factory.mktemp("ipv6") / "m", users=(("alice@example.org", "maildir"),),
                        mta={"resubmission_window": 0})


class DualStack:
    """The public listener on [::]:0, trusting 127.0.0.0/8 only, one connection per client."""

    def __init__(self, inst: Installation) -> None:
        self.stack = Stack(inst)
        self.ctx = ctx = self.stack.context()
        policy = ReceivePolicy.from_config(ctx.config, internal=False)
        policy = ReceivePolicy(**{**policy.__dict__, "trusted_networks": ("127.0.0.0/8",)})
        self.port = self.stack.listen(
            partial(SMTPHandler, policy, ctx.db, ctx.clock, Current(lambda: ctx.config, ctx.resolver())),
            endpoint="[::]:0",
            limits=limits_from(ctx.config.smtp, max_connections_per_client=1),
        )


@pytest.fixture
def listener(shared: Installation) -> Iterator[DualStack]:
    server = DualStack(shared)
    try:
        yield server
    finally:
        server.stack.close()


def test_an_ipv4_client_of_a_dual_stack_listener_is_trusted_as_ipv4(listener: DualStack) -> None:
    with smtplib.SMTP("127.0.0.1", listener.port, timeout=15) as c:
        c.ehlo("client.test")
        c.mail("someone@far.test")
        assert c.rcpt("x@elsewhere.test")[0] == 250  # 127.0.0.0/8 may relay
        code, text = c.data(MSG)
        assert code == 250
        # The per-client cap (1) counts 127.0.0.1, the same client however it came.
        with socket.create_connection(("127.0.0.1", listener.port), timeout=15) as second:
            assert second.recv(100).startswith(b"421 4.7.0")
    with listener.ctx.db.read() as s:
        m = s.get(Message, queued_id(text))
        assert m is not None and m.body is not None and m.client == "127.0.0.1"
        assert b"([127.0.0.1])" in m.body and b"ffff" not in m.body


def test_an_ipv6_client_of_the_same_listener_is_not_in_an_ipv4_network(listener: DualStack) -> None:
    with smtplib.SMTP("::1", listener.port, timeout=15) as c:
        c.ehlo("client.test")
        c.mail("someone@far.test")
        assert c.rcpt("x@elsewhere.test")[0] == 554  # ::1 is not in 127.0.0.0/8: no relay
        assert c.rcpt("alice@example.org")[0] == 250
