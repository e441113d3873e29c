"""When the MDA says 250, the copy and its name in new/ are on disk: the shared fsync of new/.

The MDA fsyncs each file in tmp/, links it into new/, and fsyncs new/; an fsync
of a directory makes durable every entry linked before it began, so deliveries
in flight at the same moment share one (mda/maildir.py, `_sync_new_entry`).
Sharing must never let a 250 go out before the fsync that covers its own
entry has returned.  These tests watch the real listener under concurrent
sessions: every fsync of new/ notes which entries it covers (those present
when it began) only once it has returned, after a pause that leaves a 250
sent too early plenty of time to reach the client first; each client checks,
the moment a 250 arrives, that the file it names is among them.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mda import maildir
from tests.harness.client import Client, stuff
from tests.harness.mda import MDA
from tests.harness.users import add_user
from tests.support.suite import Installation, maildir_messages

pytestmark = pytest.mark.timeout(90)

SESSIONS = 8
MESSAGES = 6  # per session
PAUSE = 0.02  # seconds an fsync of new/ "takes" before its entries count as durable


class Watch:
    """What each fsync of a `new/` folder covered, recorded once the fsync has returned."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.durable: set[str] = set()
        self.fsyncs = 0
        self.real = maildir._fsync_dir

    def fsync_dir(self, path: Path) -> None:
        covered = set(os.listdir(path)) if path.name == "new" else set()
        self.real(path)
        time.sleep(PAUSE)  # a slow disk: a 250 that did not wait for us arrives meanwhile
        with self.lock:
            self.durable |= covered
            self.fsyncs += path.name == "new"


@pytest.fixture
def watched(monkeypatch: pytest.MonkeyPatch) -> Watch:
    w = Watch()
    monkeypatch.setattr(maildir, "_fsync_dir", w.fsync_dir)
    return w


@pytest.fixture
def mda(tmp_path: Path) -> Iterator[tuple[MDA, Path]]:
    inst = Installation(tmp_path / "mailroom")
    box = add_user(inst, "alice@example.org", "maildir")
    server = MDA(inst)
    yield server, box
    server.close()


MESSAGE = b"Subject: durable\r\nFrom: carol@example.net\r\n\r\nHello.\r\n"


def _session(port: int, n: int, watch: Watch, early: list[str], errors: list[str]) -> None:
    try:
        c = Client.session(port, timeout=30)
        try:
            assert c.cmd("LHLO client.test")[0] == 250
            for i in range(MESSAGES):
                assert c.cmd(f"MAIL FROM:<carol@example.net> XRECORD XTRACE={_trace(n, i)}")[0] == 250
                assert c.cmd("RCPT TO:<alice@example.org>")[0] == 250
                assert c.cmd("DATA")[0] == 354
                c.send(stuff(MESSAGE))
                code, text = c.reply()
                with watch.lock:  # the moment the 250 is in our hands
                    durable = set(watch.durable)
                assert code == 250, text
                name = Path(text.split(" path=", 1)[1]).name
                if name not in durable:
                    early.append(name)
        finally:
            c.quit()
    except Exception as exc:  # noqa: BLE001 - reported by the test below
        errors.append(repr(exc))


def _trace(n: int, i: int) -> str:
    # Trace ids are 18 hex digits, the first 13 a time in microseconds (common/log.py).
    return f"{0x192F3A1B2C3D4 + n:013X}{i:05X}"


def test_no_250_before_the_fsync_of_new_that_covers_its_entry(mda: tuple[MDA, Path], watched: Watch) -> None:
    server, box = mda
    early: list[str] = []
    errors: list[str] = []
    threads = [
        threading.Thread(target=_session, args=(server.port, n, watched, early, errors)) for n in range(SESSIONS)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(80)
    assert errors == []
    assert early == [], f"{len(early)} replies came before the fsync of their entry in new/"
    delivered = SESSIONS * MESSAGES
    assert len(maildir_messages(box)) == delivered
    # And the sharing is real: concurrent deliveries waited for one fsync instead of each making its own.
    assert watched.fsyncs < delivered, watched.fsyncs
