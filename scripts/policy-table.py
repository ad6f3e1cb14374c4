#!/usr/bin/env python3
"""The cost of policy, from the main tables of scripts/bench.sh runs.

    scripts/policy-table.py [--tag large] [--md] RUN.txt [RUN.txt ...]

Each RUN.txt is the standard output of a `POLICY=large scripts/bench.sh`
run (the bench's table is found in it), with buses NAME and NAME-TAG:
busvisor, busvisor-large, dbus-daemon, dbus-daemon-large, and, with
BASELINE, busvisor-before and busvisor-before-large. For every row it prints
the bus CPU per message of each (the median over the runs) and these ratios,
each the median of the per-run ratios (a run's buses ran interleaved, in the
same rounds, so a ratio within a run is the fair comparison):

    busvisor-large / busvisor             the cost of the policy (target <= 1.3)
    busvisor-large / dbus-daemon-large    against dbus-daemon (target < 0.7)
    busvisor / busvisor-before            the fast path, session.conf
                                          (target within 2%)
"""

import argparse
import math
import statistics
import sys


def parse(path):
    """{row: {bus: cpu}} from the first table of a bench.sh output."""
    lines = open(path, encoding="utf-8").read().splitlines()
    head = next((i for i, l in enumerate(lines) if l.startswith("workload ")), None)
    if head is None:
        sys.exit(f"policy-table: no bench table in {path}")
    left = lines[head].split(" |")[0].split()
    buses = [left[i - 1] for i, t in enumerate(left) if t == "rate"]
    rows = {}
    # The rows lie between two rules of dashes.
    for line in lines[head + 2 :]:
        if line.startswith("-----"):
            break
        name = line[:34].strip()
        if not name or " |" not in line:
            continue
        cpu = line.split(" |", 1)[1].split()[: len(buses)]
        rows[name] = {b: float(v) for b, v in zip(buses, cpu)}
    return buses, rows


def ratio(run, a, b):
    x, y = run.get(a), run.get(b)
    if x is None or y is None or not y or math.isnan(x) or math.isnan(y):
        return math.nan
    return x / y


def median(values):
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else math.nan


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tag", default="large", help="suffix of the buses with the policy")
    ap.add_argument("--md", action="store_true", help="a markdown table")
    ap.add_argument("runs", nargs="+")
    args = ap.parse_args()
    tag = args.tag
    runs = [parse(p) for p in args.runs]
    buses = runs[0][0]
    names = list(runs[0][1])

    bv, bvp, dd, ddp = "busvisor", f"busvisor-{tag}", "dbus-daemon", f"dbus-daemon-{tag}"
    before, beforep = "busvisor-before", f"busvisor-before-{tag}"
    cpu_cols = [b for b in (bv, bvp, before, beforep, dd, ddp) if b in buses]
    ratios = [
        (f"bv {tag}/allow-all", bvp, bv, 1.3),
        (f"bv-{tag}/dd-{tag}", bvp, ddp, 0.7),
        (f"dd {tag}/allow-all", ddp, dd, None),
    ]
    if before in buses:
        ratios.append(("bv/bv-before", bv, before, 1.02))
    if beforep in buses:
        ratios.append((f"bv-{tag}/bv-before-{tag}", bvp, beforep, None))

    cells = []
    for name in names:
        per_run = [rows.get(name, {}) for _, rows in runs]
        row = [name]
        row += [f"{median([r.get(b, math.nan) for r in per_run]):.2f}" for b in cpu_cols]
        for _, a, b, target in ratios:
            v = median([ratio(r, a, b) for r in per_run])
            over = target is not None and not (v < target if target == 0.7 else v <= target)
            row.append(f"{v:.2f}{'!' if over else ''}")
        cells.append(row)

    head = ["row"] + cpu_cols + [label for label, *_ in ratios]
    n = len(args.runs)
    print()
    print(
        f"policy cost: bus CPU per message (µs; median of {n} run{'s' if n > 1 else ''}) "
        f"and ratios (median of the per-run ratios); '!' marks a ratio over its target "
        f"(bv {tag}/allow-all <= 1.3, bv-{tag}/dd-{tag} < 0.7"
        + (", bv/bv-before <= 1.02" if before in buses else "")
        + ")"
    )
    if args.md:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for row in cells:
            print("| " + " | ".join(row) + " |")
        return
    widths = [max(len(r[i]) for r in cells + [head]) for i in range(len(head))]
    fmt = lambda r: "  ".join(
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
    )
    print(fmt(head))
    print("-" * len(fmt(head)))
    for row in cells:
        print(fmt(row))


if __name__ == "__main__":
    main()
