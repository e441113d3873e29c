"""The live page in a real headless Chromium, over the whole running suite.

The page is opened first; then a message is submitted; without any reload the
page must show it crossing to the mailbox (pushed by the server), show its trace
on click, and the screenshot must show its dot, green, at the MDA.  /metrics of
the same web program must agree with the trace table.
"""

from __future__ import annotations

import contextlib
import re
import socket
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.browser import Browser, pixels
from tests.support.suite import Installation, maildir_messages, running

pytestmark = pytest.mark.timeout(180)

DELIVERED_GREEN = (0x22, 0xAA, 0x22)  # .dot.delivered in web/static/live.html


def test_a_submitted_message_moves_across_the_live_page_to_the_mailbox(suite: Installation, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{suite.ports['listen']}/"
    browser = Browser()
    try:
        browser.navigate(url)
        browser.wait("document.getElementById('status').textContent === 'live'", what="the live stream")
        assert browser.js("document.querySelectorAll('#messages tr.msg').length") == 0
        browser.js("window.loadedOnce = true")  # gone if the page were reloaded

        code, text = suite.submit("alice@example.org", ["alice@example.org"], b"Subject: watch me\r\n\r\nhi\r\n")
        assert code == 250
        m = re.search(rb"queued as ([0-9A-F]{18})", text)
        assert m, text
        trace = m.group(1).decode()
        box = suite.mailbox("alice@example.org")
        suite.wait_for(lambda: len(maildir_messages(box)) == 1, what="delivery")

        row = f"document.querySelector('#messages tr[data-trace=\"{trace}\"]')"
        state = browser.wait(
            f"{row} && {row}.dataset.state === 'delivered' && "
            f"[{row}.dataset.stage, {row}.querySelector('.where').textContent,"
            f" {row}.querySelector('.from').textContent]",
            what="the message delivered on the page",
        )
        assert state == ["mda", "mailbox", "alice@example.org"]
        assert browser.js("window.loadedOnce === true")  # pushed, not reloaded

        browser.js(f"{row}.click()")
        timeline = browser.wait(
            "(document.getElementById('trace-text') || {}).textContent", what="the trace after a click"
        )
        assert timeline.startswith(f"trace {trace}")
        for hop_event in ("msa  received", "mta  queued", "qmgr delivered", "mda  delivered"):
            assert hop_event in timeline, (hop_event, timeline)
        assert str(maildir_messages(box)[0]) in timeline  # the mailbox file, from the MDA's event

        # The screenshot shows the message's dot, green, over the MDA box.
        dot = browser.js(
            f"(() => {{ const d = document.querySelector('.dot[data-trace=\"{trace}\"]').getBoundingClientRect();"
            " const m = document.getElementById('hop-mda').getBoundingClientRect();"
            " return [d.left + d.width / 2, d.top + d.height / 2, m.left, m.right]; })()"
        )
        x, y, mda_left, mda_right = dot
        assert mda_left < x < mda_right
        png = browser.screenshot(tmp_path / "live.png")
        [colour] = pixels(png, [(round(x), round(y))])
        assert all(abs(a - b) <= 8 for a, b in zip(colour, DELIVERED_GREEN, strict=True)), colour
    finally:
        browser.close()

    # /metrics of the same program agrees with the trace table.
    with urllib.request.urlopen(url + "metrics", timeout=10) as r:
        families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
    exported = {(s.labels["hop"], s.labels["event"]): int(s.value)
                for s in families["mailroom_events"].samples if s.name == "mailroom_events_total"}
    events = suite.trace(trace)["events"]
    counted: dict[tuple[str, str], int] = {}
    for e in events:
        counted[(e["hop"], e["event"])] = counted.get((e["hop"], e["event"]), 0) + 1
    assert exported == counted  # one message in this installation: its trace is the whole table
    queue = {s.name: s.value for s in families["mailroom_queue_messages"].samples}
    assert queue == {"mailroom_queue_messages": 0.0}



def test_every_recipient_of_a_message_is_on_the_live_page(installation: Installation) -> None:
    """A message to a local user and to a remote host that never answers: its row names both
    at once (from the MTA's queued event), not only the recipient that already has an outcome;
    a page opened later shows both too."""
    silent = socket.create_server(("127.0.0.1", 0))  # accepts, and never says a word
    text = installation.config_path.read_text()
    installation.config_path.write_text(text.replace(
        "[mta.transport]\n", f'[mta.transport]\n"remote.test" = "127.0.0.1:{silent.getsockname()[1]}"\n', 1))
    url = f"http://127.0.0.1:{installation.ports['listen']}/"
    with contextlib.contextmanager(running)(installation) as suite:
        browser = Browser()
        try:
            browser.navigate(url)
            browser.wait("document.getElementById('status').textContent === 'live'", what="the live stream")
            code, reply = suite.submit("alice@example.org", ["alice@example.org", "x@remote.test"],
                                       b"Subject: two of us\r\n\r\nhi\r\n")
            assert code == 250
            m = re.search(rb"queued as ([0-9A-F]{18})", reply)
            assert m, reply
            trace = m.group(1).decode()
            suite.wait_for(lambda: len(maildir_messages(suite.mailbox("alice@example.org"))) == 1, what="delivery")
            row = f"document.querySelector('#messages tr[data-trace=\"{trace}\"]')"
            to = browser.wait(f"{row} && {row}.querySelector('.to').textContent.includes('alice') && "
                              f"{row}.querySelector('.to').textContent", what="the message on the page")
            assert to == "alice@example.org, x@remote.test", to
            # The remote attempt is still waiting for a greeting: no event names x@remote.test yet.
            assert not [e for e in suite.trace(trace)["events"] if e["recipient"] == "x@remote.test"]
            browser.navigate(url)  # a page opened now starts from the recent events: the same
            to = browser.wait(f"{row} && {row}.querySelector('.to').textContent", what="the row after a reload")
            assert to == "alice@example.org, x@remote.test", to
        finally:
            browser.close()
            silent.close()
