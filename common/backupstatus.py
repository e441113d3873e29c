"""The last backup's outcome, kept in one small file for everyone who reports it.

`mailroom backup` (and the scheduled run) writes `RUN_DIR/backup.json` when it
ends, well or badly; `mailroom status`, the status checks (`mailroom
status-checks`, the admin page) and the web program's /metrics read it.  The
file is replaced atomically (a new file renamed over the old), so a reader never
sees half of it.  It knows nothing of how a backup is made (cli/backup.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

FILE = "backup.json"


@dataclass(frozen=True)
class Outcome:
    started: float  # Unix time the backup began
    finished: float
    ok: bool
    snapshot: str = ""  # the snapshot's name when ok
    error: str = ""  # why it failed, in one line
    files: int = 0  # files in the snapshot
    new_bytes: int = 0  # bytes stored for the first time (the rest was already in the backup)
    last_ok: float = 0.0  # when the last successful backup finished (this one, or an earlier one)


def path(run_dir: Path) -> Path:
    return run_dir / FILE


def read(run_dir: Path) -> Outcome | None:
    """The last outcome, or None when no backup has run here (or the file is unreadable)."""
    try:
        data = json.loads(path(run_dir).read_text())
        return Outcome(**{k: data[k] for k in Outcome.__dataclass_fields__ if k in data})
    except (OSError, ValueError, TypeError):
        return None


def write(run_dir: Path, outcome: Outcome) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=".backup.json.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(outcome), f)
        os.replace(tmp, path(run_dir))
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
