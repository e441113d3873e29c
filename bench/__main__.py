"""`python -m bench`: run the loads against Mailroom and Postfix in turn; print and save the figures.

    python -m bench                          # the full run (`make bench`)
    python -m bench --messages 20 --sessions 2 --idle 5 --rate 10 --duration 2   # a smoke run
    python -m bench --profile bench/results/prof   # also py-spy mta, qmgr, mda during load 1

The last line printed is `e2e_ratio=R p99_ms=L idle1000_mb=M`.
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

from bench import loads, procmem  # noqa: E402
from bench.inotify import MaildirWatch  # noqa: E402
from bench.report import render_table  # noqa: E402

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
            [spy, "record", "--pid", str(pids[name]), "--format", "raw", "--rate", "200",
             "--nonblocking", "-o", str(raw)],
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
    ap.add_argument("--messages", type=int, default=2000, help="messages in loads 1 and 2")
    ap.add_argument("--sessions", type=int, default=20, help="concurrent sessions in load 1")
    ap.add_argument("--rate", type=float, default=50.0, help="messages per second in load 3")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of load 3")
    ap.add_argument("--idle", type=int, default=1000, help="idle connections in load 4")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "latest.json")
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp"),
                    help="where the throwaway installations live (a real disk, not tmpfs)")
    ap.add_argument("--keep", action="store_true", help="keep the installations' files")
    ap.add_argument("--profile", type=Path, help="py-spy the Mailroom daemons during load 1 into this folder")
    args = ap.parse_args(argv)
    _prepare(args.idle)

    from bench.systems import MailroomSystem, PostfixSystem

    args.workdir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="mailroom-bench-", dir=args.workdir))
    watch = MaildirWatch()
    mailroom: MailroomSystem | None = None
    postfix: PostfixSystem | None = None
    figures: dict[str, Any] = {}
    try:
        print(f"bench: installations under {root}", flush=True)
        mailroom = MailroomSystem(root / "mailroom", USERS, args.idle)
        postfix = PostfixSystem(root / "postfix", USERS, args.idle)
        mailroom.start()
        postfix.start()
        systems: list[loads.System] = [mailroom, postfix]
        for s in systems:
            for u in USERS:
                watch.add(s.new_folder(u))
        # Warm up both (first connections, imports, caches) so load 1 measures the steady state.
        print("warm-up", flush=True)
        _both(systems, lambda s: loads.throughput(s, watch, "warm", messages=20, sessions=2))

        print(f"load 1: {args.messages} x 5 KiB over {args.sessions} sessions", flush=True)
        peaks: dict[str, procmem.Peaks] = {}

        def load1(s: Any) -> loads.Throughput:
            prof = _profile_start(s.program_pids(), args.profile) if args.profile and s is mailroom else []
            try:
                with procmem.Sampler(s.processes) as sampler:
                    result = loads.throughput(s, watch, "load1", messages=args.messages, sessions=args.sessions)
            finally:
                _profile_stop(prof)
            peaks[s.name] = sampler.peaks
            return result

        figures["load1"] = _both(systems, load1)
        # Alternate who goes first, so neither always follows the other's leftovers.
        print(f"load 2: {args.messages} x 5 KiB over 1 session", flush=True)
        figures["load2"] = _both(
            systems[::-1], lambda s: loads.throughput(s, watch, "load2", messages=args.messages, sessions=1)
        )
        print(f"load 3: {args.rate:g} msgs/s for {args.duration:g} s", flush=True)
        figures["load3"] = _both(
            systems, lambda s: loads.latency(s, watch, "load3", rate=args.rate, duration=args.duration)
        )
        print(f"load 4: {args.idle} idle connections", flush=True)
        figures["load4"] = _both(systems[::-1], lambda s: loads.idle(s, args.idle))
        figures["load5"] = peaks
    finally:
        watch.close()
        if mailroom is not None:
            mailroom.stop()
        if postfix is not None:
            postfix.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    result = _jsonable(figures)
    result["config"] = {k: str(v) for k, v in vars(args).items()}
    result["when"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    result["machine"] = {"cpus": os.cpu_count(), "kernel": os.uname().release}
    table, summary = render_table(figures)
    result["summary"] = summary
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table)
    print(f"figures written to {args.out}")
    print(
        f"e2e_ratio={summary['e2e_ratio']:.2f} p99_ms={summary['p99_ms']:.1f}"
        f" idle1000_mb={summary['idle1000_mb']:.1f}"
    )
    return 0


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, float) and value != value:
        return None  # NaN is not JSON
    return value


if __name__ == "__main__":
    raise SystemExit(main())
