"""The live page and /metrics: what the web program shows from the shared database.

Read-only: every handler here only SELECTs.  `/` is a static page
(web/static/live.html, plain HTML and JavaScript, nothing fetched from elsewhere)
that opens `/live` (Server-Sent Events: every new hop event and the queue as they
change) and asks `/trace?id=` for a message's whole journey when it is clicked.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import AsyncGenerator
from http import HTTPStatus
from importlib import resources

from sqlalchemy import or_, select

from common.config import Config
from common.db import Database
from common.models import Event, Message
from web.feed import Feed, event_row, public
from web.http import Handler, Request, Response
from web.metrics import Metrics

PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"


@functools.cache
def page() -> bytes:
    """The live page, read once (by web/server.py's bind, as root perhaps: the package may
    not be readable after the switch)."""
    return resources.files("web").joinpath("static/live.html").read_bytes()


def trace_of(db: Database, ident: str) -> dict[str, object] | None:
    """One message's events (by trace id or Message-ID), as the page shows them."""
    with db.read() as s:
        mid = ident if ident.startswith("<") else f"<{ident}>"
        msg = s.scalars(select(Message).where(or_(Message.id == ident.upper(), Message.message_id == mid))).first()
        trace = msg.id if msg else ident.upper()
        events = [public(event_row(e)) for e in
                  s.scalars(select(Event).where(Event.trace_id == trace).order_by(Event.time, Event.id))]
        if msg is None and not events:
            return None
        return {"id": trace, "message_id": msg.message_id if msg else "", "sender": msg.sender if msg else "",
                "events": events}


class Live:
    """The handlers of the live page and /metrics over one database and one feed."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.metrics = Metrics(db)
        self.feed = Feed(db, self.metrics)
        self.page = page()

    def routes(self) -> dict[str, Handler]:
        return {"/": self.index, "/live": self.live, "/trace": self.trace, "/metrics": self.scrape}

    def index(self, cfg: Config, request: Request) -> Response:
        return Response(HTTPStatus.OK, self.page, "text/html; charset=utf-8",
                        headers={"Cache-Control": "no-store", "Content-Security-Policy": "default-src 'self'; "
                                 "style-src 'self' 'unsafe-inline'; script-src 'self' 'unsafe-inline'"})

    def scrape(self, cfg: Config, request: Request) -> Response:
        self.feed.catch_up()  # everything committed before the scrape is counted
        self.metrics.read_daemons(cfg)
        return Response(HTTPStatus.OK, self.metrics.render(), PROMETHEUS)

    def trace(self, cfg: Config, request: Request) -> Response:
        ident = (request.query.get("id") or [""])[0].strip()
        found = trace_of(self.db, ident) if ident else None
        if found is None:
            return Response(HTTPStatus.NOT_FOUND, b'{"error": "no such message"}\n', "application/json")
        return Response(HTTPStatus.OK, json.dumps(found).encode(), "application/json",
                        headers={"Cache-Control": "no-store"})

    def live(self, cfg: Config, request: Request) -> Response:
        feed = self.feed

        async def stream() -> AsyncGenerator[bytes, None]:
            # Runs on the event loop (the handler itself runs in a thread).
            queue = feed.listen()
            if queue is None:
                yield b": too many live pages open\nretry: 10000\n\n"
                return
            try:
                # The feed keeps the queue snapshot fresh only while a page listens.
                await asyncio.to_thread(feed.refresh)
                yield b"retry: 2000\n\n" + feed.hello()
                while (chunk := await queue.get()) is not None:
                    yield chunk
            finally:
                feed.leave(queue)

        return Response(HTTPStatus.OK, content_type="text/event-stream; charset=utf-8",
                        headers={"Cache-Control": "no-store"}, stream=stream)
