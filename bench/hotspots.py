"""Summarise a py-spy profile in raw (collapsed stack) format: where does the time go?

    python -m bench.hotspots bench/results/prof/mta.txt [--top 25]

Each line of py-spy's raw output is `frame;frame;...;leaf COUNT`.  We print the
functions with the most samples inclusive (on the stack at all) and self (the
leaf), as shares of all samples.  py-spy samples only threads that are running
(not idle) unless told otherwise, so the shares are shares of busy time.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_LINE = re.compile(r"^(.*) (\d+)$")


def _frame(text: str) -> str:
    # "func (path/to/module.py:123)" -> "func (module.py)": merge lines of one function.
    m = re.match(r"^(.*?) \((.*?)(?::\d+)?\)$", text)
    if not m:
        return text
    func, path = m.groups()
    parts = path.split("/")
    short = "/".join(parts[-2:]) if len(parts) > 1 else path
    return f"{func} ({short})"


def summarise(path: Path, top: int = 25) -> str:
    inclusive: Counter[str] = Counter()
    self_: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        stack, count = m.group(1), int(m.group(2))
        frames = [_frame(f) for f in stack.split(";") if f]
        total += count
        for f in set(frames):
            inclusive[f] += count
        if frames:
            self_[frames[-1]] += count
    out = [f"{path}: {total} samples"]
    for title, counter in (("inclusive", inclusive), ("self", self_)):
        out.append(f"  top {top} {title}:")
        for name, n in counter.most_common(top):
            out.append(f"    {100 * n / max(1, total):5.1f}%  {name}")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.hotspots")
    ap.add_argument("profiles", nargs="+", type=Path)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    for p in args.profiles:
        print(summarise(p, args.top))


if __name__ == "__main__":
    main()
