"""The live page in a real headless Chromium, over the whole running suite.

The page is opened first; then a message is submitted; without any reload the
page must show it crossing to the mailbox (pushed by the server), show its trace
on click, and the screenshot must show its dot, green, at the MDA.  /metrics of
the same web program must agree with the trace table.
"""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.browser import Browser, pixels
from tests.support.suite import Installation, maildir_messages

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
