"""A lab Internet on loopback addresses, for learning how mail finds its way.

`mailroom lab` runs it next to the daemons: a DNS server (lab/dns.py) that
Mailroom's `[dns] nameservers` points at, and MX hosts (lab/mx.py) on 127.0.0.x
addresses that behave in named ways (lab/scenarios.py).  docs/lab.md walks
through each scenario.  Nothing here is used by a production installation.
"""
