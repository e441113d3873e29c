"""What a reload (SIGHUP, `mailroom reload`) takes from the config file, and what waits for a restart."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from common import config, reload


def _config(tmp_path: Path, extra: str = "") -> config.Config:
    path = tmp_path / "mailroom.toml"
    path.write_text('[mailroom]\ndomains = ["example.org"]\nhostname = "mail.example.org"\n' + extra)
    return config.load(path)


def test_safe_settings_are_taken_and_the_others_are_named(tmp_path: Path) -> None:
    old = _config(tmp_path)
    new = _config(tmp_path, '[dkim]\nselectors = { "example.org" = "roll2" }\n'
                            '[mailauth]\ndmarc_reject = false\nsrs_max_age = 7\n'
                            '[tls]\ncert = "tls/new.pem"\n'
                            '[mta_sts]\nmode = "enforce"\n'
                            '[mta]\nsmtp = "127.0.0.1:2626"\nmax_hops = 10\n')
    merged, waiting = reload.merge(old, new)
    assert merged.dkim.selectors == {"example.org": "roll2"}
    assert merged.mailauth.dmarc_reject is False
    assert merged.tls.cert == "tls/new.pem"
    assert merged.mta_sts.mode == "enforce"
    # Fixed at the start: a listener's address, the hop limit the policy holds, the SRS age.
    assert merged.mta.smtp == old.mta.smtp and merged.mta.max_hops == old.mta.max_hops
    assert merged.mailauth.srs_max_age == old.mailauth.srs_max_age
    assert sorted(waiting) == ["mailauth.srs_max_age", "mta.max_hops", "mta.smtp"]


def test_nothing_changed_is_the_same_config(tmp_path: Path) -> None:
    old = _config(tmp_path)
    merged, waiting = reload.merge(old, _config(tmp_path))
    assert merged is old and waiting == []


def test_reread_logs_what_waits_and_keeps_serving_on_a_bad_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old = _config(tmp_path)
    caplog.set_level(logging.INFO)
    level = logging.getLogger().level
    (tmp_path / "mailroom.toml").write_text(
        '[mailroom]\ndomains = ["example.org"]\nhostname = "mail.example.org"\nlog_level = "debug"\n'
        '[mta]\nmax_hops = 10\n'
    )
    try:
        merged = reload.reread(old)
        assert merged.mailroom.log_level == "debug"
        assert logging.getLogger().level == logging.DEBUG  # applied at once
    finally:
        logging.getLogger().setLevel(level)
    assert "takes effect at the next restart: mta.max_hops" in caplog.text
    (tmp_path / "mailroom.toml").write_text('[mailroom]\ndomains = ["example.org"]\n[mta]\nmax_hops = "ten"\n')
    assert reload.reread(merged) is merged
    # Read again with nothing changed: equal, but a new object (the MTA rebuilds its signer from it).
    (tmp_path / "mailroom.toml").write_text(
        '[mailroom]\ndomains = ["example.org"]\nhostname = "mail.example.org"\nlog_level = "debug"\n')
    again = reload.reread(merged)
    assert again == merged and again is not merged
    assert "reload: config error, nothing changed: mta.max_hops" in caplog.text
