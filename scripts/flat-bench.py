#!/usr/bin/env python3
"""Does a signal cost the same however many idle peers and rules the bus holds?

    scripts/flat-bench.py --bus NAME=TEMPLATE ... [--runs 3] [--deliveries N]

Runs busbench.py (../shared/bench/busbench.py, or $BUSBENCH) with three
scenarios of its own, each a raw-socket emitter and 10 raw subscribers
with a matching rule, as busbench's `fanout`:

    flat0        no other peer (the reference row)
    flat10k      and 10,000 idle peers, each holding one non-matching rule
    rules100k    and 1,000 idle peers holding 100 non-matching rules each
                 (100,000 rules in all)

The idle rules have the shapes desktop clients use: NameOwnerChanged with
arg0, PropertiesChanged on a path, a sender's interface, a member. Bus CPU
is read from /proc/PID/task/*/schedstat (nanoseconds; busbench's ticks are
10 ms, too coarse for these rows). The table ends with each bus's CPU per
delivery on the loaded rows against flat0 (the target: within 1.1).
Options other than these are busbench.py's (--runs, --out, --md, ...).
"""

import glob
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import busbench_module  # noqa: E402


bb = busbench_module.load()


def schedstat_cpu(pids):
    ns = 0
    for p in pids:
        for t in glob.glob("/proc/%d/task/*/schedstat" % p):
            try:
                with open(t) as f:
                    ns += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                pass
    return ns / 1e9


bb.Bus.cpu = lambda self: schedstat_cpu(self.pids())


def idle_rule(peer, j):
    """A non-matching rule of a shape desktop clients hold."""
    shape = j % 4
    if shape == 0:
        return ("type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',"
                "member='NameOwnerChanged',arg0='org.example.Svc%d_%d'" % (peer, j))
    if shape == 1:
        return ("type='signal',interface='org.freedesktop.DBus.Properties',member='PropertiesChanged',"
                "path='/org/example/Obj%d/%d'" % (peer, j))
    if shape == 2:
        return "type='signal',interface='org.example.Iface%d_%d'" % (peer, j)
    return "type='signal',member='Changed%d_%d'" % (peer, j)


def open_idle(bus, peers, rules_each):
    """Idle peers: connect, Hello, AddMatch x rules_each (replies pipelined
    per peer). Their sockets are moved above fd 4096, so that the clients
    measured after them keep fds that select() takes."""
    import fcntl
    fds = []
    for i in range(peers):
        c = bb.Conn(bus.address)
        serials = []
        for j in range(rules_each):
            s = c.next_serial()
            c.send(bb.build_msg(1, s, "/org/freedesktop/DBus", "org.freedesktop.DBus", "AddMatch",
                                "org.freedesktop.DBus", "s", bb.body_s(idle_rule(i, j))))
            serials.append(s)
        for s in serials:
            m = c.wait_reply(s)
            if m[0] != 2:
                raise RuntimeError("AddMatch refused: %r" % (m[3],))
        fd = c.sock.detach()
        fds.append(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 4096))
        os.close(fd)
    return fds


def flat_run(bus, o, peers, rules_each):
    idle = open_idle(bus, peers, rules_each)
    try:
        k = max(200, o.fanout_deliveries // 10)
        return bb.fanout_run(bus, 10, k)
    finally:
        for fd in idle:
            os.close(fd)


bb.SCENARIOS.update({
    "flat0": lambda bus, o: flat_run(bus, o, 0, 0),
    "flat10k": lambda bus, o: flat_run(bus, o, 10_000, 1),
    "rules100k": lambda bus, o: flat_run(bus, o, 1_000, 100),
})
for name in ("flat0", "flat10k", "rules100k"):
    bb.HEADLINE[name] = ["deliveries_per_s", "bus_cpu_us_per_delivery"]


def main():
    argv = sys.argv[1:]
    if "-h" in argv or "--help" in argv:
        print(__doc__)
    if not any(a.startswith("--scenarios") for a in argv):
        argv += ["--scenarios", "flat0,flat10k,rules100k"]
    if not any(a.startswith("--fanout-deliveries") for a in argv):
        argv += ["--fanout-deliveries", "1000000"]
    out = None
    for i, a in enumerate(argv):
        if a == "--out" and i + 1 < len(argv):
            out = argv[i + 1]
        elif a.startswith("--out="):
            out = a.split("=", 1)[1]
    if out is None:
        out = "/tmp/flat-bench-%d.jsonl" % os.getpid()
        argv += ["--out", out]
    sys.argv = [busbench_module.PATH] + argv
    bb.main()
    # Each bus against itself: the loaded rows over flat0.
    import json
    import statistics
    per = {}
    with open(out) as f:
        for line in f:
            r = json.loads(line)
            m = r.get("metrics") or {}
            v = m.get("bus_cpu_us_per_delivery")
            if v is not None:
                per.setdefault(r["bus"], {}).setdefault(r["scenario"], []).append(v)
    print("\nbus CPU per delivery against flat0 (median of runs; target <= 1.10)")
    for b, rows in per.items():
        base = statistics.median(rows.get("flat0", [float("nan")]))
        cells = ["%s %.3f us" % ("flat0", base)]
        for s in ("flat10k", "rules100k"):
            if s in rows:
                v = statistics.median(rows[s])
                cells.append("%s %.3f us (%.2fx)" % (s, v, v / base))
        print("  %-16s %s" % (b, "  ".join(cells)))


if __name__ == "__main__":
    main()
