"""`python -m mta --config FILE`: the MTA's SMTP listeners (public and internal).

The queue manager is its own process: `python -m mta.qmgr --config FILE`.
"""

from common.daemon import main
from mta.smtpd import LISTENERS, run

main("mta", run, listeners=LISTENERS, tls=True)
