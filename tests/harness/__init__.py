"""The test harness: one way to start services, speak SMTP and LMTP, make users, fake DNS.

- `services`: `Stack`, the real MSA, MTA, queue manager and MDA (`start_*`, as
  the daemons wire them), the MTA's two listeners with per-test settings
  (`listen_mta`), the MDA's listener with its limits (`listen_mda`), or one
  listener with a handler a test builds (`listen`), on an event loop in a
  background thread (asyncio's, or one the test passes: uvloop's), on
  loopback ports; `installation()` makes the installation they serve,
  `listeners()` starts MSA, MTA and MDA on a new one.
- `mta`, `mda`: `MTA` and `MDA`, those listeners on a stack of their own with
  what their tests read back (smtplib clients, the queued message).
- `client`: `Client`, the raw SMTP/LMTP client (bytes out, replies in,
  pipelining, STARTTLS, a transcript), scripts of (send, expect) steps played
  through it, and smtplib sessions with the MSA (`submission`, `submissions`,
  `logged_in`).
- `openings`: the first lines of the adversarial tests' dialogues (hello, STARTTLS
  and AUTH on the MSA, LHLO) and the listeners they are played against.
- `dialogue`: the runner of the transcripts in tests/dialogues/ (send this
  line, expect that reply), played through `Client` against `listeners()`.
- `peers`: scripted next hops: `MX`, an aiosmtpd host in a remote MX's part,
  on the test's event loop (`mx_server`) or a thread (`mx_thread`); `Peer` and
  `LMTPScript` on our own engine (a DSN hop, the MDA's part), the latter served
  over LMTP on the test's event loop by `lmtp_server`.
- `qmgr`: `Rig`, the queue manager in process with a FakeClock, its MX hosts
  on 127.0.0.x found through a real DNS server, and their fixtures.
- `tls_world`: a small Internet for the outbound TLS tests (signed and
  unsigned DNS, MX hosts with certificates, MTA-STS policy hosts) and its rig.
- `users`: users and aliases through the real `mailroom user` / `mailroom alias` code.
- `dns`: `FakeResolver`, DNS answers from a dictionary for unit tests, behind
  the one resolver interface the daemons use (common.dns.Resolver).

It stands on tests/support, which holds what the real processes and peers need
and never imports the harness: `Installation` (a throwaway `mailroom init` and
its daemons under supervisord), the users' password and a TLS client context,
the one port picker (ports.py), the real DNS server, Postfix, Dovecot, the
project's imports read with `ast` (source.py).  Test modules import from
these two, never from one another (tests/unit/test_test_layout.py).
"""
