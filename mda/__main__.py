"""`python -m mda --config FILE`: the LMTP delivery agent."""

from common.daemon import main
from mda.server import run

main("mda", run)
