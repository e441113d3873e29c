"""When the certificate is renewed (two thirds of its lifetime), which one, and the TLSA record of its key."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
from pathlib import Path

from cli import cert
from common import config
from common.tls import key_type_of, new_key, read_certificate, tlsa_3_1_1
from tests.support.pebble import issue, make_ca
from tests.support.peers import require

NAMES = ["mail.example.org", "mta-sts.example.org", "autoconfig.example.org"]


def _config(tmp_path: Path, extra: str = "") -> config.Config:
    path = tmp_path / "mailroom.toml"
    path.write_text('[mailroom]\ndomains = ["example.org"]\nhostname = "mail.example.org"\n'
                    '[tls]\ncert = "tls/cert.pem"\nkey = "tls/cert.key"\n'
                    '[acme]\ndirectory = "https://acme.example/dir"\n' + extra)
    return config.load(path)


def _certificate(tmp_path: Path, names: list[str], start: dt.datetime, days: int = 90) -> Path:
    ca = make_ca(tmp_path / "ca")
    return issue(tmp_path / "tls", "cert", ca, names, days=days, not_before=start)[0]


def _as_issued(cfg: config.Config) -> None:
    info = read_certificate(cfg.resolve(cfg.tls.cert))
    acme_dir = cfg.resolve(cfg.acme.dir)
    acme_dir.mkdir(exist_ok=True)
    (acme_dir / "issued.json").write_text(json.dumps({"fingerprint": info.fingerprint}))


def test_renewal_falls_due_after_two_thirds_of_the_lifetime(tmp_path: Path) -> None:
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    info = read_certificate(_certificate(tmp_path, NAMES, start, days=90))
    assert info.names == tuple(NAMES)
    assert info.renewal_due() == start + dt.timedelta(days=60)
    assert info.not_after == start + dt.timedelta(days=90)
    assert not info.self_signed and info.covers(["MTA-STS.example.org"])


def test_the_renewer_renews_only_what_acme_gave_us(tmp_path: Path) -> None:
    start = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(days=10)
    _certificate(tmp_path, NAMES, start)
    cfg = _config(tmp_path)
    when, why = cert.due(cfg)
    assert when is None and "not issued by ACME here" in why  # put there by hand: left alone
    _as_issued(cfg)
    when, why = cert.due(cfg)
    assert when == start + dt.timedelta(days=60), why


def test_a_certificate_missing_a_name_or_of_another_key_type_is_due_now(tmp_path: Path) -> None:
    _certificate(tmp_path, NAMES, dt.datetime.now(dt.UTC) - dt.timedelta(days=1))
    _as_issued(_config(tmp_path))
    before = dt.datetime.now(dt.UTC)
    path = tmp_path / "mailroom.toml"
    path.write_text(path.read_text().replace('["example.org"]', '["example.org", "example.net"]'))
    when, why = cert.due(config.load(path))  # a domain was added: its names are missing
    assert when is not None and before <= when <= dt.datetime.now(dt.UTC), why
    assert "does not name autoconfig.example.net, mta-sts.example.net" in why
    when, why = cert.due(_config(tmp_path, 'key_type = "rsa-2048"\n'))
    assert when is not None and when <= dt.datetime.now(dt.UTC) and "rsa-2048" in why


def test_wanted_names_are_the_host_and_the_web_names_of_each_domain(tmp_path: Path) -> None:
    path = tmp_path / "mailroom.toml"
    path.write_text('[mailroom]\ndomains = ["example.org", "example.net"]\nhostname = "Mail.Example.org."\n')
    assert cert.wanted_names(config.load(path)) == [
        "mail.example.org", "mta-sts.example.org", "autoconfig.example.org",
        "mta-sts.example.net", "autoconfig.example.net",
    ]


def test_tlsa_3_1_1_is_the_sha256_of_the_key_as_openssl_computes_it(tmp_path: Path) -> None:
    cert_path = _certificate(tmp_path, NAMES, dt.datetime.now(dt.UTC))
    key_path = cert_path.with_suffix(".key")
    der = subprocess.run([require("openssl"), "pkey", "-in", str(key_path), "-pubout", "-outform", "DER"],
                         capture_output=True, check=True).stdout
    digest = subprocess.run([require("openssl"), "dgst", "-sha256", "-r"], input=der, capture_output=True,
                            check=True).stdout.split()[0].decode()
    assert tlsa_3_1_1(key_path.read_bytes()) == f"3 1 1 {digest}"
    assert read_certificate(cert_path).tlsa == f"3 1 1 {digest}"  # the certificate's key: the same record


def test_key_types(tmp_path: Path) -> None:
    assert key_type_of(new_key("ecdsa-p256")) == "ecdsa-p256"
    assert key_type_of(new_key("rsa-2048")) == "rsa-2048"
