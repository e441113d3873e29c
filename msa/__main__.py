"""`python -m msa --config FILE`: the submission server."""

from common.daemon import main
from msa.server import run

main("msa", run)
