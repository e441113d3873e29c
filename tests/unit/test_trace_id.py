"""Trace ids: sortable by arrival, carrying their arrival time, and checked before being trusted."""

from __future__ import annotations

import logging
import time

import pytest

from common import log
from common.reply import Reply, parse_reply


def test_trace_ids_sort_by_arrival_and_carry_the_time() -> None:
    before = time.time_ns() // 1000
    ids = [log.new_trace_id() for _ in range(200)]
    after = time.time_ns() // 1000
    assert all(log.is_trace_id(i) for i in ids)
    assert len(set(ids)) == len(ids)
    assert all(before <= log.trace_time_us(i) <= after for i in ids)
    assert [log.trace_time_us(i) for i in ids] == sorted(log.trace_time_us(i) for i in ids)


def test_only_well_formed_ids_are_trusted() -> None:
    for bad in ("", "abc", "0123456789abcdef01", "0123456789ABCDEF0", "0123456789ABCDEF012", "../../etc/passwd0"):
        assert not log.is_trace_id(bad)


@pytest.mark.usefixtures("log_setup_undone")
def test_every_log_line_carries_the_trace_id(capsys: object) -> None:
    log.setup("test", "info")
    token = log.trace_id.set("0123456789ABCDEF01")
    try:
        logging.getLogger("x").info("queued from=<a@b>")
    finally:
        log.trace_id.reset(token)
    err = capsys.readouterr().err  # type: ignore[attr-defined]
    assert "test[" in err and "] 0123456789ABCDEF01: queued from=<a@b>" in err


def test_parse_reply_keeps_the_peers_enhanced_code() -> None:
    assert parse_reply(550, ["5.1.1 no such user"]) == Reply(550, "5.1.1", "no such user")
    assert parse_reply(451, ["try later"]) == Reply(451, "4.0.0", "try later")
    assert str(Reply(250, "2.0.0", "Ok")) == "250 2.0.0 Ok"
