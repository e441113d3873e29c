"""The MTA-STS policy we publish (web/mta_sts.py): its text, its id, and the hosts it is served for."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from common import config
from web import mta_sts


def _config(tmp_path: Path, extra: str = "") -> config.Config:
    path = tmp_path / "mailroom.toml"
    path.write_text('[mailroom]\ndomains = ["example.org", "example.net"]\nhostname = "mail.example.org"\n' + extra)
    return config.load(path)


def test_the_policy_names_our_mx_with_the_configured_mode_and_age(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    assert mta_sts.policy(cfg) == (
        "version: STSv1\r\nmode: testing\r\nmx: mail.example.org\r\nmax_age: 604800\r\n"
    )
    cfg = _config(tmp_path, '[mta_sts]\nmode = "enforce"\nmx = ["mail.example.org", "*.backup.example.org"]\n'
                            'max_age = "30d"\n')
    assert mta_sts.policy(cfg) == (
        "version: STSv1\r\nmode: enforce\r\nmx: mail.example.org\r\nmx: *.backup.example.org\r\n"
        "max_age: 2592000\r\n"
    )


def test_the_id_changes_exactly_when_the_policy_does(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    first = mta_sts.policy_id(cfg)
    assert first.isalnum() and 1 <= len(first) <= 32  # RFC 8461 3.1: sts-id = 1*32(ALPHA / DIGIT)
    assert mta_sts.txt_record(cfg) == f"v=STSv1; id={first}"
    assert mta_sts.policy_id(_config(tmp_path)) == first  # same policy, same id
    enforce = dataclasses.replace(cfg, mta_sts=dataclasses.replace(cfg.mta_sts, mode="enforce"))
    longer = dataclasses.replace(cfg, mta_sts=dataclasses.replace(cfg.mta_sts, max_age=86400.0 * 30))
    moved = dataclasses.replace(cfg, mailroom=dataclasses.replace(cfg.mailroom, hostname="mx2.example.org"))
    ids = {first, mta_sts.policy_id(enforce), mta_sts.policy_id(longer), mta_sts.policy_id(moved)}
    assert len(ids) == 4


def test_served_only_for_mta_sts_hosts_of_local_domains(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    assert mta_sts.domain_of_host(cfg, "mta-sts.example.org") == "example.org"
    assert mta_sts.domain_of_host(cfg, "MTA-STS.Example.NET:443") == "example.net"
    assert mta_sts.domain_of_host(cfg, "mta-sts.example.org.") == "example.org"
    assert mta_sts.domain_of_host(cfg, "mta-sts.elsewhere.test") is None
    assert mta_sts.domain_of_host(cfg, "example.org") is None
    assert mta_sts.domain_of_host(cfg, "") is None
