"""What the MDA sends: a Sieve redirect or a vacation reply, handed to the MTA's internal listener.

The MDA keeps no queue; like the MSA, it hands a message to the MTA and
counts it sent only on the MTA's 250 (fsync'd in the queue).  From there the
queue manager delivers, retries and bounces it like any other.  A redirect
names the user whose filter sends it (`XREDIRECT=<address>`, a parameter only
the internal listener offers): the MTA records that user as the recipient's
original address, so the queue manager gives the message an SRS sender when
it leaves for another domain, exactly as for an alias that forwards.

Delivery runs in a worker thread; the SMTP session runs on the daemon's event
loop (`asyncio.run_coroutine_threadsafe`), and the thread waits for its reply.
"""

from __future__ import annotations

import asyncio
import ssl
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

from common import reply as R
from common.endpoint import Endpoint
from common.reply import Reply
from common.smtp_client import Client, NextHopError

# The internal listener's MAIL parameter naming the user whose filter redirects.
REDIRECT_PARAM = "XREDIRECT"


class Outbound:
    def __init__(
        self, internal: Endpoint, *, hostname: str, timeout: float, loop: asyncio.AbstractEventLoop,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.internal = internal
        self.tls = tls  # an internal listener on another host: TLS from the first byte (common/hop_tls.py)
        self.hostname = hostname
        self.timeout = timeout
        self.loop = loop

    def send(self, sender: str, recipient: str, content: bytes, *, redirected_by: str = "") -> Reply:
        """Hand one message to the MTA (from a worker thread); the MTA's reply for it."""
        params: list[str] = []
        if redirected_by:
            params.append(f"{REDIRECT_PARAM}={redirected_by}")
        if any(b > 0x7F for b in content):
            params.append("BODY=8BITMIME")
        future = asyncio.run_coroutine_threadsafe(self._send(sender, recipient, content, tuple(params)), self.loop)
        return self._wait(future)

    async def send_async(self, sender: str, recipient: str, content: bytes) -> Reply:
        """The same, from the event loop."""
        params = ("BODY=8BITMIME",) if any(b > 0x7F for b in content) else ()
        return await self._send(sender, recipient, content, params)

    def _wait(self, future: Future[Reply]) -> Reply:
        try:
            return future.result(self.timeout * 2)
        except FutureTimeout:
            future.cancel()
            return R.CONNECTION_LOST.with_text("The MTA did not answer in time")

    async def _send(self, sender: str, recipient: str, content: bytes, params: tuple[str, ...]) -> Reply:
        try:
            client = await Client.connect(self.internal, helo=self.hostname, timeout=self.timeout,
                                          connect_timeout=self.timeout, tls=self.tls, implicit_tls=self.tls is not None)
        except NextHopError as exc:
            return exc.reply
        try:
            replies = await client.send(sender, [recipient], content, mail_params=params)
            await client.quit()
        except NextHopError as exc:
            return exc.reply
        except (OSError, TimeoutError) as exc:
            return R.CONNECTION_LOST.with_text(f"The MTA's session failed: {exc}")
        finally:
            client.close()
        return replies[0]
