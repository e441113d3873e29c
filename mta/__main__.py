"""`python -m mta --config FILE`: the MTA's SMTP listeners (public and internal).

The queue manager is its own process: `python -m mta.qmgr --config FILE`.
"""

from common.daemon import main
from mta.smtpd import LISTENERS, PRELOAD, run

# Sender authentication loads dkimpy, pyspf and the filter client on first use
# (a faster start); as root they must be loaded before the switch all the same.
# `[mta] processes` > 1: supervisord starts that many, each with --instance K (cli/supervise.py).
main("mta", run, listeners=LISTENERS, tls=True, preload=PRELOAD, shares_listeners=True)
