"""The test harness itself: what the other tests stand on must do what it says."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from tests.support.suite import Installation

pytestmark = pytest.mark.timeout(60)


def test_setting_a_key_missing_from_its_section_adds_it_there_and_leaves_later_sections_alone(
    tmp_path: Path,
) -> None:
    inst = Installation(tmp_path / "mailroom")
    before = tomllib.loads(inst.config_path.read_text())
    assert "enabled" not in before["mailroom"] and before["imap"]["enabled"] is True

    inst.set("mailroom", "enabled", "false")  # [imap] further down has a key of that name

    after = tomllib.loads(inst.config_path.read_text())
    assert after["mailroom"]["enabled"] is False
    assert after["imap"] == before["imap"]


def test_setting_a_key_present_in_its_section_changes_only_that_line(tmp_path: Path) -> None:
    inst = Installation(tmp_path / "mailroom")
    inst.set("mta", "max_hops", "7")
    inst.set("mailroom", "log_level", '"debug"')
    after = tomllib.loads(inst.config_path.read_text())
    assert after["mta"]["max_hops"] == 7 and after["mailroom"]["log_level"] == "debug"
    assert inst.config_path.read_text().count("max_hops") == 1


def test_setting_a_key_of_a_section_init_does_not_write_adds_the_section(tmp_path: Path) -> None:
    inst = Installation(tmp_path / "mailroom")
    assert "[smtp]" not in inst.config_path.read_text()
    inst.set("smtp", "idle_timeout", "7")
    inst.set("smtp", "max_recipients", "3")
    assert inst.config.smtp.idle_timeout == 7 and inst.config.smtp.max_recipients == 3
