"""`python -m web --config FILE`: the web program (mail client autoconfig)."""

from web.server import main

main()
