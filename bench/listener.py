"""`python -m bench.listener`: the SMTP listener alone, ours against aiosmtpd and Postfix.

The same load against sinks that accept and discard every message:
(a) Mailroom's engine (common.smtp) with a discard handler, on the event loop
the daemons run on (common.daemon: uvloop unless MAILROOM_EVENT_LOOP=asyncio);
(b) a stock aiosmtpd SMTP server with a discard handler on asyncio's own loop,
as aiosmtpd's documentation runs it; (c) Postfix's smtp-sink (C); and, for
reference only, (d) the same aiosmtpd server on uvloop.  Each sink runs in its
own process; the load is smtp-source with 20 sessions, 2,000 messages of
5 KiB, a new connection per message.  Prints messages per second per sink and
ends with `listener_vs_aiosmtpd=X` (the engine's rate over the stock aiosmtpd
sink's; the median over the runs).

    python -m bench.listener                   # 3 runs of the full load
    python -m bench.listener --runs 1 --messages 200   # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # tests.support lives outside the installed packages


# --- the sinks (each run in its own process: `--serve NAME PORT`) -------------------------


async def _serve_engine(port: int) -> None:
    from common.reply import Reply
    from common.smtp import Handler, Limits, MailEnvelope, MailSession, serve

    accepted = Reply(250, "2.0.0", "Ok: discarded")

    class Discard(Handler):
        async def data(self, session: MailSession, envelope: MailEnvelope) -> Reply:
            return accepted

    limits = Limits(max_connections=10_000, max_connections_per_client=10_000)
    server = await serve(f"127.0.0.1:{port}", Discard, hostname="engine.bench", limits=limits)
    async with server:
        await server.serve_forever()


async def _serve_aiosmtpd(port: int) -> None:
    from aiosmtpd.smtp import SMTP

    class Discard:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            return "250 OK"

    handler = Discard()
    loop = asyncio.get_running_loop()
    # Controller(port=0) does not work; a plain server with aiosmtpd's protocol is what it runs.
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="aiosmtpd.bench"), host="127.0.0.1", port=port, backlog=1024
    )
    async with server:
        await server.serve_forever()


def _serve(name: str, port: int) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("mail.log").setLevel(logging.ERROR)  # aiosmtpd logs every command at INFO
    if name == "engine":
        from common.daemon import run_event_loop

        run_event_loop(_serve_engine(port))  # as the daemons run
    elif name == "aiosmtpd-uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(_serve_aiosmtpd(port))
    else:
        asyncio.run(_serve_aiosmtpd(port))  # stock: asyncio's own loop


# --- the load ----------------------------------------------------------------------------------


def _free_port() -> int:
    from tests.support.suite import free_port

    return free_port()


def _start(name: str, port: int) -> subprocess.Popen[bytes]:
    # Its complaints go to our stderr: a pipe nobody reads would stall the sink when full.
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.listener", "--serve", name, str(port)], cwd=REPO, stdout=subprocess.DEVNULL
    )
    from tests.support.suite import wait_port

    wait_port(port, timeout=20)
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _load(port: int, pid: int, messages: int, sessions: int, size: int) -> tuple[float, float]:
    """smtp-source against 127.0.0.1:port; returns (messages per second, sink CPU ms per message)."""
    from tests.support.postfix import smtp_source

    before = _cpu_seconds(pid)
    run = smtp_source(f"127.0.0.1:{port}", count=messages, sessions=sessions, size=size, timeout=600)
    return messages / run.elapsed, (_cpu_seconds(pid) - before) * 1000 / messages


def measure(name: str, messages: int, sessions: int, size: int) -> tuple[float, float]:
    port = _free_port()
    if name == "smtp-sink":
        from tests.support.postfix import smtp_sink

        with smtp_sink(port, backlog=1024) as sink:
            _load(port, sink.pid, min(200, messages), sessions, size)  # warm-up
            return _load(port, sink.pid, messages, sessions, size)
    proc = _start(name, port)
    try:
        _load(port, proc.pid, min(200, messages), sessions, size)  # warm-up: imports, caches
        return _load(port, proc.pid, messages, sessions, size)
    finally:
        _stop(proc)


SINKS = ("engine", "aiosmtpd", "smtp-sink", "aiosmtpd-uvloop")


def loops() -> dict[str, str]:
    """The event loop each sink runs on, as the output says it."""
    from common.daemon import loop_choice

    return {"engine": loop_choice(), "aiosmtpd": "asyncio", "smtp-sink": "none (C)", "aiosmtpd-uvloop": "uvloop"}


def compare(runs: int, messages: int, sessions: int = 20, size: int = 5120) -> dict[str, Any]:
    """Run the load `runs` times against each sink, alternating their order; print as it goes.

    Returns every rate and CPU figure, their medians, and `listener_vs_aiosmtpd`:
    the median over the runs of the engine's rate over the stock aiosmtpd sink's
    (each run's two rates measured within the same minute, so the ratio shrugs
    off a busy machine better than the rates do).  aiosmtpd on uvloop is measured
    too, for reference; it is not part of the ratio.
    """
    from tests.support.peers import find

    if not (find("smtp-source") and find("smtp-sink")):
        sys.exit("bench.listener: needs Postfix's smtp-source and smtp-sink (apt-get install postfix)")
    rates: dict[str, list[float]] = {s: [] for s in SINKS}
    cpu: dict[str, list[float]] = {s: [] for s in SINKS}
    ratios: list[float] = []
    print(f"listener-only load: smtp-source -s {sessions} -m {messages} -l {size},"
          f" a new connection per message; {os.cpu_count()} CPUs", flush=True)
    loop_of = loops()
    print("event loops: " + "  ".join(f"{s} {loop_of[s]}" for s in SINKS), flush=True)
    for i in range(runs):
        # Alternate the order, so no sink always follows the same neighbour.
        for sink in SINKS if i % 2 == 0 else SINKS[::-1]:
            rate, cpu_ms = measure(sink, messages, sessions, size)
            rates[sink].append(rate)
            cpu[sink].append(cpu_ms)
            time.sleep(0.5)
        ratios.append(rates["engine"][-1] / rates["aiosmtpd"][-1])
        print(f"run {i + 1}: " + "  ".join(f"{s} {rates[s][-1]:7.0f}/s" for s in SINKS)
              + f"  engine/aiosmtpd {ratios[-1]:.2f}", flush=True)
    med = {s: statistics.median(v) for s, v in rates.items()}
    med_cpu = {s: statistics.median(v) for s, v in cpu.items()}
    print("median:  " + "  ".join(f"{s} {med[s]:7.0f}/s" for s in SINKS))
    print("sink CPU per message (median): " + "  ".join(f"{s} {med_cpu[s]:.2f} ms" for s in SINKS))
    # CPU is read from /proc in clock ticks (10 ms): a tiny load (the harness test's)
    # may cost the engine less than one, and then there is no ratio to give.
    cpu_ratio = med_cpu["aiosmtpd"] / med_cpu["engine"] if med_cpu["engine"] > 0 else None
    print(f"engine/smtp-sink {med['engine'] / med['smtp-sink']:.2f}"
          f"  cpu_aiosmtpd_vs_engine={'n/a' if cpu_ratio is None else f'{cpu_ratio:.2f}'}"
          f"  (for reference, not the ratio: engine/aiosmtpd-uvloop"
          f" {med['engine'] / med['aiosmtpd-uvloop']:.2f})", flush=True)
    return {
        "messages": messages, "sessions": sessions, "size": size, "loops": loop_of,
        "rates_per_s": rates, "cpu_ms_per_msg": cpu, "ratios": ratios,
        "median_per_s": med, "median_cpu_ms_per_msg": med_cpu,
        "listener_vs_aiosmtpd": statistics.median(ratios),
        "cpu_aiosmtpd_vs_engine": cpu_ratio,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.listener")
    parser.add_argument("--serve", nargs=2, metavar=("SINK", "PORT"), help=argparse.SUPPRESS)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--size", type=int, default=5120)
    args = parser.parse_args(argv)
    if args.serve:
        _serve(args.serve[0], int(args.serve[1]))
        return
    result = compare(args.runs, args.messages, args.sessions, args.size)
    print(f"listener_vs_aiosmtpd={result['listener_vs_aiosmtpd']:.2f}")


if __name__ == "__main__":
    main()
