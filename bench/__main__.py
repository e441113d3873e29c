"""`python -m bench`: run the loads against Mailroom and Postfix, three times; print and save the figures.

    python -m bench                    # the full run (`make bench`): 3 runs of every load
    python -m bench --quick            # fewer messages, for development (or BENCH_QUICK=1)
    python -m bench --runs 1 --messages 20 --sessions 2 --idle 5 --rate 10 --duration 2 --listener-messages 100
    python -m bench --profile bench/results/prof   # also py-spy mta, qmgr, mda during load 1 (and checks on)

Each load runs `--runs` times, the two systems taking turns to go first; the
table shows the median and the range of each figure.  It also records the
machine (CPU, cores, an fsync latency measured on the benchmark's disk,
kernel, Python, Postfix) and the commit, the CPU milliseconds per delivered
message of every process of both systems (from /proc), and then the listener
alone (bench/listener.py).  The DNS loads (bench/dnsload.py) run against a second Mailroom with the
sender checks on and a local DNS server.  The last line printed is

    e2e_ratio=R one_session_ratio=S p99_ms=L cpu_ms_per_msg=C idle1000_mb=M listener_vs_aiosmtpd=X
    checks_ratio=K dns_stall_ratio=D

(on one line).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # tests.support lives outside the installed packages

from bench import cpu, dnsload, listener, loads, machine, procmem  # noqa: E402
from bench.inotify import MaildirWatch  # noqa: E402
from bench.report import by_process_line, last_line, render_table  # noqa: E402

USERS = ["load1", "load2", "load3", "warm"]


def _prepare(idle: int) -> None:
    if os.geteuid() != 0:
        sys.exit("bench: must run as root (Postfix runs only as root); try: sudo make bench")
    from tests.support.peers import find

    if not (find("postfix") and find("smtp-source")):
        print("bench: installing Postfix and the other peers (.ci/install-peers)", flush=True)
        subprocess.run([str(REPO / ".ci" / "install-peers")], check=True)
    # 1,000 client sockets here, 1,000 server sockets in the listener (which
    # inherits this limit through supervisord / postfix master).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(4096, 2 * idle + 1024)
    if soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


def _both(order: list[Any], fn: Any) -> dict[str, Any]:
    out = {}
    for system in order:
        print(f"  {system.name} ...", flush=True)
        out[system.name] = fn(system)
    return out


def _profile_start(pids: dict[str, int], out: Path) -> list[tuple[subprocess.Popen[bytes], Path]]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out.mkdir(parents=True, exist_ok=True)
    procs = []
    for name in ("mta", "qmgr", "mda"):
        raw = out / f"{name}.txt"
        p = subprocess.Popen(
            [spy, "record", "--pid", str(pids.get(name) or pids[f"{name}_0"]), "--format", "raw", "--rate", "200",
             # Only the thread holding the GIL: the samples count Python's CPU, not waits
             # (uvloop's poll and fsync release it) that would drown it.
             "--gil", "--nonblocking", "-o", str(raw)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        procs.append((p, raw))
    time.sleep(1.0)
    return procs


def _profile_stop(procs: list[tuple[subprocess.Popen[bytes], Path]]) -> None:
    for p, _ in procs:
        p.send_signal(signal.SIGINT)
    for p, raw in procs:
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        print(f"  profile: {raw}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="how many times each load runs")
    ap.add_argument("--quick", action="store_true", default=os.environ.get("BENCH_QUICK") == "1",
                    help="small loads for development (also BENCH_QUICK=1); explicit sizes still win")
    ap.add_argument("--messages", type=int, help="messages in loads 1 and 2 (2000; quick 200)")
    ap.add_argument("--sessions", type=int, default=20, help="concurrent sessions in load 1")
    ap.add_argument("--rate", type=float, default=50.0, help="messages per second in load 3")
    ap.add_argument("--duration", type=float, help="seconds of load 3 (20; quick 4)")
    ap.add_argument("--idle", type=int, help="idle connections in load 4 (1000; quick 200)")
    ap.add_argument("--listener-messages", type=int, help="messages of the listener-only load (2000; quick 500)")
    ap.add_argument("--listener-runs", type=int, default=5,
                    help="runs of the listener-only load (each takes seconds; more runs steady its median)")
    ap.add_argument("--no-listener", action="store_true", help="skip the listener-only load")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "latest.json")
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp"),
                    help="where the throwaway installations live (a real disk, not tmpfs)")
    ap.add_argument("--keep", action="store_true", help="keep the installations' files")
    ap.add_argument("--profile", type=Path, help="py-spy the Mailroom daemons during load 1 into this folder "
                    "(and those of the Mailroom with the sender checks on during its load 1, into DIR/checks)")
    ap.add_argument("--mta-processes", type=int, default=1, metavar="N",
                    help="Mailroom's [mta] processes: MTA listener processes sharing the port (default 1)")
    ap.add_argument("--stall-messages", type=int,
                    help="messages of the fast group in the DNS stall load (1000, at most --messages)")
    ap.add_argument("--stall-sessions", type=int, default=20, help="sessions sending from the stalled domain")
    ap.add_argument("--dns-timeout", type=float, default=5.0,
                    help="[dns] timeout of the Mailroom with the sender checks on (seconds)")
    args = ap.parse_args(argv)
    quick = args.quick
    if args.messages is None:
        args.messages = 200 if quick else 2000
    if args.duration is None:
        args.duration = 4.0 if quick else 20.0
    if args.idle is None:
        args.idle = 200 if quick else 1000
    if args.listener_messages is None:
        args.listener_messages = 500 if quick else 2000
    if args.stall_messages is None:
        args.stall_messages = min(1000, args.messages)
    _prepare(args.idle)
    started = time.monotonic()

    from bench.systems import MailroomSystem, PostfixSystem

    args.workdir.mkdir(parents=True, exist_ok=True)
    about = machine.describe(args.workdir)
    dirty = ", with uncommitted changes" if about["dirty"] else ""
    print(f"bench: {about['cpu_model']}, {about['cores']} cores, kernel {about['kernel']},"
          f" Python {about['python']}, Postfix {about['postfix']}", flush=True)
    print(f"bench: fsync of 4 KiB on {args.workdir}: median {about['fsync_4k']['median_ms']:.2f} ms,"
          f" p99 {about['fsync_4k']['p99_ms']:.2f} ms; load average {about['loadavg_at_start']}", flush=True)
    print(f"bench: commit {about['commit'][:12]} ({about['branch']}{dirty});"
          f" Mailroom with [mta] processes = {args.mta_processes}", flush=True)
    root = Path(tempfile.mkdtemp(prefix="mailroom-bench-", dir=args.workdir))
    # Searchable by the Mailroom user before its installation is made here: else the
    # test support would put that installation under /tmp instead (possibly tmpfs).
    root.chmod(0o711)
    watch = MaildirWatch()
    mailroom: MailroomSystem | None = None
    postfix: PostfixSystem | None = None
    checks: dnsload.ChecksSystem | None = None
    dns_server = None
    runs: list[dict[str, Any]] = []
    try:
        print(f"bench: installations under {root}", flush=True)
        mailroom = MailroomSystem(root / "mailroom", USERS, args.idle, mta_processes=args.mta_processes)
        postfix = PostfixSystem(root / "postfix", USERS, args.idle)
        mailroom.start()
        postfix.start()
        systems: list[Any] = [mailroom, postfix]
        for s in systems:
            for u in USERS:
                watch.add(s.new_folder(u))
        dns_server = dnsload.start_dns()
        checks = dnsload.ChecksSystem(root / "checks", dns_server, timeout=args.dns_timeout,
                                      mta_processes=args.mta_processes)
        checks.start()
        for u in dnsload.USERS:
            watch.add(checks.new_folder(u))
        loads.throughput(checks, watch, "warm", messages=20, sessions=2)
        # Warm up both (first connections, imports, caches) so load 1 measures the steady state.
        print("warm-up", flush=True)
        _both(systems, lambda s: loads.throughput(s, watch, "warm", messages=20, sessions=2))

        for i in range(args.runs):
            # Take turns: Mailroom first in odd runs, Postfix first in even ones, and the
            # order flips from load to load, so neither always follows the other's leftovers.
            order = systems if i % 2 == 0 else systems[::-1]
            print(f"run {i + 1} of {args.runs}", flush=True)
            runs.append(_run_once(args, order, watch, mailroom, checks))
        # The idle connections last: Postfix keeps an smtpd process per connection
        # alive for max_idle (100 s) afterwards, and a thousand of them would weigh
        # on the next run's loads (and fill its memory figures).
        for i, run in enumerate(runs):
            order = systems if i % 2 == 0 else systems[::-1]
            print(f"load 4 ({i + 1} of {args.runs}): {args.idle} idle connections", flush=True)
            run["load4"] = _both(order, lambda s: loads.idle(s, args.idle))
    finally:
        watch.close()
        if mailroom is not None:
            mailroom.stop()
        if postfix is not None:
            postfix.stop()
        if checks is not None:
            checks.stop()
        if dns_server is not None:
            dns_server.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    listener_result = None
    if not args.no_listener:
        listener_result = listener.compare(args.listener_runs, args.listener_messages)

    table, summary = render_table(runs, listener_result)
    about["loadavg_at_end"] = machine.loadavg()
    result: dict[str, Any] = {
        "summary": summary,
        "machine": about,
        "config": {k: str(v) for k, v in vars(args).items()},
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.monotonic() - started, 1),
        "runs": _jsonable(runs),
        "listener": listener_result,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(_jsonable(result), indent=2) + "\n")
    print(table)
    print(f"machine: {about['cpu_model']}, {about['cores']} cores, fsync 4 KiB"
          f" {about['fsync_4k']['median_ms']:.2f} ms, load average {about['loadavg_at_start']}"
          f" -> {about['loadavg_at_end']}; commit {about['commit'][:12]}{dirty}; {result['seconds']:.0f} s")
    print(f"figures written to {args.out}")
    print(by_process_line(summary))
    print(last_line(summary))
    return 0


def _run_once(
    args: argparse.Namespace, order: list[Any], watch: MaildirWatch, mailroom: Any, checks: dnsload.ChecksSystem,
) -> dict[str, Any]:
    """Loads 1 to 3 once, each against both systems in turn; load 1 also measures CPU and memory;
    then the DNS loads against the Mailroom with the sender checks on."""
    run: dict[str, Any] = {"cpu": {}}
    peaks: dict[str, procmem.Peaks] = {}
    print(f"load 1: {args.messages} x 5 KiB over {args.sessions} sessions", flush=True)

    def load1(s: Any) -> loads.Throughput:
        prof = _profile_start(s.program_pids(), args.profile) if args.profile and s is mailroom else []
        try:
            before = cpu.snapshot(s.processes)
            with procmem.Sampler(s.processes) as sampler:
                result = loads.throughput(s, watch, "load1", messages=args.messages, sessions=args.sessions)
                # Count the work that follows the last file (the queue's last settle) too.
                time.sleep(0.3)
            run["cpu"][s.name] = cpu.use(before, cpu.snapshot(s.processes), result.delivered)
        finally:
            _profile_stop(prof)
        peaks[s.name] = sampler.peaks
        return result

    run["load1"] = _both(order, load1)
    print("load 1 with the sender checks on (a local DNS server publishing SPF and DMARC)", flush=True)
    prof = _profile_start(checks.program_pids(), args.profile / "checks") if args.profile else []
    try:
        run["checks"] = loads.throughput(checks, watch, "checks", messages=args.messages, sessions=args.sessions)
    finally:
        _profile_stop(prof)
    print(f"dns stall: {args.stall_messages} messages over {args.sessions} sessions, alone and while"
          f" {args.stall_sessions} sessions send from a domain whose DNS never answers", flush=True)
    run["stall"] = dnsload.stall(checks, watch, messages=args.stall_messages, sessions=args.sessions,
                                 stalled=args.stall_sessions)
    print(f"load 2: {args.messages} x 5 KiB over 1 session", flush=True)
    run["cpu_one_session"] = {}

    def load2(s: Any) -> loads.Throughput:
        # CPU per message here too: one session shares no commit and no fsync, so
        # what each message costs on its own shows (and which process pays it).
        before = cpu.snapshot(s.processes)
        result = loads.throughput(s, watch, "load2", messages=args.messages, sessions=1)
        time.sleep(0.3)
        run["cpu_one_session"][s.name] = cpu.use(before, cpu.snapshot(s.processes), result.delivered)
        return result

    run["load2"] = _both(order[::-1], load2)
    print(f"load 3: {args.rate:g} msgs/s for {args.duration:g} s", flush=True)
    run["load3"] = _both(order, lambda s: loads.latency(s, watch, "load3", rate=args.rate, duration=args.duration))
    run["load5"] = peaks
    m, p = "Mailroom", "Postfix"
    l1, l2, l3, c = run["load1"], run["load2"], run["load3"], run["cpu"]
    print(f"  e2e {l1[m].e2e_per_s:.0f} vs {l1[p].e2e_per_s:.0f} msg/s;"
          f" one session {l2[m].e2e_per_s:.0f} vs {l2[p].e2e_per_s:.0f};"
          f" p99 {l3[m].p99_ms:.1f} vs {l3[p].p99_ms:.1f} ms;"
          f" CPU {c[m].total_ms_per_msg:.2f} vs {c[p].total_ms_per_msg:.2f} ms/msg", flush=True)
    st = run["stall"]
    print(f"  checks on {run['checks'].e2e_per_s:.0f} vs off {l1[m].e2e_per_s:.0f} msg/s;"
          f" stall: alone {st.alone_per_s:.0f}, with {st.stalled_sessions} stalled sessions"
          f" {st.with_stall_per_s:.0f} msg/s ({st.ratio:.2f}); stalled replies {st.stalled_codes},"
          f" longest wait {st.stalled_max_s:.2f} s", flush=True)
    return run


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and value != value:
        return None  # NaN is not JSON
    return value


if __name__ == "__main__":
    raise SystemExit(main())
