"""Sender authentication: who may send as whom, and the proof we add to what leaves.

A message from the Internet meets these files in this order (the MTA's
listener, mta/smtpd.py, calls them through one `MailAuth`, mailauth.py):

1. At connect, on the public listener: `contentfilter.py` asks the DNS
   blocklists about the client's address (554 before the greeting if listed).
2. At RCPT: a bounce coming back to one of our SRS addresses is turned back
   into the original sender's address by `srs.py` (a forged one: 550).
3. After DATA, `checks.py` gives its verdict: SPF (`spf.py`, RFC 7208: may
   this address send for the envelope domain?), DKIM (dkimpy, with the keys
   fetched first; `dkim.py` knows our own keys), DMARC (`dmarc.py`, RFC 7489:
   does SPF or DKIM pass for the From: domain, and what does it ask of us?)
   and ARC (RFC 8617: what the forwarders before us saw).  The verdict
   becomes a refusal, or an Authentication-Results field on top of the
   message; one that we forward outside gets our ARC seal (`dkim.py`).
   When the From: domain has a DMARC record, `dmarcreport.py` keeps the
   verdict for the daily aggregate report (`mailroom dmarc report` sends it).
4. Then `contentfilter.py` asks rspamd, whose answer is a refusal or the
   X-Spam fields the MDA files by.

Mail of our own (from our MSA, or a trusted network) meets only `dkim.py`:
it is DKIM-signed once, when the MTA queues it, if it leaves our domains.
Later the queue manager (mta/qmgr.py) asks `srs.py` for the envelope sender
of mail an alias forwards outside, and `dkim.py` signs the notices and
reports it writes itself.

`mailauth.py` is the one face the daemons see: a `MailAuth` built from
values (the signer, the resolver, the filter client, the SRS codec and the
policy) in the daemon's wiring and passed in.  The others are functions of
plain data, each testable with a dictionary for DNS.  `authdns.py` is apart:
the blocking lookups of one-shot commands (`mailroom dns --check`); the
daemons never use it.

Nothing here is imported by this file: dkimpy and the public suffix list take
a third of a second to load, and a listener should not wait for them.
"""
