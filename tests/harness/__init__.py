"""The test harness: one way to start services, speak SMTP and LMTP, make users, fake DNS.

- `services`: `Stack`, the real MSA, MTA, queue manager and MDA (`start_*`, as
  the daemons wire them), the MTA's two listeners with per-test settings
  (`listen_mta`), or one listener with a handler a test builds (`listen`), on an
  event loop in a background thread, on loopback ports; `installation()` makes
  the installation they serve, `listeners()` starts MSA, MTA and MDA on a new one.
- `client`: `Client`, the raw SMTP/LMTP client (bytes out, replies in,
  pipelining, STARTTLS, a transcript), dialogue scripts played through it, and
  smtplib sessions with the MSA (`submission`, `submissions`, `logged_in`).
- `users`: users and aliases through the real `mailroom user` / `mailroom alias` code.
- `dns`: `FakeResolver`, DNS answers from a dictionary for unit tests, behind
  the one resolver interface the daemons use (common.dns.Resolver).

It stands on tests/support, which holds what the real processes and peers need:
`Installation` (a throwaway `mailroom init` and its daemons under supervisord),
the one port picker (ports.py), the real DNS server, Postfix, Dovecot.
"""
