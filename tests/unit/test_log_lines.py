"""A log record is one line whatever its text holds, and a program's log file survives logrotate.

common/log.py writes the text a peer sent as it came, except its control
characters, which become escapes: a newline, a vertical tab or U+2028 in an
address cannot start a line that looks like another record.  LogFile appends
to the program's own file and reopens the path when the file was moved.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest

from common import log

FORGED = "2030-01-01 00:00:00.000 mda[1] 012345678901234567: delivered to=<mallory@example.org>"


pytestmark = pytest.mark.usefixtures("log_setup_undone")


def test_every_control_character_of_a_message_becomes_an_escape(capsys: pytest.CaptureFixture[str]) -> None:
    log.setup("mta", "info")
    breaks = ["\n", "\r", "\r\n", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029", "\x00", "\x7f",
              "\x1b[2K", "\x9b"]
    smtpd = logging.getLogger("mta.smtpd")
    for brk in breaks:
        smtpd.info("relay denied to=<%s> client=%s", f'"a{brk}{FORGED}"@x.example', "192.0.2.1")
    err = capsys.readouterr().err
    assert len(err.split("\n")) == len(breaks) + 1 and len(err.splitlines()) == len(breaks)
    for line in err.splitlines():
        assert " mta[" in line[:40] and f'{FORGED}"@x.example> client=192.0.2.1' in line, line
    escaped = [line.split("<", 1)[1].split(FORGED, 1)[0] for line in err.splitlines()]
    assert escaped == ['"a\\n', '"a\\r', '"a\\r\\n', '"a\\x0b', '"a\\x0c', '"a\\x1c', '"a\\x1d', '"a\\x1e', '"a\\x85',
                       '"a\\u2028', '"a\\u2029', '"a\\x00', '"a\\x7f', '"a\\x1b[2K', '"a\\x9b']
    # Text without control characters is written as it came, non-ASCII letters too.
    assert log.escape("Zoë <zoë@exämple.org>") == "Zoë <zoë@exämple.org>"


def test_a_traceback_stays_under_its_record(capsys: pytest.CaptureFixture[str]) -> None:
    log.setup("mda", "info")
    try:
        raise ValueError(f"bad address <a\n{FORGED}\x0bmore>")
    except ValueError:
        logging.getLogger("mda").exception("delivery failed")
    lines = capsys.readouterr().err.splitlines()
    assert " mda[" in lines[0] and lines[0].endswith(": delivery failed")
    # Every line of the traceback starts with a tab: none can pass for a record.
    assert len(lines) > 3 and all(line.startswith("\t") for line in lines[1:]), lines
    assert lines[-2:] == ["\tValueError: bad address <a", f"\t{FORGED}\\x0bmore>"]


def test_json_records_escape_what_json_leaves_raw(capsys: pytest.CaptureFixture[str]) -> None:
    log.setup("msa", "info", "json")
    logging.getLogger("msa").warning("From: %s", "a\x85b\u2028c\u2029d\x9be\nf")
    raw = capsys.readouterr().err
    assert raw.count("\n") == 1 and len(raw.splitlines()) == 1
    assert "\\u0085" in raw and "\\u2028" in raw and "\\u2029" in raw and "\\u009b" in raw and "\\n" in raw
    assert json.loads(raw)["message"] == "From: a\x85b\u2028c\u2029d\x9be\nf"  # nothing lost


def test_a_log_file_moved_away_is_reopened_at_the_next_record(tmp_path: Path) -> None:
    path = tmp_path / "mta.log"
    log.setup("mta", "info")
    log.to_file(path)
    assert log.file_path() == path
    logging.getLogger("mta").info("before the move")
    os.rename(path, tmp_path / "mta.log.1")
    logging.getLogger("mta").info("after the move")
    assert "before the move" in (tmp_path / "mta.log.1").read_text()
    assert "after the move" not in (tmp_path / "mta.log.1").read_text()
    assert "after the move" in path.read_text() and "before the move" not in path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # Removed outright (logrotate's `nocreate` then a cleanup): a new file again.
    path.unlink()
    logging.getLogger("mta").info("after the removal")
    assert path.read_text().endswith(": after the removal\n")


def test_processes_of_one_program_append_to_one_file_without_overwriting(tmp_path: Path) -> None:
    path = tmp_path / "mta.log"
    log.setup("mta", "info")
    log.to_file(path)
    logging.getLogger("mta").info("first")
    other = os.open(path, os.O_WRONLY | os.O_APPEND)  # another MTA process's handle on the same file
    os.write(other, b"a line of another process\n")
    os.close(other)
    logging.getLogger("mta").info("second")
    lines = path.read_text().splitlines()
    assert [line.rsplit(": ", 1)[-1] for line in lines] == ["first", "a line of another process", "second"]


def test_a_folder_closed_after_the_start_does_not_lose_records(tmp_path: Path) -> None:
    folder = tmp_path / "log"
    folder.mkdir()
    path = folder / "msa.log"
    log.setup("msa", "info")
    log.to_file(path)
    logging.getLogger("msa").info("one")
    # The path cannot be opened again (a file where the folder was): the record goes to the open file.
    os.rename(folder, tmp_path / "moved")
    folder.write_text("not a folder\n")
    logging.getLogger("msa").info("two")
    assert (tmp_path / "moved" / "msa.log").read_text().splitlines()[-1].endswith(": two")
