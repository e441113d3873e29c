"""`python -m lab --config FILE`: the lab Internet, run by `mailroom run` when `[lab] enabled`.

One process holds the lab's DNS server and every lab MX host.  It goes through
the daemon skeleton like the others (config, logging, the switch to the
Mailroom user), so what the MX hosts store belongs to that user.
"""

from __future__ import annotations

import sys

from common import daemon
from common.config import parse_hostport
from common.smtp.serve import limits_from
from lab import dns, mx, scenarios


async def run(ctx: daemon.Context) -> None:
    cfg = ctx.config
    host, port = parse_hostport(cfg.lab.dns)
    try:
        udp, tcp = await dns.serve(dns.Zone(scenarios.records()), host, port)
        dns.log.info("lab DNS answering on %s (udp and tcp)", cfg.lab.dns)
        servers = await mx.serve_hosts(
            scenarios.listening_hosts(), port=cfg.mta.remote_port, run_dir=cfg.run_dir, tls=ctx.tls(),
            limits=limits_from(cfg.smtp), slow=cfg.lab.slow_reply,
        )
    except OSError as exc:
        # Status 2: supervisord leaves it stopped (starting it again cannot free the port).
        print(f"lab: cannot listen ([lab] dns = {cfg.lab.dns!r}, [mta] remote_port = {cfg.mta.remote_port}): {exc}",
              file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    await daemon.serve_until_stopped(ctx, [tcp, *servers], grace=2.0)
    udp.close()


def main() -> None:
    daemon.main("lab", run, tls=True)


if __name__ == "__main__":
    main()
