"""`python -m msa --config FILE`: the submission server (587 and 465 roles)."""

from common.daemon import main
from msa.server import LISTENERS, run

main("msa", run, listeners=LISTENERS, tls=True)
