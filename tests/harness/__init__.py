"""The test harness: one way to start services, speak SMTP and LMTP, make users, fake DNS.

- `services`: `Stack`, the real MSA, MTA, queue manager and MDA (or one listener
  with a handler a test builds) on an event loop in a background thread, on
  loopback ports; `installation()` makes the installation they serve.
- `client`: `Client`, the raw SMTP/LMTP client (bytes out, replies in,
  pipelining, STARTTLS, a transcript), and dialogue scripts played through it.
- `users`: users and aliases through the real `mailroom user` / `mailroom alias` code.
- `dns`: `FakeResolver`, DNS answers from a dictionary for unit tests, behind
  both resolver interfaces the daemons use (mta.routing.Resolver, mta.authdns.Resolver).

It stands on tests/support, which holds what the real processes and peers need:
`Installation` (a throwaway `mailroom init` and its daemons under supervisord),
the one port picker (ports.py), the real DNS server, Postfix, Dovecot.
"""
