"""The config file: defaults, value syntax, and one bad file per mistake with the exact error.

Each file in bad_configs/ starts with `# error: TEXT`; loading it must fail
with a message containing TEXT (and so naming the key), as chasquid does.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from common import config

BAD = sorted((Path(__file__).parent / "bad_configs").glob("*.toml"))


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_bad_config_names_the_key(path: Path) -> None:
    expected = path.read_text().splitlines()[0].removeprefix("# error: ")
    with pytest.raises(config.ConfigError) as info:
        config.load(path)
    assert expected in str(info.value)


def test_a_daemon_refuses_to_start_with_a_bad_config(tmp_path: Path) -> None:
    bad = tmp_path / "mailroom.toml"
    bad.write_text('[mailroom]\ndomains = ["example.org"]\n[mta]\nmax_hops = "ten"\n')
    r = subprocess.run([sys.executable, "-m", "mta", "--config", str(bad)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert "mta.max_hops" in r.stderr


def test_default_config_from_init_loads_with_the_documented_ports(tmp_path: Path) -> None:
    path = tmp_path / "mailroom.toml"
    path.write_text(config.render_default("example.org", "mail.example.org"))
    cfg = config.load(path)
    # A listener setting written as one address holds a list of one.
    assert cfg.msa.submission == ["127.0.0.1:2587"]
    assert cfg.msa.submissions == ["127.0.0.1:2465"]
    assert cfg.mta.smtp == ["127.0.0.1:2525"]
    # The MSA's hand-off: a Unix socket in the run folder (relative to the config, as every path).
    assert cfg.mta.internal == ["unix:run/internal.sock"]
    assert cfg.endpoint("mta.internal").path == str(tmp_path / "run" / "internal.sock")
    assert cfg.mda.lmtp == ["127.0.0.1:2424"]
    assert cfg.mta.retry_schedule == [300, 600, 1200, 2400, 3600]
    assert cfg.mta.max_queue_lifetime == 5 * 86400
    assert cfg.mta.delay_warning == 4 * 3600
    assert cfg.mta.max_hops == 50
    assert cfg.smtp.max_recipients == 100
    assert cfg.smtp.max_connections_per_client == 50
    # Relative paths are relative to the config file, whatever the working directory.
    assert cfg.mail_root == tmp_path / "mail"
    assert cfg.database_url == f"sqlite:///{tmp_path.resolve()}/mailroom.db"
    assert cfg.queue_dir == tmp_path.resolve()  # where free disk space is measured
    assert cfg.mta.smtp_timeout == 300


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("5m", 300), ("1h", 3600), ("5d", 432000), ("250ms", 0.25), (90, 90), ("1.5h", 5400)],
)
def test_durations(text: object, seconds: float) -> None:
    assert config.parse_duration(text) == seconds


@pytest.mark.parametrize(("text", "size"), [("512k", 524288), ("10MiB", 10485760), ("1g", 1 << 30), (100, 100)])
def test_sizes(text: object, size: int) -> None:
    assert config.parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:25", ("127.0.0.1", 25)), ("[::1]:2525", ("::1", 2525)), ("mx.example:587", ("mx.example", 587))],
)
def test_hostport(text: str, expected: tuple[str, int]) -> None:
    assert config.parse_hostport(text) == expected


def _config_show(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", "--config", str(path), "config", "show"],
        capture_output=True, text=True, timeout=30,
    )


def test_config_show_prints_every_setting(tmp_path: Path) -> None:
    path = tmp_path / "mailroom.toml"
    path.write_text(config.render_default("example.org", "mail.example.org"))
    r = _config_show(path)
    assert r.returncode == 0, r.stderr
    assert 'mta.smtp = ["127.0.0.1:2525"]' in r.stdout
    assert "mta.max_queue_lifetime = 432000.0" in r.stdout
    assert 'mailroom.domains = ["example.org"]' in r.stdout


def test_a_listener_setting_takes_several_addresses_and_config_show_prints_them(tmp_path: Path) -> None:
    path = tmp_path / "mailroom.toml"
    text = config.render_default("example.org", "mail.example.org")
    text = text.replace('smtp = "127.0.0.1:2525"', 'smtp = ["0.0.0.0:2525", "[::1]:2525", "unix:/run/mr/smtp.sock"]')
    text = text.replace('lmtp = "127.0.0.1:2424"', 'lmtp = ["127.0.0.1:2424", "[::1]:2424"]')
    path.write_text(text)
    cfg = config.load(path)
    assert [str(e) for e in cfg.endpoints("mta.smtp")] == ["0.0.0.0:2525", "[::1]:2525", "unix:/run/mr/smtp.sock"]
    assert str(cfg.endpoint("mta.smtp")) == "0.0.0.0:2525"  # the one to connect to: the first
    assert [str(e) for e in cfg.endpoints("mda.lmtp")] == ["127.0.0.1:2424", "[::1]:2424"]
    r = _config_show(path)
    assert r.returncode == 0, r.stderr
    assert 'mta.smtp = ["0.0.0.0:2525", "[::1]:2525", "unix:/run/mr/smtp.sock"]' in r.stdout
    assert 'mda.lmtp = ["127.0.0.1:2424", "[::1]:2424"]' in r.stdout


def test_a_bad_entry_in_a_listener_list_stops_a_daemon_naming_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "mailroom.toml"
    bad.write_text('[mailroom]\ndomains = ["example.org"]\n[mta]\nsmtp = ["127.0.0.1:2525", "::1:25"]\n')
    r = subprocess.run([sys.executable, "-m", "mta", "--config", str(bad)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert "mta.smtp: write an IPv6 address in brackets" in r.stderr
