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
from lab import dns, mx, scenarios, tlslab


async def run(ctx: daemon.Context) -> None:
    cfg = ctx.config
    host, port = parse_hostport(cfg.lab.dns)
    # The outbound-TLS scenarios: certificates from the lab CA, a TLSA record for the DANE host.
    files = tlslab.prepare(cfg.run_dir, names={"mx.sts.test": tlslab.WRONG_NAME, "mta-sts": "mta-sts.sts.test"},
                           self_signed=["mx.dane.test"])
    records = scenarios.records()
    records["_25._tcp.mx.dane.test"] = {"TLSA": [tlslab.tlsa_3_1_1(files, "mx.dane.test")]}
    try:
        udp, tcp = await dns.serve(dns.Zone(records), host, port)
        dns.log.info("lab DNS answering on %s (udp and tcp)", cfg.lab.dns)
        servers = await mx.serve_hosts(
            scenarios.listening_hosts(), port=cfg.mta.remote_port, run_dir=cfg.run_dir, tls=ctx.tls(),
            limits=limits_from(cfg.smtp), slow=cfg.lab.slow_reply,
            tls_of={"mx.sts.test": tlslab.context(files, "mx.sts.test"),
                    "mx.dane.test": tlslab.context(files, "mx.dane.test")},
        )
    except OSError as exc:
        # Status 2: supervisord leaves it stopped (starting it again cannot free the port).
        print(f"lab: cannot listen ([lab] dns = {cfg.lab.dns!r}, [mta] remote_port = {cfg.mta.remote_port}): {exc}",
              file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    try:
        policy_port = cfg.outbound_tls.mta_sts_port
        servers.append(await tlslab.serve_policies(scenarios.POLICY_HOST, policy_port,
                                                   tlslab.context(files, "mta-sts"), scenarios.policies()))
        tlslab.log.info("MTA-STS policy host on %s:%d", scenarios.POLICY_HOST, policy_port)
    except OSError as exc:  # the other scenarios still work
        tlslab.log.warning("MTA-STS policy host: cannot listen on %s:%d: %s", scenarios.POLICY_HOST, policy_port, exc)
    resolver = None
    if cfg.lab.dnssec:
        zone_file, anchor = tlslab.signed_zone(records, files.folder)
        resolver = tlslab.start_resolver(cfg.lab.dnssec, cfg.lab.dns, zone_file, anchor, files.folder)
    try:
        await daemon.serve_until_stopped(ctx, [tcp, *servers], grace=2.0)
    finally:
        udp.close()
        tlslab.stop_resolver(resolver)


def main() -> None:
    daemon.main("lab", run, tls=True)


if __name__ == "__main__":
    main()
