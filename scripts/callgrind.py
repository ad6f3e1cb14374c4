#!/usr/bin/env python3
"""Instruction counts of a bus process for a fixed workload, under callgrind.

    scripts/callgrind.py BUS WORKLOAD N [--out FILE] [--services DIR]

BUS is `busvisor` (target/release/busvisor, or $BUSVISOR) or `dbus-daemon`.
WORKLOAD is one of
    payload4k   N method calls of 4 KiB (dbus-test-tool spam --queue=64 --bytes)
                to a dbus-test-tool echo, as busbench.py's payload4k row
    pipelined   N empty method calls, --queue=64 (busbench.py's pipelined row)
    rtt         N empty method calls, one in flight (busbench.py's rtt row)
    driver      N calls of org.freedesktop.DBus.GetNameOwner, one in flight
                (raw socket client, busbench.py's driver row)
    connect     N sequential connect + SASL + Hello + close (raw socket
                client, busbench.py's connect row)
    idle        N idle clients (Hello + AddMatch) held, then closed: prints
                the bus's RSS before, with them and after (no callgrind)

The bus runs under `valgrind --tool=callgrind`; after a warm-up the counters
are zeroed (callgrind_control -z), the workload runs, and they are dumped
(callgrind_control -d): the total is the instructions of the workload alone
(user space only: the kernel's share of each system call is not counted).
busvisor's bus is a forked child of its keeper, which callgrind_control
cannot reach: for it the bus runs twice, with N and 2N units, and the
figure is the difference of the bus's totals at exit.
Prints the total and the per-unit figure; with --out, the callgrind file is
kept for callgrind_annotate. Instruction counts do not move with the
machine's load, unlike CPU time: the tool to compare two builds with.
"""

import argparse
import glob
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import busbench_module  # noqa: E402


def rss_kib(pid, field="VmRSS:"):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bus", choices=["busvisor", "dbus-daemon"])
    ap.add_argument("workload", choices=["payload4k", "pipelined", "rtt", "driver", "connect", "idle"])
    ap.add_argument("n", type=int)
    ap.add_argument("--out", help="keep the callgrind output here")
    ap.add_argument("--services", help="a services directory to load (busvisor --services-dir / <servicedir>)")
    ap.add_argument("--binary", help="the busvisor binary (default: $BUSVISOR or target/release/busvisor)")
    ap.add_argument("--native", action="store_true",
                    help="no callgrind: the bus's CPU time (schedstat, ns) and its system calls (perf stat)")
    a = ap.parse_args()
    bb = busbench_module.load()
    if a.native:
        NATIVE["on"] = True

    work = tempfile.mkdtemp(prefix="callgrind-bus.")
    sock = os.path.join(work, "bus")
    address = "unix:path=" + sock
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    if a.bus == "busvisor":
        exe = a.binary or os.environ.get("BUSVISOR") or os.path.join(target, "release", "busvisor")
        cmd = [exe, "--nofork", "--print-address", "--address=" + address]
        if a.services:
            cmd += ["--services-dir", a.services]
    else:
        conf = os.path.join(work, "bus.conf")
        with open(conf, "w") as f:
            f.write("<busconfig><type>session</type><listen>%s</listen>"
                    "<auth>EXTERNAL</auth>%s"
                    "<include ignore_missing=\"yes\">/usr/share/dbus-1/session.conf</include>"
                    "<policy context=\"default\"><allow send_destination=\"*\" eavesdrop=\"true\"/>"
                    "<allow eavesdrop=\"true\"/><allow own=\"*\"/></policy></busconfig>"
                    % (address, "<servicedir>%s</servicedir>" % a.services if a.services else ""))
        cmd = ["dbus-daemon", "--nofork", "--print-address", "--config-file=" + conf]
    out = a.out or os.path.join(work, "callgrind.out")
    grind = a.workload != "idle" and not a.native
    env = dict(os.environ)
    NATIVE["file"] = os.path.join(work, "perf.txt")

    def once(n, out):
        """Start the bus, run the workload with N units, stop it. Returns
        (the workload's result, the pid of the bus process)."""
        a.n = n
        argv = cmd
        if grind:
            argv = ["valgrind", "--tool=callgrind", "--callgrind-out-file=" + out + ".%p"] + cmd
        bus = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=open(os.path.join(work, "log"), "w"), env=env)
        try:
            line = bus.stdout.readline().decode()
            if not line:
                sys.exit("callgrind.py: the bus printed no address; log in " + work)
            pid = bus_pid(bus.pid)
            # callgrind_control reaches only the process valgrind started:
            # below busvisor's keeper, the bus's counters cannot be zeroed,
            # so its whole run is counted (see `differential` below).
            NATIVE["control"] = pid == bus.pid
            return run(bb, a, address, pid, grind), pid
        finally:
            bus.terminate()
            bus.wait(60)

    n = a.n
    result, pid = once(n, out)
    differential = grind and not NATIVE["control"]
    total = None
    if differential:
        # The bus's totals at exit for N and for 2N units: start-up and
        # warm-up are the same in both, so the difference is N units.
        first = callgrind_total(out + ".%d" % pid)
        _, pid2 = once(2 * n, out + "-2n")
        total = callgrind_total(out + "-2n.%d" % pid2) - first
        if a.out:
            os.replace(out + "-2n.%d" % pid2, a.out)
    a.n = n
    unit = {"connect": "conn", "idle": "client"}.get(a.workload, "call")
    if NATIVE.get("result"):
        cpu, counts = NATIVE["result"]
        per = " ".join("%s=%.2f" % (k, v / a.n) for k, v in sorted(counts.items()) if v)
        u, s = NATIVE["split"]
        print("%s %s N=%d: %.2f us CPU per %s (user %d%%); syscalls per %s: %s" % (
            a.bus, a.workload, a.n, cpu / 1e3 / a.n, unit, 100 * u // max(1, u + s), unit, per))
    elif grind:
        if total is None:
            files = sorted(glob.glob(out + ".*"), key=os.path.getmtime)
            for f in files:
                if not f.endswith(".1"):
                    continue
                total = callgrind_total(f)
                if a.out:
                    os.replace(f, a.out)
            if total is None:
                sys.exit("callgrind.py: no dump found (%s)" % files)
        how = " (the bus's totals for 2N minus those for N)" if differential else ""
        print("%s %s N=%d: %d instructions, %.0f per %s%s" % (a.bus, a.workload, a.n, total, total / a.n, unit, how))
    else:
        print(result)


def callgrind_total(path):
    with open(path) as fh:
        for l in fh:
            if l.startswith("summary:") or l.startswith("totals:"):
                return int(l.split()[1])
    sys.exit("callgrind.py: no total in " + path)


def bus_pid(started):
    """The process that is the bus: busvisor's keeper (the started process)
    forks it and stays above it; dbus-daemon --nofork is the bus itself."""
    try:
        with open("/proc/%d/task/%d/children" % (started, started)) as f:
            kids = [int(k) for k in f.read().split()]
    except OSError:
        kids = []
    return kids[0] if len(kids) == 1 else started


NATIVE = {}
SYSCALLS = ["recvmsg", "sendmsg", "epoll_wait", "read", "write", "writev", "futex", "accept4", "close",
            "poll", "getsockopt"]


def ticks(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def cpu_ns(pid):
    total = 0
    for t in glob.glob("/proc/%d/task/*/schedstat" % pid):
        with open(t) as f:
            total += int(f.read().split()[0])
    return total


def zero(pid):
    if NATIVE.get("on"):
        ev = ["-e", "raw_syscalls:sys_enter", "-e", "page-faults", "-e", "context-switches", "-e", "cpu-migrations"] + sum((["-e", "syscalls:sys_enter_" + s] for s in SYSCALLS), [])
        NATIVE["perf"] = subprocess.Popen(["perf", "stat", "-x", ",", "-o", NATIVE["file"]] + ev + ["-p", str(pid)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3)
        NATIVE["cpu"] = cpu_ns(pid)
        NATIVE["ticks"] = ticks(pid)
        return
    if NATIVE.get("control", True):
        subprocess.run(["callgrind_control", "-z", str(pid)], check=True, stdout=subprocess.DEVNULL)


def dump(pid):
    if NATIVE.get("on"):
        cpu = cpu_ns(pid) - NATIVE["cpu"]
        u, s = ticks(pid)
        NATIVE["split"] = (u - NATIVE["ticks"][0], s - NATIVE["ticks"][1])
        NATIVE["perf"].send_signal(2)
        NATIVE["perf"].wait()
        counts = {}
        with open(NATIVE["file"]) as f:
            for l in f:
                parts = l.strip().split(",")
                if len(parts) > 2 and parts[0].replace(".", "").isdigit():
                    counts[parts[2].split(":")[-1].replace("sys_enter_", "").replace("context-switches", "cs").replace("page-faults", "pf").replace("cpu-migrations", "migr")] = int(float(parts[0]))
        NATIVE["result"] = (cpu, counts)
        return
    if NATIVE.get("control", True):
        subprocess.run(["callgrind_control", "-d", str(pid)], check=True, stdout=subprocess.DEVNULL)


def run(bb, a, address, pid, grind):
    env = dict(os.environ, DBUS_SESSION_BUS_ADDRESS=address)
    if a.workload in ("payload4k", "pipelined", "rtt"):
        echo = subprocess.Popen(["dbus-test-tool", "echo", "--name=com.example.Echo"], env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        try:
            c = bb.Conn(address)
            deadline = time.monotonic() + 60
            while not c.name_has_owner("com.example.Echo"):
                if time.monotonic() > deadline:
                    sys.exit("echo did not appear")
                time.sleep(0.05)
            c.close()
            extra = ["--bytes", "--stdin"] if a.workload == "payload4k" else []
            data = b"x" * 4096 if a.workload == "payload4k" else None

            def spam(n):
                p = subprocess.Popen(["dbus-test-tool", "spam", "--dest=com.example.Echo", "--count=%d" % n,
                                      "--queue=%d" % (1 if a.workload == "rtt" else 64)] + extra, env=env, stdout=subprocess.DEVNULL,
                                     stdin=subprocess.PIPE if data else subprocess.DEVNULL)
                if data:
                    p.stdin.write(data)
                    p.stdin.close()
                if p.wait() != 0:
                    sys.exit("spam failed")
            spam(200)
            zero(pid)
            spam(a.n)
            dump(pid)
        finally:
            echo.terminate()
            echo.wait()
    elif a.workload == "driver":
        c = bb.Conn(address)
        body = bb.body_s(c.unique)

        def calls(n):
            for _ in range(n):
                if c.bus_call("GetNameOwner", "s", body)[0] != 2:
                    sys.exit("GetNameOwner failed")
        calls(200)
        zero(pid)
        calls(a.n)
        dump(pid)
        c.close()
    elif a.workload == "connect":
        for _ in range(20):
            bb.Conn(address).close()
        time.sleep(0.5)
        zero(pid)
        for _ in range(a.n):
            bb.Conn(address).close()
        time.sleep(0.5)
        dump(pid)
    else:
        time.sleep(0.5)
        before = rss_kib(pid)
        anon_before = rss_kib(pid, "RssAnon:")
        conns = [bb.Conn(address) for _ in range(a.n)]
        for c in conns:
            s = c.next_serial()
            c.send(bb.build_msg(1, s, "/org/freedesktop/DBus", "org.freedesktop.DBus", "AddMatch",
                                "org.freedesktop.DBus", "s", bb.body_s("type='signal',member='Nope%d'" % s)))
            c.wait_reply(s)
        time.sleep(0.5)
        loaded = rss_kib(pid)
        for c in conns:
            c.close()
        # busvisor trims its heap a second after a mass disconnect.
        time.sleep(2.5)
        after = rss_kib(pid)
        anon_after = rss_kib(pid, "RssAnon:")
        return ("%s idle N=%d: RSS idle %d KiB, with clients %d KiB (%.2f KiB/client), after %d KiB (%+.1f%%); "
                "anonymous %d -> %d KiB") % (
            a.bus, a.n, before, loaded, (loaded - before) / a.n, after, (after - before) * 100.0 / before,
            anon_before, anon_after)


if __name__ == "__main__":
    main()
