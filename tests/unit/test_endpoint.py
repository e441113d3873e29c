"""Listener settings become typed endpoints once; binding fails with one line that says why."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from common import config
from common.endpoint import BindError, Endpoint


@pytest.mark.parametrize(
    ("text", "expected", "shown", "loopback"),
    [
        ("127.0.0.1:25", Endpoint("127.0.0.1", 25), "127.0.0.1:25", True),
        ("[::1]:2525", Endpoint("::1", 2525), "[::1]:2525", True),
        ("[::]:25", Endpoint("::", 25), "[::]:25", False),
        ("0.0.0.0:587", Endpoint("0.0.0.0", 587), "0.0.0.0:587", False),
        ("localhost:2424", Endpoint("localhost", 2424), "localhost:2424", True),
        ("mail.example.org:25", Endpoint("mail.example.org", 25), "mail.example.org:25", False),
        ("unix:/run/mailroom/lmtp.sock", Endpoint(path="/run/mailroom/lmtp.sock"), "unix:/run/mailroom/lmtp.sock",
         True),
    ],
)
def test_parse(text: str, expected: Endpoint, shown: str, loopback: bool) -> None:
    e = Endpoint.parse(text)
    assert e == expected and str(e) == shown and e.is_loopback() is loopback
    assert Endpoint.parse(str(e)) == e


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("::1:25", "write an IPv6 address in brackets"),
        ("[::1]", "expected [IPv6 address]:port"),
        ("[example.org]:25", "not an IPv6 address"),
        ("127.0.0.1", "expected host:port or unix:/path"),
        ("127.0.0.1:99999", "bad port"),
        (":25", "missing host"),
        ("unix:relative.sock", "expected unix:/absolute/path"),
    ],
)
def test_parse_refuses(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error.replace("[", r"\[").replace("]", r"\]")):
        Endpoint.parse(text)


def test_bind_does_not_listen_until_told() -> None:
    sock = Endpoint.parse("127.0.0.1:0").bind()
    with sock:
        port = sock.getsockname()[1]
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0  # bound, but nobody can connect yet
        Endpoint("127.0.0.1", port).listen(sock)
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) == 0


def test_an_address_in_use_is_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(BindError) as info:
            Endpoint("127.0.0.1", port).bind()
    assert str(info.value) == f"127.0.0.1:{port}: address already in use"


def test_an_address_not_on_this_host_is_one_line() -> None:
    with pytest.raises(BindError) as info:
        Endpoint.parse("192.0.2.1:2525").bind()
    assert str(info.value) == "192.0.2.1:2525: cannot assign requested address"


def test_a_stale_unix_socket_is_replaced_a_live_one_is_in_use_and_a_file_is_never_removed(tmp_path: Path) -> None:
    path = tmp_path / "lmtp.sock"
    first = Endpoint(path=str(path)).bind()
    first.listen(1)
    with pytest.raises(BindError, match="address already in use"):
        Endpoint(path=str(path)).bind()  # a live listener keeps its socket
    first.close()  # now it is a stale file
    second = Endpoint(path=str(path)).bind()
    second.close()
    path.unlink()
    path.write_text("not a socket")
    with pytest.raises(BindError, match="exists and is not a socket"):
        Endpoint(path=str(path)).bind()
    assert path.read_text() == "not a socket"


def test_the_config_gives_every_listener_setting_as_an_endpoint(tmp_path: Path) -> None:
    cfg = config.from_dict({"mailroom": {"domains": ["example.org"]}, "mta": {"smtp": "[::1]:2525"}},
                           tmp_path / "mailroom.toml")
    assert config.listener_keys() == [
        "msa.submission", "msa.submissions", "mta.smtp", "mta.internal", "mda.lmtp", "web.listen", "web.admin"
    ]
    assert cfg.endpoint("mta.smtp") == Endpoint("::1", 2525)
    assert cfg.endpoint("mda.lmtp") == Endpoint("127.0.0.1", 2424)


def test_every_address_of_a_setting_is_bound_and_one_in_use_names_the_setting_and_releases_the_rest() -> None:
    from common.daemon import bind_all
    from tests.support.ports import free_port

    first, second = free_port("127.0.0.1"), free_port("127.0.0.2")
    endpoints = {"mta.smtp": [Endpoint("127.0.0.1", first), Endpoint("127.0.0.2", second)]}
    bound = bind_all(endpoints)
    assert [s.getsockname() for s in bound["mta.smtp"]] == [("127.0.0.1", first), ("127.0.0.2", second)]
    for s in bound["mta.smtp"]:
        s.close()
    with socket.socket() as busy:
        busy.bind(("127.0.0.2", second))
        busy.listen()
        with pytest.raises(BindError) as info:
            bind_all(endpoints)
        assert str(info.value) == f"[mta] smtp = 127.0.0.2:{second}: address already in use"
    # The first address was let go again: it binds at once.
    Endpoint("127.0.0.1", first).bind().close()


def test_ipv6_wildcard_beside_ipv4_addresses_of_the_same_setting_serves_ipv6_only() -> None:
    from common.daemon import bind_all
    from tests.support.ports import free_port

    port = free_port("127.0.0.1")
    # Alone, [::] takes IPv4 too; beside 127.0.0.1 on its port, the setting said which.
    bound = bind_all({"mta.smtp": [Endpoint("127.0.0.1", port), Endpoint("::", port)]})
    try:
        v4, v6 = bound["mta.smtp"]
        assert v6.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        for s in (v4, v6):
            s.listen()
        for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            with socket.socket(family) as c:
                c.connect((host, port))
    finally:
        for s in bound["mta.smtp"]:
            s.close()
    alone = bind_all({"mta.smtp": [Endpoint("::", port)]})["mta.smtp"][0]
    try:
        assert alone.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
    finally:
        alone.close()
