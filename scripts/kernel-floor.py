#!/usr/bin/env python3
"""The kernel's floor beside busvisor and dbus-daemon, per connection, per
forwarded round trip and per call to the bus, measured in one run on this
machine.

    scripts/kernel-floor.py [--busvisor BIN] [--dbus-daemon BIN] [--runs 5]

The floor is scripts/kernel-floor.c: a "bus" that makes only the system
calls every bus must make (accept, SO_PEERCRED, epoll, a read per client
line or message, a write per answer, close) and does nothing else. Whatever
a real bus spends above it is its own work; a ratio to dbus-daemon below
floor/dbus-daemon is out of any bus's reach on this machine.

Bus CPU is the sum of the bus's threads' run time from
/proc/PID/task/TID/schedstat (nanoseconds, not clock ticks), taken around
N connections (busbench.py's raw client: AUTH, BEGIN + Hello, close) and
around N calls with one in flight (dbus-test-tool spam and echo for the
buses, kernel-floor's own ping and echo for the floor: the same pattern of
one message each way per call, without the D-Bus library's work, which is
the clients' and not counted). Medians of --runs rounds.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import busbench_module  # noqa: E402

bb = busbench_module.load()


def bus_pid(pid):
    """The process doing the bus's work: below busvisor's keeper."""
    try:
        kids = open("/proc/%d/task/%d/children" % (pid, pid)).read().split()
        comm = open("/proc/%d/comm" % pid).read()
        if len(kids) == 1 and open("/proc/%s/comm" % kids[0]).read() == comm:
            return int(kids[0])
    except OSError:
        pass
    return pid


def run_ns(pid):
    total = 0
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/schedstat" % (pid, tid)) as f:
                total += int(f.read().split()[0])
        except OSError:
            pass
    return total


class Bus:
    def __init__(self, argv, workdir):
        self.dir = tempfile.mkdtemp(dir=workdir)
        self.sock = os.path.join(self.dir, "bus")
        self.address = "unix:path=" + self.sock
        argv = [a.replace("{address}", self.address).replace("{socket}", self.sock) for a in argv]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=open(os.path.join(self.dir, "err"), "wb"),
                                     stdin=subprocess.DEVNULL)
        self.proc.stdout.readline()
        deadline = time.monotonic() + 10
        while not os.path.exists(self.sock) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        self.pid = bus_pid(self.proc.pid)

    def cpu_ns(self):
        return run_ns(self.pid)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def per_connection(bus, n):
    for _ in range(200):
        bb.Conn(bus.address).close()
    time.sleep(0.2)
    t0 = bus.cpu_ns()
    for _ in range(n):
        bb.Conn(bus.address).close()
    time.sleep(0.2)  # the last disconnects
    return (bus.cpu_ns() - t0) / n / 1000


def per_call(bus, n, floor_bin):
    env = dict(os.environ, DBUS_SESSION_BUS_ADDRESS=bus.address)
    quiet = dict(stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    if floor_bin:
        echo = subprocess.Popen([floor_bin, "echo", bus.sock], **dict(quiet, stdout=subprocess.PIPE))
        echo.stdout.readline()
        ping = [floor_bin, "ping", bus.sock]
        count = lambda k: [str(k)]  # noqa: E731
    else:
        echo = subprocess.Popen([bb.DTT, "echo", "--name=com.example.Echo"], **quiet)
        c = bb.Conn(bus.address)
        while not c.name_has_owner("com.example.Echo"):
            time.sleep(0.005)
        c.close()
        ping = [bb.DTT, "spam", "--dest=com.example.Echo"]
        count = lambda k: ["--count=%d" % k]  # noqa: E731
    try:
        subprocess.run(ping + count(min(n, 2000)), check=True, **quiet)
        t0 = bus.cpu_ns()
        subprocess.run(ping + count(n), check=True, **quiet)
        return (bus.cpu_ns() - t0) / n / 1000
    finally:
        echo.terminate()
        echo.wait()


def per_bus_call(bus, n, floor_bin):
    if floor_bin:
        quiet = dict(stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run([floor_bin, "ping", bus.sock, "200"], check=True, **quiet)
        t0 = bus.cpu_ns()
        subprocess.run([floor_bin, "ping", bus.sock, str(n)], check=True, **quiet)
        return (bus.cpu_ns() - t0) / n / 1000
    c = bb.Conn(bus.address)
    body = bb.body_s(c.unique)

    def calls(k):
        for _ in range(k):
            if c.bus_call("GetNameOwner", "s", body)[0] != 2:
                raise RuntimeError("GetNameOwner failed")
    try:
        calls(200)
        t0 = bus.cpu_ns()
        calls(n)
        return (bus.cpu_ns() - t0) / n / 1000
    finally:
        c.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root = os.path.dirname(HERE)
    ap.add_argument("--busvisor", default=os.path.join(root, "target", "release", "busvisor"))
    ap.add_argument("--dbus-daemon", default="dbus-daemon")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--connections", type=int, default=2000)
    ap.add_argument("--calls", type=int, default=20000)
    o = ap.parse_args()
    work = tempfile.mkdtemp(prefix="kernel-floor.")
    try:
        floor_bin = os.path.join(work, "kernel-floor")
        subprocess.run(["gcc", "-O2", "-o", floor_bin, os.path.join(HERE, "kernel-floor.c")], check=True)
        buses = [
            ("floor", [floor_bin, "serve", "{socket}"]),
            ("busvisor", [o.busvisor, "--session", "--nofork", "--print-address", "--address={address}"]),
            ("dbus-daemon", [o.dbus_daemon, "--session", "--nofork", "--print-address", "--address={address}"]),
        ]
        rows = {"connection": {}, "call, 1 in flight": {}, "call to the bus, 1 in flight": {}}
        for r in range(o.runs):
            for name, argv in buses:
                floor = floor_bin if name == "floor" else None
                for row, measure in (("connection", lambda b: per_connection(b, o.connections)),
                                     ("call, 1 in flight", lambda b: per_call(b, o.calls, floor)),
                                     ("call to the bus, 1 in flight", lambda b: per_bus_call(b, o.calls, floor))):
                    bus = Bus(argv, work)
                    try:
                        v = measure(bus)
                    finally:
                        bus.stop()
                    rows[row].setdefault(name, []).append(v)
                    print("[run %d] %-18s %-12s %6.1f us" % (r, row, name, v), file=sys.stderr)
        med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
        print("| bus CPU per | floor | busvisor | dbus-daemon | floor/dbus-daemon | busvisor/dbus-daemon "
              "| busvisor above floor |")
        print("|---|---|---|---|---|---|---|")
        for row, v in rows.items():
            f, b, d = med(v["floor"]), med(v["busvisor"]), med(v["dbus-daemon"])
            print("| %s | %.1f µs | %.1f µs | %.1f µs | %.2f | %.2f | %.1f µs |" % (row, f, b, d, f / d, b / d, b - f))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
