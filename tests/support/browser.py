"""Headless Chromium (the Debian `chromium` package) driven over the DevTools protocol.

Enough for a test to open a page, read the rendered DOM with JavaScript, click, and
take a screenshot: one page, one WebSocket (websocket-client), commands answered in
order.  A missing Chromium is a failure, not a skip: the browser test is the only
proof that the live page works in a browser.
"""

from __future__ import annotations

import base64
import json
import shutil
import struct
import subprocess
import tempfile
import time
import urllib.request
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import websocket

from tests.support.ports import free_port


class Browser:
    def __init__(self, width: int = 1280, height: int = 900, extra_args: Sequence[str] = ()) -> None:
        exe = shutil.which("chromium")
        assert exe, "chromium is not installed (.ci/install-peers installs it)"
        self.port = free_port()
        self.profile = tempfile.mkdtemp(prefix="mailroom-chromium-")
        self.proc = subprocess.Popen(
            [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
             "--disable-background-networking", "--disable-dev-shm-usage", "--hide-scrollbars",
             f"--window-size={width},{height}", "--force-device-scale-factor=1",
             "--remote-debugging-address=127.0.0.1", f"--remote-debugging-port={self.port}",
             f"--user-data-dir={self.profile}", *extra_args, "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        self.ws = websocket.create_connection(self._page_socket(), timeout=30, suppress_origin=True)
        self._next = 0

    def _page_socket(self) -> str:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=2) as r:
                    pages = [t for t in json.load(r) if t.get("type") == "page"]
                if pages:
                    return str(pages[0]["webSocketDebuggerUrl"])
            except OSError:
                pass
            assert self.proc.poll() is None, "chromium exited"
            time.sleep(0.2)
        raise AssertionError("chromium's DevTools endpoint did not come up")

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        self._next += 1
        ident = self._next
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == ident:
                assert "error" not in msg, msg
                result: dict[str, Any] = msg["result"]
                return result

    def navigate(self, url: str) -> None:
        self.send("Page.enable")
        self.send("Page.navigate", url=url)

    def js(self, expression: str) -> Any:
        r = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in r, r
        return r["result"].get("value")

    def wait(self, expression: str, timeout: float = 30.0, what: str = "") -> Any:
        """Poll a JavaScript expression until it is truthy; returns its value.
        (An exception, say while the page is still loading, counts as not yet.)"""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(f"(() => {{ try {{ return ({expression}); }} catch (e) {{ return null; }} }})()")
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what or expression}; body:\n"
                             + str(self.js("document.body.innerText"))[:3000])

    def screenshot(self, path: Path) -> bytes:
        png = base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"])
        path.write_bytes(png)
        return png

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            shutil.rmtree(self.profile, ignore_errors=True)


def png_pixels(png: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB(A) bytes) of an 8-bit, non-interlaced RGB or RGBA PNG."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, b""
    width = height = channels = 0
    while pos < len(png):
        length, kind = struct.unpack(">I4s", png[pos:pos + 8])
        data = png[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", data)
            assert depth == 8 and color in (2, 6) and interlace == 0, (depth, color, interlace)
            channels = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += data
    raw = zlib.decompress(idat)
    stride = width * channels
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - channels] if i >= channels else 0
            b, c = prev[i], prev[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + a) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + b) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        rows.append(bytes(line))
        prev = line
    return width, height, rows


def pixels(png: bytes, points: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """The RGB colours at (x, y) points of a screenshot."""
    width, _, rows = png_pixels(png)
    channels = len(rows[0]) // width
    out = []
    for x, y in points:
        r, g, b = rows[y][x * channels:x * channels + 3]
        out.append((r, g, b))
    return out
