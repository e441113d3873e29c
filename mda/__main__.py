"""`python -m mda --config FILE`: the LMTP delivery agent."""

from common.daemon import main
from mda.server import LISTENERS, run

main("mda", run, listeners=LISTENERS, writes_mail=True)
