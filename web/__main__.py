"""`python -m web --config FILE`: the web program (mail client autoconfig)."""

from common.daemon import main
from web.server import run

main("web", run)
