"""`python -m web --config FILE`: the web program (live page, /metrics, autoconfig, admin page)."""

from common.daemon import main
from web.server import bind, run

# A helper beside the daemons: it reads the database they keep (web/server.py); its
# listeners, bound before the switch by `bind`, are more than listener settings.
main("web", run, helper=True, bind=bind, preload=("encodings.idna",))
