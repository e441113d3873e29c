"""`[mailroom] log_format`: JSON log lines with the trace id as a field, and the key's checks."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from common import config, log


@pytest.mark.usefixtures("log_setup_undone")
def test_json_lines_carry_the_trace_id_as_a_field(capsys: pytest.CaptureFixture[str]) -> None:
    log.setup("mta", "info", "json")
    token = log.trace_id.set("0123456789ABCDEF01")
    try:
        logging.getLogger("mta.queue").info("queued from=<%s>\nsecond line", "a@b")
    finally:
        log.trace_id.reset(token)
    logging.getLogger("mta").warning("no message here")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2  # the newline in the message stays inside its JSON string
    first, second = (json.loads(line) for line in lines)
    assert first["trace_id"] == "0123456789ABCDEF01" and first["process"] == "mta"
    assert first["message"] == "queued from=<a@b>\nsecond line" and first["level"] == "info"
    assert first["logger"] == "mta.queue" and isinstance(first["pid"], int)
    assert first["time"].endswith("Z") and "T" in first["time"]
    assert "trace_id" not in second and second["level"] == "warning"


def test_log_format_is_text_or_json(tmp_path: Path) -> None:
    path = tmp_path / "mailroom.toml"
    path.write_text('[mailroom]\ndomains = ["example.org"]\nlog_format = "json"\n')
    assert config.load(path).mailroom.log_format == "json"
    path.write_text('[mailroom]\ndomains = ["example.org"]\n')
    assert config.load(path).mailroom.log_format == "text"
    path.write_text('[mailroom]\ndomains = ["example.org"]\nlog_format = "xml"\n')
    with pytest.raises(config.ConfigError, match="mailroom.log_format: expected text or json"):
        config.load(path)
