"""The path in the MDA's 250 (common/lmtp_ext.py): written by the MDA, taken off by the queue manager."""

from __future__ import annotations

from common import lmtp_ext
from common.reply import Reply

OK = Reply(250, "2.0.0", "Ok: delivered to maildir (0192F3A1B2C3D4E5F6)")


def test_the_path_comes_back_whole_even_with_spaces_and_the_mark_in_it() -> None:
    path = "/var/mail/example.org/a box/new/1 path=2"
    sent = lmtp_ext.with_path(OK, path)
    assert str(sent) == f"250 2.0.0 Ok: delivered to maildir (0192F3A1B2C3D4E5F6) path={path}"  # the wire form
    assert lmtp_ext.split_path(sent) == (OK, path)


def test_a_reply_without_a_path_is_left_as_it_is() -> None:
    refused = Reply(552, "5.2.2", "Mailbox full")
    assert lmtp_ext.split_path(refused) == (refused, "")
    assert lmtp_ext.split_path(OK) == (OK, "")
