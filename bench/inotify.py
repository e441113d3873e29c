"""Watching Maildir new/ folders with Linux inotify: when did each message land?

Both servers finish a Maildir delivery the same way: the message is written
and fsync'd under tmp/, then link()ed (or rename()d) into new/.  The moment its
name appears in new/ is the moment a mail reader can see it, so that is where
the benchmark stops its clock, for Mailroom and Postfix alike.  A thread blocks
on the inotify descriptor and stamps each name with time.monotonic() as it is
read, so watching costs nothing while no mail arrives (no polling).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import select
import struct
import threading
import time
from pathlib import Path

IN_CREATE = 0x00000100
IN_MOVED_TO = 0x00000080
IN_NONBLOCK = 0o4000
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class MaildirWatch:
    """Arrival times (monotonic seconds) of the files that appear in some new/ folders."""

    def __init__(self) -> None:
        self._fd = _libc.inotify_init1(IN_NONBLOCK)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self._folders: dict[int, Path] = {}
        self._lock = threading.Lock()
        self.arrivals: dict[Path, list[tuple[float, str]]] = {}
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._loop, name="inotify", daemon=True)
        self._thread.start()

    def add(self, new_folder: Path) -> None:
        new_folder.mkdir(parents=True, exist_ok=True)
        wd = _libc.inotify_add_watch(self._fd, os.fsencode(new_folder), IN_CREATE | IN_MOVED_TO)
        if wd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {new_folder}")
        with self._lock:
            self._folders[wd] = new_folder
            self.arrivals.setdefault(new_folder, [])

    def count(self, new_folder: Path) -> int:
        with self._lock:
            return len(self.arrivals[new_folder])

    def times(self, new_folder: Path) -> list[tuple[float, str]]:
        with self._lock:
            return list(self.arrivals[new_folder])

    def wait_for(self, new_folder: Path, count: int, timeout: float) -> float | None:
        """The arrival time of the `count`-th file, or None after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                got = self.arrivals[new_folder]
                if len(got) >= count:
                    return max(t for t, _ in got[:count])
            time.sleep(0.01)
        return None

    def _loop(self) -> None:
        while True:
            ready, _, _ = select.select([self._fd, self._stop_r], [], [])
            now = time.monotonic()
            if self._stop_r in ready:
                return
            try:
                data = os.read(self._fd, 1 << 16)
            except BlockingIOError:
                continue
            with self._lock:
                offset = 0
                while offset < len(data):
                    wd, _mask, _cookie, length = _EVENT.unpack_from(data, offset)
                    raw = data[offset + _EVENT.size : offset + _EVENT.size + length]
                    offset += _EVENT.size + length
                    folder = self._folders.get(wd)
                    if folder is not None:
                        self.arrivals[folder].append((now, os.fsdecode(raw.rstrip(b"\0"))))

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join(5)
        for fd in (self._fd, self._stop_r, self._stop_w):
            os.close(fd)
