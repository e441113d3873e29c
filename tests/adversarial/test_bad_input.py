"""The bad-input table of the design brief, one dialogue per row, against the real listeners.

Each test is a transcript: what a hostile or broken client sends, and the
exact reply (code and enhanced status code) it must get; then a look at the
queue and the mailboxes to prove nothing got through that should not have.
The listeners are the real MSA (submission, STARTTLS + AUTH), the MTA's public
listener and the MDA (LMTP), running in-process on loopback (tests/harness/services.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.client import CLOSED, STARTTLS_HANDSHAKE, Step, line, run
from tests.harness.openings import LISTENERS, auth_plain, lmtp_hello, msa_login, smtp_hello, transaction
from tests.harness.services import Since, Stack, listeners
from tests.harness.users import add_users

pytestmark = pytest.mark.timeout(30)

USERS = [f"user{i:03}@example.org" for i in range(105)]  # for the recipient limits
QUOTING = "quoting@example.org"  # an mbox only the mboxrd test writes to


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One installation's listeners for the module: starting them cost more than most of
    these dialogues.  None changes a listener (the AUTH lockout test has its own), and
    each sees only what arrived since it began (`Since`)."""
    with listeners(tmp_path_factory.mktemp("bad_input") / "mailroom") as stack:
        add_users(stack.inst, *USERS)
        add_users(stack.inst, QUOTING, store="mbox")
        yield stack


@pytest.fixture
def stack(shared: Stack) -> Since:
    return Since(shared)


def nothing_got_through(stack: Since) -> None:
    assert stack.queued() == []
    assert stack.mailbox("alice@example.org") == [] and stack.mailbox("bob@example.org") == []


# --- relay attempts (the MTA's and the MDA's: tests/dialogues/mta-relay-refused.txt,
# lmtp-unknown-recipients.txt) -----------------------------------------------------------


def test_the_msa_relays_nothing_without_authentication(stack: Since) -> None:
    port = stack.ports["submission"]
    run(port, [
        (None, "220 "), (line("EHLO client.example"), "250 "),
        (line("MAIL FROM:<alice@example.org>"), "530 5.7.0"),  # no STARTTLS yet
        (line("STARTTLS"), "220 "), (STARTTLS_HANDSHAKE, None), (line("EHLO client.example"), "250 "),
        (line("MAIL FROM:<alice@example.org>"), "530 5.7.0"),  # TLS, but no AUTH
        (line("RCPT TO:<x@elsewhere.example>"), "503 5.5.1"),
        (line("DATA"), "503 5.5.1"),
    ]).close()
    nothing_got_through(stack)


# --- bare CR / LF (the full end-of-data catalogue is in test_smuggling.py) -------------

BARE = [
    pytest.param(b"NOOP\n", id="bare-LF-command"),
    pytest.param(b"NOOP\rRSET\r\n", id="bare-CR-command"),
    pytest.param(b"MAIL FROM:<a@remote.example>\n", id="bare-LF-MAIL"),
]


@pytest.mark.parametrize("listener", ["msa", "mta", "mda"])
@pytest.mark.parametrize("bad", BARE)
def test_bare_line_endings_in_commands_end_the_session(stack: Since, listener: str, bad: bytes) -> None:
    key, hello, _, _ = LISTENERS[listener]
    run(stack.ports[key], [*hello(), (bad, "521 5.5.2"), (None, CLOSED)]).close()


@pytest.mark.parametrize("listener", ["msa", "mta", "mda"])
@pytest.mark.parametrize("body", [b"Subject: x\r\n\r\nline one\nline two\r\n.\r\n",
                                  b"Subject: x\r\n\r\nline one\rline two\r\n.\r\n"], ids=["LF", "CR"])
def test_bare_line_endings_in_data_refuse_the_message(stack: Since, listener: str, body: bytes) -> None:
    key, hello, sender, rcpt = LISTENERS[listener]
    run(stack.ports[key], [*hello(), *transaction(sender, rcpt), (body, "521 5.5.2"), (None, CLOSED)]).close()
    nothing_got_through(stack)


# --- STARTTLS pipelining: test_starttls.py ------------------------------------------------

# --- long lines -------------------------------------------------------------------------


@pytest.mark.parametrize("listener", ["msa", "mta", "mda"])
def test_command_line_limit_is_512_octets(stack: Since, listener: str) -> None:
    key, hello, _, _ = LISTENERS[listener]
    # NOOP takes any argument (RFC 5321 4.1.1.9); a HELO name this long would be no domain.
    run(stack.ports[key], [
        *hello(),
        (line("NOOP " + "a" * 505), "250 "),  # 512 with CRLF: fine
        (line("NOOP " + "a" * 506), "500 5.5.2"),  # 513: too long
        (line("X" * 5000), "500 5.5.2"),  # far too long: skipped, the session goes on
        (line("NOOP"), "250 2.0.0"),
    ]).close()


@pytest.mark.parametrize("listener", ["msa", "mta", "mda"])
def test_text_line_limit_is_1000_octets(stack: Since, listener: str) -> None:
    key, hello, sender, rcpt = LISTENERS[listener]
    ok_body = b"Subject: fits\r\n\r\n" + b"a" * 998 + b"\r\n" + b"." * 999 + b"\r\n.\r\n"
    long_body = b"Subject: too long\r\n\r\n" + b"b" * 999 + b"\r\n.\r\n"
    run(stack.ports[key], [
        *hello(), *transaction(sender, rcpt), (long_body, "500 5.5.2"),
        *transaction(sender, rcpt), (ok_body, "250 2."),
    ]).close()
    if listener == "mda":
        (stored,) = stack.mailbox(rcpt)
    else:
        (queued,) = stack.queued()
        stored = queued.body
    stored = stored.replace(b"\r\n", b"\n")
    assert b"Subject: fits" in stored and b"b" * 999 not in stored
    assert b"\n" + b"a" * 998 + b"\n" + b"." * 998 + b"\n" in stored  # the stuffed dot removed


# --- addresses ------------------------------------------------------------------------

LONG_LOCAL = "l" * 65 + "@example.org"
LONG_DOMAIN = "x@" + ".".join(["d" * 63] * 4) + ".example"  # 263 octets


@pytest.mark.parametrize("listener", ["msa", "mta", "mda"])
def test_address_limits_and_control_characters(stack: Since, listener: str) -> None:
    key, hello, sender, rcpt = LISTENERS[listener]
    ok_local = "l" * 64 + "@example.org"
    script: list[Step] = [*hello()]
    if listener != "msa":  # the MSA refuses any sender that is not the user's own (553 5.7.1)
        script += [
            (line(f"MAIL FROM:<{LONG_LOCAL}>"), "501 5.1.7"),
            (line(f"MAIL FROM:<{LONG_DOMAIN}>"), "501 5.1.7"),
            (b"MAIL FROM:<a\x00b@remote.example>\r\n", "501 5.1.7"),
        ]
    script += [
        (line(f"MAIL FROM:<{sender}>"), "250 2.1.0"),
        (line(f"RCPT TO:<{LONG_LOCAL}>"), "501 5.1.3"),
        (line(f"RCPT TO:<{LONG_DOMAIN}>"), "501 5.1.3"),
        (b"RCPT TO:<al\x00ice@example.org>\r\n", "501 5.1.3"),
        (line(f"RCPT TO:<{ok_local}>"), "550 5.1.1"),  # 64 octets is allowed: parsed, then unknown
        (line(f"RCPT TO:<{rcpt}>"), "250 2.1.5"),
        # A CR inside an address is a bare CR: the smuggling rule wins, the session ends.
        (b"RCPT TO:<al\rice@example.org>\r\n", "521 5.5.2"),
        (None, CLOSED),
    ]
    run(stack.ports[key], script).close()
    nothing_got_through(stack)


# --- recipients -------------------------------------------------------------------------


@pytest.mark.parametrize("listener", ["mta", "mda"])
def test_more_than_100_recipients_get_452_and_the_first_100_are_kept(stack: Since, listener: str) -> None:
    users = USERS
    stack.watch(*users)
    key, hello, sender, _ = LISTENERS[listener]
    envelope = line(f"MAIL FROM:<{sender}>") + b"".join(line(f"RCPT TO:<{u}>") for u in users)
    after_data = ["250 2.0.0"] * (100 if listener == "mda" else 1)  # LMTP: one per recipient
    run(stack.ports[key], [
        *hello(),
        (envelope, ["250 2.1.0"] + ["250 2.1.5"] * 100 + ["452 4.5.3"] * 5),  # pipelined
        (line("DATA"), "354 "),
        (b"Subject: many\r\n\r\nhi\r\n.\r\n", after_data),
    ]).close()
    if listener == "mda":
        assert [u for u in users if stack.mailbox(u)] == users[:100]
    else:
        (queued,) = stack.queued()
        assert list(queued.recipients) == users[:100]


def test_the_msa_also_stops_at_100_recipients(stack: Since) -> None:
    users = USERS[:101]
    run(stack.ports["submission"], [
        *msa_login(), (line("MAIL FROM:<alice@example.org>"), "250 2.1.0"),
        *[(line(f"RCPT TO:<{u}>"), "250 2.1.5") for u in users[:100]],
        (line(f"RCPT TO:<{users[100]}>"), "452 4.5.3"),
        (line("DATA"), "354 "), (b"Subject: many\r\n\r\nhi\r\n.\r\n", "250 2.0.0"),
    ]).close()
    (queued,) = stack.queued()
    assert list(queued.recipients) == users[:100]


# --- size: test_limits.py --------------------------------------------------------------

# --- AUTH -------------------------------------------------------------------------------


def test_auth_rules(tmp_path: Path) -> None:
    with listeners(tmp_path / "m", msa={"max_auth_failures": 2}) as stack:
        port = stack.ports["submission"]
        run(port, [
            (None, "220 "), (line("EHLO client.example"), "250 "),
            (auth_plain("alice@example.org"), "538 5.7.11"),  # before TLS: not even looked at
            (line("STARTTLS"), "220 "), (STARTTLS_HANDSHAKE, None), (line("EHLO client.example"), "250 "),
            (auth_plain("alice@example.org", "wrong"), "535 5.7.8"),
            (auth_plain("alice@example.org", "wrong again"), "421 4.7.0"),  # locked out
            (None, CLOSED),
        ]).close()
        # The address stays locked out: even the right password is not tried.
        run(port, [(None, "421 4.7.0"), (None, CLOSED)]).close()
        # The public MTA listener offers no AUTH at all.
        run(stack.ports["smtp"], [*smtp_hello(), (auth_plain("alice@example.org"), "502 5.5.1")]).close()


# --- mailbox paths ----------------------------------------------------------------------


@pytest.mark.parametrize("listener", ["mta", "mda"])
def test_addresses_that_look_like_paths_name_no_mailbox(stack: Since, listener: str) -> None:
    key, hello, sender, _ = LISTENERS[listener]
    run(stack.ports[key], [
        *hello(), (line(f"MAIL FROM:<{sender}>"), "250 2.1.0"),
        (line('RCPT TO:<"../../etc/passwd"@example.org>'), "550 5.1.1"),
        (line("RCPT TO:<a/b@example.org>"), "550 5.1.1"),
        (line('RCPT TO:<"../alice"@example.org>'), "550 5.1.1"),
        (line("RCPT TO:<../../etc/passwd@example.org>"), "501 5.1.3"),  # not even an address
        (line("DATA"), "503 5.5.1"),
    ]).close()
    nothing_got_through(stack)
    assert files_outside_mail_root(stack) == []


# --- mboxrd -----------------------------------------------------------------------------


def test_from_lines_are_quoted_in_mbox(stack: Since) -> None:
    stack.watch(QUOTING)
    body = b"Subject: quoting\r\n\r\nFrom x\r\n>From y\r\nFromage\r\n.\r\n"
    run(stack.ports["lmtp"], [
        *lmtp_hello(), *transaction("a@remote.example", QUOTING), (body, "250 2.0.0"),
    ]).close()
    raw = (stack.config.mail_root / "example.org" / "quoting.mbox").read_bytes()
    assert b"\n>From x\n>>From y\nFromage\n" in raw
    assert raw.count(b"\nFrom ") + raw.startswith(b"From ") == 1  # one message
    (stored,) = stack.mailbox(QUOTING)
    assert stored.endswith(b"\n>From x\n>>From y\nFromage\n")  # as mbox readers see it (they do not unquote)


# --- mail loops -------------------------------------------------------------------------


@pytest.mark.parametrize("listener", ["msa", "mta"])
def test_too_many_received_headers_is_a_loop(stack: Since, listener: str) -> None:
    key, hello, sender, rcpt = LISTENERS[listener]
    hops = b"".join(b"Received: from hop%d.example by hop%d.example; Mon, 1 Jan 2024 00:00:00 +0000\r\n" % (i, i)
                    for i in range(51))  # max_hops is 50
    body = hops + b"From: alice@example.org\r\nSubject: loop\r\n\r\nround and round\r\n.\r\n"
    # 50 are still fine (49 through the MSA, which adds its own)
    fewer = b"".join(hops.splitlines(keepends=True)[51 - (49 if listener == "msa" else 50):])
    run(stack.ports[key], [
        *hello(), *transaction(sender, rcpt), (body, "554 5.4.6"),
        *transaction(sender, rcpt), (fewer + b"From: alice@example.org\r\n\r\nok\r\n.\r\n", "250 2.0.0"),
    ]).close()
    assert len(stack.queued()) == 1


# --- idle and slow clients: test_limits.py ---------------------------------------------------
# --- disk full: test_disk_full.py -------------------------------------------------------------

# --- DATA without recipients -----------------------------------------------------------------


@pytest.mark.parametrize("listener", ["msa", "mta", "mda"])
def test_data_without_an_accepted_recipient(stack: Since, listener: str) -> None:
    key, hello, sender, _ = LISTENERS[listener]
    run(stack.ports[key], [
        *hello(),
        (line("DATA"), "503 5.5.1"),  # no MAIL
        (line(f"MAIL FROM:<{sender}>"), "250 2.1.0"),
        (line("DATA"), "503 5.5.1"),  # no RCPT
        (line("RCPT TO:<nobody@example.org>"), "550 5.1.1"),
        (line("DATA"), "503 5.5.1"),  # no accepted RCPT
        (b"Subject: not data\r\n", "500 5.5.2"),  # the body is read as commands, and refused
        (b".\r\n", "500 5.5.2"),
        (line("NOOP"), "250 2.0.0"),
    ]).close()
    nothing_got_through(stack)


def files_outside_mail_root(stack: Since) -> list[Path]:
    """Files that appeared in the installation folder, but not where they belong."""
    assert stack.inst is not None
    root, config = stack.inst.root, stack.config
    allowed = (config.mail_root, config.run_dir, root / "tls", config.resolve(config.dkim.key_dir),
               *([config.log_dir] if config.log_dir is not None else []))
    return [
        p for p in root.rglob("*")
        if p.is_file() and not any(p.is_relative_to(a) for a in allowed)
        and not p.name.startswith(("mailroom.", "suite.log"))
    ]
