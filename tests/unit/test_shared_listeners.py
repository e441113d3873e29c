"""Several MTA processes on one port: SO_REUSEPORT binding, the overlap it must not hide, and
the supervisord program that starts `[mta] processes` of them."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cli import supervise
from common import config
from common.daemon import bind_all
from common.endpoint import BindError, Endpoint
from tests.support.ports import free_port


def test_two_sockets_bound_with_reuse_port_share_one_address_and_a_plain_one_is_refused() -> None:
    port = free_port("127.0.0.1")
    first = Endpoint("127.0.0.1", port).bind(reuse_port=True)
    second = Endpoint("127.0.0.1", port).bind(reuse_port=True)
    try:
        for s in (first, second):
            assert s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
            s.listen()
        # What `mailroom run` checks before starting anything: a plain bind finds the port taken.
        with pytest.raises(BindError, match="address already in use"):
            Endpoint("127.0.0.1", port).bind()
    finally:
        first.close()
        second.close()


def test_without_reuse_port_the_second_bind_is_refused() -> None:
    port = free_port("127.0.0.1")
    first = Endpoint("127.0.0.1", port).bind()
    try:
        first.listen()
        assert first.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0
        with pytest.raises(BindError, match="address already in use"):
            Endpoint("127.0.0.1", port).bind(reuse_port=True)
    finally:
        first.close()


@pytest.mark.parametrize(
    ("smtp", "internal"),
    [("0.0.0.0", "127.0.0.1"), ("127.0.0.1", "127.0.0.1"), ("::", "127.0.0.1"), ("::1", "::")],
)
def test_shared_binding_still_refuses_two_settings_on_one_address(smtp: str, internal: str) -> None:
    # SO_REUSEPORT would let one process bind both, and a client of the public
    # listener could reach the internal one, which relays anywhere.
    port = free_port("127.0.0.1")
    endpoints = {"mta.smtp": [Endpoint(smtp, port)], "mta.internal": [Endpoint(internal, port)]}
    with pytest.raises(BindError) as info:
        bind_all(endpoints, reuse_port=True)
    assert str(info.value).startswith(f"[mta] internal = {Endpoint(internal, port)}: address already in use")


def test_shared_binding_allows_what_a_plain_one_allows() -> None:
    port, other = free_port("127.0.0.1"), free_port("127.0.0.1")
    endpoints = {
        # [::] beside an IPv4 address of its own setting serves IPv6 only (so no overlap).
        "mta.smtp": [Endpoint("127.0.0.1", port), Endpoint("::", port)],
        "mta.internal": [Endpoint("127.0.0.1", other)],
    }
    bound = bind_all(endpoints, reuse_port=True)
    try:
        assert [len(socks) for socks in bound.values()] == [2, 1]
    finally:
        for socks in bound.values():
            for s in socks:
                s.close()


def _config(tmp_path: Path, processes: int) -> config.Config:
    path = tmp_path / "mailroom.toml"
    path.write_text(f'[mailroom]\ndomains = ["example.org"]\nrun_dir = "run"\n[mta]\nprocesses = {processes}\n')
    return config.load(path)


def test_one_process_is_the_plain_mta_program(tmp_path: Path) -> None:
    cfg = _config(tmp_path, 1)
    assert cfg.mta.processes == 1
    text = supervise.render(cfg).read_text()
    mta = text.split("[program:mta]\n", 1)[1].split("\n\n", 1)[0]
    assert mta.startswith(f"command = {sys.executable} -m mta --config {cfg.path}\n")
    assert "numprocs" not in mta and "--instance" not in mta
    assert supervise.program_spec(cfg, "mta") == "mta"


def test_several_processes_are_one_supervisord_program_with_numprocs(tmp_path: Path) -> None:
    cfg = _config(tmp_path, 3)
    text = supervise.render(cfg).read_text()
    mta = text.split("[program:mta]\n", 1)[1].split("\n\n", 1)[0]
    assert mta.startswith(f"command = {sys.executable} -m mta --config {cfg.path} --instance %(process_num)d\n")
    assert "\nnumprocs = 3\n" in mta and "\nprocess_name = %(program_name)s_%(process_num)d\n" in mta
    assert "\nautorestart = unexpected\n" in mta  # each restarted by supervisord
    # `mailroom stop mta` and the like name the group of them.
    assert supervise.program_spec(cfg, "mta") == "mta:*"
    assert supervise.program_spec(cfg, "msa") == "msa"


def test_a_bad_process_count_stops_the_mta_and_mailroom_run_with_status_2(tmp_path: Path) -> None:
    path = tmp_path / "mailroom.toml"
    path.write_text('[mailroom]\ndomains = ["example.org"]\n[mta]\nprocesses = 0\n')
    for argv in (["-m", "mta", "--config", str(path)], ["-m", "cli.main", "--config", str(path), "run"]):
        r = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, argv
        assert "mta.processes: expected 1 to 64, got 0" in r.stderr, r.stderr
