#!/usr/bin/env python3
"""Soak test for busvisor: a long run of mixed traffic against the release
build, outside `cargo test`. See docs/SOAK.md.

    scripts/soak.py [--duration 600] [--clients 200] [--busvisor PATH]

Starts target/release/busvisor (or $CARGO_TARGET_DIR/release/busvisor, or
--busvisor) on a socket in a temporary directory, with a temporary services
directory holding

  org.busvisor.Soak.Crash     exits 1 a second after taking its name,
                              restart = "always" (a crash loop)
  org.busvisor.Soak.Chatty    prints --chatty-rate bytes/s (10 MB/s) to stdout
  org.busvisor.Soak.EchoN     N = 0..3, tests/fixtures/testsvc.py with
                              idle_timeout = 3s, so every activation storm
                              finds it stopped again

and runs --clients raw D-Bus clients (stdlib only, on services.d/minibus.py's
marshalling) in --workers processes for --duration seconds:

  pairs      a caller and an echo peer; the caller numbers its calls (a window
             of 4 in flight, mixed payload sizes) and checks that every reply
             comes back, in order, with its own number and payload; the peer
             checks that calls arrive in order
  senders    emit numbered Tick signals
  subscribers  match every Tick and check, per sender, that the numbers are
             1, 2, 3, ... with no gap and no reordering, up to the sender's
             last
  churners   connect, Hello, GetId, disconnect, in a loop
  stormers   every --storm-period seconds, all call EchoN (N = storm number
             mod 4) at once; the service was idle-stopped, so the storm must
             spawn it exactly once (counted by testsvc.py --record) and every
             call must be answered

The bus's RSS (VmRSS), open fds and descendant processes are sampled every
--sample seconds. At the end: counts per message type, losses and
reorderings (must be 0), RSS at start / after warm-up / at the end of the
load (end within --rss-tolerance percent of after-warm-up), fds at start /
end (end within --fd-tolerance of start once the clients are gone and the
echo services idle-stopped), processes left after the bus is stopped (must
be 0), and the bus's CPU time. Exits 1 if a check fails. Everything it
starts is stopped by PID.
"""

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "services.d"))
import minibus  # noqa: E402
from minibus import (  # noqa: E402
    METHOD_CALL, METHOD_RETURN, ERROR, SIGNAL, F_PATH, F_INTERFACE, F_MEMBER,
    F_DESTINATION, F_REPLY_SERIAL, F_SENDER, F_SIGNATURE, F_ERROR_NAME,
)

DBUS = ("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus")
IFACE = "org.busvisor.Soak"
ECHO_SERVICES = 4
PAYLOADS = (8, 64, 512, 4096, 16384)
CALL_TIMEOUT = 30.0

# --------------------------------------------------------------------------
# An asyncio D-Bus connection


def parse(data):
    big = data[0:1] == b"B"
    e = ">" if big else "<"
    mtype, flags = data[1], data[2]
    body_len, serial, fields_len = struct.unpack(e + "III", data[4:16])
    header_len = 16 + fields_len
    header_len += -header_len % 8
    r = minibus._Reader(data, big, 12)
    fields = {code: value for code, (_sig, value) in r.read("a(yv)")}
    sig = fields.get(F_SIGNATURE, "")
    r = minibus._Reader(data[header_len:], big)
    body = [r.read(t) for t in minibus.split_signature(sig)]
    return minibus.Message(mtype, flags, serial, fields, body)


class Conn:
    def __init__(self, path):
        self.path = path
        self.serial = 0
        self.pending = {}
        self.on_call = None
        self.on_signal = None
        self.closing = False
        self.lost = None  # why the connection ended unexpectedly

    async def open(self):
        self.reader, self.writer = await asyncio.open_unix_connection(self.path)
        uid_hex = str(os.getuid()).encode().hex().encode()
        self.writer.write(b"\0AUTH EXTERNAL " + uid_hex + b"\r\n")
        line = await self.reader.readuntil(b"\r\n")
        if not line.startswith(b"OK "):
            raise ConnectionError(f"auth refused: {line!r}")
        self.writer.write(b"BEGIN\r\n")
        self.task = asyncio.ensure_future(self._read_loop())
        self.unique_name = (await self.call(*DBUS, "Hello"))[0]
        return self

    async def _read_loop(self):
        try:
            while True:
                fixed = await self.reader.readexactly(16)
                e = ">" if fixed[0:1] == b"B" else "<"
                body_len, _serial, fields_len = struct.unpack(e + "III", fixed[4:16])
                header_len = 16 + fields_len
                header_len += -header_len % 8
                rest = await self.reader.readexactly(header_len - 16 + body_len)
                m = parse(fixed + rest)
                if m.type in (METHOD_RETURN, ERROR):
                    fut = self.pending.pop(m.reply_serial, None)
                    if fut is not None and not fut.done():
                        fut.set_result(m)
                elif m.type == METHOD_CALL:
                    if self.on_call:
                        self.on_call(m)
                    else:
                        self.send(ERROR, [(F_REPLY_SERIAL, "u", m.serial),
                                          (F_DESTINATION, "s", m.sender),
                                          (F_ERROR_NAME, "s", "org.freedesktop.DBus.Error.UnknownMethod")],
                                  "s", ("no",))
                elif m.type == SIGNAL and self.on_signal:
                    self.on_signal(m)
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as e:
            if not self.closing:
                self.lost = repr(e)
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError("connection closed"))
        self.pending.clear()

    def send(self, mtype, fields, sig="", args=(), flags=0):
        self.serial += 1
        self.writer.write(minibus._encode(mtype, self.serial, fields, sig, args, flags))
        return self.serial

    def call_nowait(self, dest, path, iface, member, sig="", args=()):
        """Sends a call; returns the future of its reply message."""
        serial = self.send(METHOD_CALL, [(F_PATH, "o", path), (F_INTERFACE, "s", iface),
                                         (F_MEMBER, "s", member), (F_DESTINATION, "s", dest)],
                           sig, args)
        fut = asyncio.get_event_loop().create_future()
        self.pending[serial] = fut
        return fut

    async def call(self, dest, path, iface, member, sig="", args=(), timeout=CALL_TIMEOUT):
        m = await asyncio.wait_for(self.call_nowait(dest, path, iface, member, sig, args), timeout)
        if m.type == ERROR:
            raise minibus.DBusError(m.error_name, m.body[0] if m.body else "")
        return m.body

    def reply(self, m, sig="", args=()):
        self.send(METHOD_RETURN, [(F_REPLY_SERIAL, "u", m.serial), (F_DESTINATION, "s", m.sender)],
                  sig, args)

    def signal(self, path, iface, member, sig="", args=()):
        self.send(SIGNAL, [(F_PATH, "o", path), (F_INTERFACE, "s", iface), (F_MEMBER, "s", member)],
                  sig, args)

    async def drain(self):
        await self.writer.drain()

    async def close(self):
        self.closing = True
        try:
            self.writer.close()
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass
        try:
            await asyncio.wait_for(self.task, 5)
        except (asyncio.TimeoutError, Exception):
            pass


# --------------------------------------------------------------------------
# The client roles (run in worker processes)


class Stats(dict):
    def add(self, key, n=1):
        self[key] = self.get(key, 0) + n

    def error(self, text):
        self.setdefault("errors", [])
        if len(self["errors"]) < 20:
            self["errors"].append(text)
        self.add("error_count")


async def pacer(rate, t_end):
    """Yields once per 1/rate seconds until t_end (wall clock)."""
    period = 1.0 / rate
    nxt = time.time() + random.random() * period
    while True:
        now = time.time()
        if now >= t_end:
            return
        if nxt > now:
            await asyncio.sleep(nxt - now)
        nxt += period
        if nxt < time.time() - 1:  # fell behind: do not burst to catch up
            nxt = time.time()
        yield


async def caller(conn, callee, rate, t_end, st):
    """Numbered echo calls to callee, up to 4 in flight; replies must come
    back complete and in order."""
    inflight = asyncio.Semaphore(4)
    expect = [1]
    seq = 0
    tasks = set()

    async def one(fut, n, payload):
        try:
            m = await asyncio.wait_for(fut, CALL_TIMEOUT)
        except asyncio.TimeoutError:
            st.add("call_lost")
            st.error(f"call {n} to {callee}: no reply in {CALL_TIMEOUT}s")
            return
        except ConnectionError as e:
            st.add("call_lost")
            st.error(f"call {n}: {e}")
            return
        finally:
            inflight.release()
        if m.type == ERROR:
            st.add("call_error")
            st.error(f"call {n}: {m.error_name} {m.body}")
            return
        st.add("reply_received")
        got, text = m.body
        if got != n or text != payload:
            st.add("reply_wrong")
            st.error(f"call {n}: reply for {got}")
        if got != expect[0]:
            st.add("reply_reordered")
            st.error(f"reply {got} came when {expect[0]} was expected")
        expect[0] = got + 1

    async for _ in pacer(rate, t_end):
        await inflight.acquire()
        seq += 1
        payload = "p" * PAYLOADS[seq % len(PAYLOADS)]
        fut = conn.call_nowait(callee, "/org/busvisor/Soak", IFACE, "Echo", "us", (seq, payload))
        st.add("call_sent")
        t = asyncio.ensure_future(one(fut, seq, payload))
        tasks.add(t)
        t.add_done_callback(tasks.discard)
        await conn.drain()
    if tasks:
        await asyncio.wait(tasks)


def make_callee(conn, st):
    last = {}

    def on_call(m):
        if m.member != "Echo" or m.signature != "us":
            conn.send(ERROR, [(F_REPLY_SERIAL, "u", m.serial), (F_DESTINATION, "s", m.sender),
                              (F_ERROR_NAME, "s", "org.freedesktop.DBus.Error.UnknownMethod")], "s", ("no",))
            return
        n = m.body[0]
        st.add("call_received")
        if n != last.get(m.sender, 0) + 1:
            st.add("call_reordered")
            st.error(f"callee: call {n} from {m.sender} after {last.get(m.sender, 0)}")
        last[m.sender] = n
        conn.reply(m, "us", m.body)

    conn.on_call = on_call


async def sender(conn, rate, t_end, st, out):
    seq = 0
    async for _ in pacer(rate, t_end):
        seq += 1
        conn.signal("/org/busvisor/Soak", IFACE, "Tick", "t", (seq,))
        st.add("signal_sent")
        await conn.drain()
    out[conn.unique_name] = seq


def make_subscriber(conn, st, seen):
    def on_signal(m):
        if m.interface != IFACE or m.member != "Tick":
            return
        n = m.body[0]
        st.add("signal_received")
        prev = seen.get(m.sender, 0)
        if n != prev + 1:
            st.add("signal_gap_or_reorder")
            st.error(f"subscriber {conn.unique_name}: Tick {n} from {m.sender} after {prev}")
        seen[m.sender] = max(prev, n)

    conn.on_signal = on_signal


async def churner(path, t_end, st):
    while time.time() < t_end:
        try:
            c = await asyncio.wait_for(Conn(path).open(), CALL_TIMEOUT)
            await c.call(*DBUS, "GetId")
            await c.close()
            st.add("churn_connections")
        except Exception as e:  # noqa: BLE001
            st.add("churn_failed")
            st.error(f"churn: {e!r}")
        await asyncio.sleep(0.05 + random.random() * 0.1)


async def stormer(conn, ident, schedule, st):
    for k, when in schedule:
        delay = when - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        name = f"org.busvisor.Soak.Echo{k % ECHO_SERVICES}"
        text = f"storm {k} client {ident}"
        st.add("storm_call_sent")
        try:
            body = await conn.call(name, "/org/busvisor/Test", "org.busvisor.Test", "Echo", "s", (text,))
            if body != [text]:
                st.add("storm_wrong")
                st.error(f"storm {k}: {body!r}")
            else:
                st.add("storm_answered")
        except Exception as e:  # noqa: BLE001
            st.add("storm_failed")
            st.error(f"storm {k} {name}: {e!r}")


async def worker_main(cfg, roles, barrier, shared, results):
    st = Stats()
    path = cfg["socket"]
    conns = []

    async def new():
        c = await Conn(path).open()
        conns.append(c)
        return c

    pairs = []
    for _ in range(roles["pairs"]):
        a, b = await new(), await new()
        make_callee(b, st)
        pairs.append((a, b))
    senders = [await new() for _ in range(roles["senders"])]
    seen = []
    subs = []
    for _ in range(roles["subscribers"]):
        c = await new()
        await c.call(*DBUS, "AddMatch", "s", (f"type='signal',interface='{IFACE}',member='Tick'",))
        d = {}
        make_subscriber(c, st, d)
        seen.append(d)
        subs.append(c)
    stormers = [await new() for _ in range(roles["stormers"])]
    await asyncio.get_event_loop().run_in_executor(None, barrier.wait)
    t_begin = shared.value
    t_end = t_begin + cfg["duration"]
    schedule = []
    k, when = 0, t_begin + cfg["storm_period"]
    while when < t_end - 5:
        schedule.append((k, when))
        k += 1
        when += cfg["storm_period"]
    sent_by = {}
    jobs = [caller(a, b.unique_name, cfg["call_rate"], t_end, st) for a, b in pairs]
    jobs += [sender(c, cfg["signal_rate"], t_end, st, sent_by) for c in senders]
    jobs += [churner(path, t_end, st) for _ in range(roles["churners"])]
    jobs += [stormer(c, f"{roles['index']}.{i}", schedule, st) for i, c in enumerate(stormers)]
    await asyncio.gather(*jobs)
    # Let the last signals arrive everywhere (the subscribers of other
    # workers are still reading).
    await asyncio.sleep(5)
    for c in conns:
        if c.lost:
            st.add("connection_lost")
            st.error(f"{c.unique_name} lost: {c.lost}")
    for c in conns:
        await c.close()
    st["sent_by"] = sent_by
    st["seen"] = seen
    results.put(dict(st))


def worker(cfg, roles, barrier, shared, results):
    random.seed(roles["index"])
    try:
        asyncio.run(worker_main(cfg, roles, barrier, shared, results))
    except Exception as e:  # noqa: BLE001
        import traceback
        traceback.print_exc()
        results.put({"error_count": 1, "errors": [f"worker {roles['index']} died: {e!r}"]})
        try:
            barrier.abort()
        except Exception:  # noqa: BLE001
            pass


# --------------------------------------------------------------------------
# The bus, its processes, sampling


def proc_table():
    """{pid: (ppid, starttime)} of every process."""
    t = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
        except OSError:
            continue
        rest = s[s.rindex(")") + 2:].split()
        t[int(d)] = (int(rest[1]), int(rest[19]))
    return t


def descendants(pid, table=None):
    table = table or proc_table()
    kids = {}
    for p, (pp, _st) in table.items():
        kids.setdefault(pp, []).append(p)
    out, todo = [], [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.append((k, table[k][1]))
            todo.append(k)
    return out


def sample(pid):
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    rest = s[s.rindex(")") + 2:].split()
    cpu = (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")
    threads = int(rest[17])
    return {"t": time.time(), "rss_kb": rss, "fds": fds, "cpu_s": cpu, "threads": threads,
            "descendants": len(descendants(pid))}


def write_services(d, tmp, rate):
    fx = os.path.join(ROOT, "tests", "fixtures")
    py = shutil.which("python3")
    svc = {
        "crash.toml": f'''name = "org.busvisor.Soak.Crash"
exec = ["{py}", "{fx}/soak/crash.py", "org.busvisor.Soak.Crash", "{tmp}/crash.starts", "1"]
restart = "always"
restart_delay = "200ms"
restart_delay_max = "500ms"
start_limit = {{ burst = 100, interval = "10s" }}
stop_timeout = "2s"
''',
        "chatty.toml": f'''name = "org.busvisor.Soak.Chatty"
exec = ["{py}", "{fx}/soak/chatty.py", "org.busvisor.Soak.Chatty", "{tmp}/chatty.starts", "{rate}"]
restart = "on-failure"
stop_timeout = "2s"
''',
    }
    for i in range(ECHO_SERVICES):
        svc[f"echo{i}.toml"] = f'''name = "org.busvisor.Soak.Echo{i}"
exec = ["{py}", "{fx}/testsvc.py", "org.busvisor.Soak.Echo{i}", "--record", "{tmp}/echo{i}.starts"]
idle_timeout = "3s"
stop_timeout = "2s"
'''
    for name, text in svc.items():
        with open(os.path.join(d, name), "w") as f:
            f.write(text)


LIBECHO = "org.busvisor.Soak.LibEcho"
SPAM_COUNT = 1000


def libdbus_spam(st, t_end):
    """dbus-test-tool spam (libdbus) against dbus-test-tool echo, 1000 calls
    with 8 in flight and a reconnect every 250, once a second."""
    while time.time() < t_end - 2:
        st["proc"] = p = subprocess.Popen(
            ["dbus-test-tool", "spam", "--dest=" + LIBECHO, f"--count={SPAM_COUNT}", "--queue=8",
             "--messages-per-conn=250"], env=st["env"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _out, err = p.communicate(timeout=120)
        st["runs"] += 1
        if p.returncode != 0:
            st["failed"] += 1
            print(f"soak: dbus-test-tool spam failed ({p.returncode}): {err.decode()[-300:]}", flush=True)
        else:
            st["calls"] += SPAM_COUNT
        time.sleep(1)


def count_lines(path):
    try:
        with open(path) as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def blocking_call(addr, dest, path, iface, member, sig="", args=(), tries=20):
    for i in range(tries):
        try:
            c = minibus.Connection(addr)
            try:
                return c.call(dest, path, iface, member, sig, args)
            finally:
                c.sock.close()
        except (minibus.DBusError, ConnectionError, OSError):
            if i == tries - 1:
                raise
            time.sleep(0.3)


def split_roles(clients, workers):
    # 200 clients: 45 pairs (90), 10 senders, 30 subscribers, 20 churners, 50 stormers
    n = {"pairs": round(clients * 45 / 200), "senders": round(clients * 10 / 200),
         "subscribers": round(clients * 30 / 200), "churners": round(clients * 20 / 200)}
    n["stormers"] = clients - 2 * n["pairs"] - n["senders"] - n["subscribers"] - n["churners"]
    roles = [{"index": i} for i in range(workers)]
    for key, total in n.items():
        for i in range(workers):
            roles[i][key] = total // workers + (1 if i < total % workers else 0)
    return n, roles


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=600)
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--busvisor")
    ap.add_argument("--warmup", type=float, help="default: min(60, duration/5)")
    ap.add_argument("--sample", type=float, default=4,
                    help="seconds between samples (not a multiple of the storm period, so that samples fall in storms too)")
    ap.add_argument("--call-rate", type=float, default=10, help="calls/s per caller")
    ap.add_argument("--signal-rate", type=float, default=10, help="signals/s per sender")
    ap.add_argument("--storm-period", type=float, default=5)
    ap.add_argument("--chatty-rate", type=float, default=10e6, help="bytes/s")
    ap.add_argument("--rss-tolerance", type=float, default=10, help="percent")
    ap.add_argument("--fd-tolerance", type=int, default=8)
    ap.add_argument("--no-libdbus", action="store_true", help="no dbus-test-tool spam/echo pair")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    a = ap.parse_args()
    warmup = a.warmup if a.warmup is not None else min(60, a.duration / 5)
    bv = a.busvisor or os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")),
                                    "release", "busvisor")
    if not os.access(bv, os.X_OK):
        sys.exit(f"soak: no busvisor at {bv} (cargo build --release, or --busvisor)")

    tmp = tempfile.mkdtemp(prefix="busvisor-soak.")
    svcdir = os.path.join(tmp, "services")
    os.mkdir(svcdir)
    write_services(svcdir, tmp, a.chatty_rate)
    sock = os.path.join(tmp, "bus")
    addr = f"unix:path={sock}"
    buslog = open(os.path.join(tmp, "bus.log"), "wb")
    bus = subprocess.Popen([bv, "daemon", "--services-dir", svcdir, "--address", addr, "--print-address"],
                           stdout=subprocess.PIPE, stderr=buslog, env=dict(os.environ, DBUS_SESSION_BUS_ADDRESS=addr))
    workers = []
    failures = []
    seen_procs = set()
    samples = []
    try:
        line = bus.stdout.readline().decode().strip()
        if not line:
            sys.exit("soak: the bus printed no address")
        print(f"soak: busvisor pid {bus.pid} at {line}; {a.clients} clients for {a.duration:g} s "
              f"(warm-up {warmup:g} s), tmp {tmp}", flush=True)
        s0 = sample(bus.pid)
        samples.append(dict(s0, phase="idle"))
        # The long-running services: started once, by activation.
        chatty_pid = blocking_call(addr, "org.busvisor.Soak.Chatty", "/org/busvisor/Soak", IFACE, "Pid")[0]
        blocking_call(addr, "org.busvisor.Soak.Crash", "/org/busvisor/Soak", IFACE, "Pid")
        t_crash0 = time.time()
        libdbus = None
        if shutil.which("dbus-test-tool") and not a.no_libdbus:
            env = dict(os.environ, DBUS_SESSION_BUS_ADDRESS=addr)
            libdbus = {"echo": subprocess.Popen(["dbus-test-tool", "echo", "--name=" + LIBECHO], env=env,
                                                stdout=subprocess.DEVNULL),
                       "env": env, "runs": 0, "failed": 0, "calls": 0, "proc": None}
            blocking_call(addr, LIBECHO, "/", "com.example", "Ping")
        s1 = sample(bus.pid)  # the long-running services are up, no client yet
        samples.append(dict(s1, phase="start"))

        cfg = {"socket": sock, "duration": a.duration, "call_rate": a.call_rate,
               "signal_rate": a.signal_rate, "storm_period": a.storm_period}
        totals, roles = split_roles(a.clients, a.workers)
        ctx = mp.get_context("fork")
        barrier = ctx.Barrier(a.workers + 1)
        shared = ctx.Value("d", 0.0)
        results = ctx.Queue()
        for r in roles:
            p = ctx.Process(target=worker, args=(cfg, r, barrier, shared, results))
            p.start()
            workers.append(p)
        shared.value = time.time() + 1
        barrier.wait(timeout=120)
        t_begin = shared.value
        t_end = t_begin + a.duration
        if libdbus:
            th = threading.Thread(target=libdbus_spam, args=(libdbus, t_end), daemon=True)
            th.start()
        print(f"soak: {totals} connected; load until {time.strftime('%H:%M:%S', time.localtime(t_end))}",
              flush=True)
        # Storm schedule (as the workers compute it) and cold checks.
        storms = []
        k, when = 0, t_begin + a.storm_period
        while when < t_end - 5:
            storms.append([k, when, None])
            k += 1
            when += a.storm_period
        nxt_sample = time.time()
        warm_sample = None
        si = 0
        while time.time() < t_end:
            now = time.time()
            if si < len(storms) and now >= storms[si][1] - 0.4:
                name = f"org.busvisor.Soak.Echo{storms[si][0] % ECHO_SERVICES}"
                owned = blocking_call(addr, *DBUS, "NameHasOwner", "s", (name,))[0]
                storms[si][2] = bool(owned)
                si += 1
                continue
            if now >= nxt_sample:
                s = sample(bus.pid)
                s["phase"] = "load"
                samples.append(s)
                seen_procs.update(descendants(bus.pid))
                if warm_sample is None and now - t_begin >= warmup:
                    warm_sample = s
                print(f"soak: t={now - t_begin:6.0f}s rss={s['rss_kb'] / 1024:.1f}MiB fds={s['fds']} "
                      f"procs={s['descendants']} cpu={s['cpu_s']:.1f}s", flush=True)
                nxt_sample += a.sample
                continue
            time.sleep(0.05)
        end_load = sample(bus.pid)
        end_load["phase"] = "end-of-load"
        samples.append(end_load)
        if warm_sample is None:
            warm_sample = end_load
        if libdbus:
            th.join(60)
        # Collect the workers' results.
        res = []
        deadline = time.time() + CALL_TIMEOUT + 30
        while len(res) < len(workers) and time.time() < deadline:
            try:
                res.append(results.get(timeout=1))
            except Exception:  # noqa: BLE001
                pass
        if len(res) < len(workers):
            failures.append(f"only {len(res)} of {len(workers)} workers reported")
        for p in workers:
            p.join(10)
        # The chatty service: still the first instance, and how fast it wrote.
        c_pid = blocking_call(addr, "org.busvisor.Soak.Chatty", "/org/busvisor/Soak", IFACE, "Pid")[0]
        c_written = blocking_call(addr, "org.busvisor.Soak.Chatty", "/org/busvisor/Soak", IFACE, "Written")[0]
        c_elapsed = blocking_call(addr, "org.busvisor.Soak.Chatty", "/org/busvisor/Soak", IFACE, "Elapsed")[0]
        crash_elapsed = time.time() - t_crash0
        # Quiet: the clients are gone; wait for the echo services' idle stop.
        time.sleep(8)
        quiet = sample(bus.pid)
        quiet["phase"] = "quiet"
        samples.append(quiet)
        seen_procs.update(descendants(bus.pid))
        live_before_stop = descendants(bus.pid)
    finally:
        procs = [p for p in (libdbus or {}).values() if isinstance(p, subprocess.Popen)]
        for p in procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        for p in workers:
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
                p.join(5)
        bus_cpu = None
        if bus.poll() is None:
            try:
                bus_cpu = sample(bus.pid)["cpu_s"]
                seen_procs.update(descendants(bus.pid))
            except OSError:
                pass
            bus.send_signal(signal.SIGTERM)
            try:
                bus.wait(30)
            except subprocess.TimeoutExpired:
                failures.append("the bus did not exit within 30 s of SIGTERM")
                bus.kill()
                bus.wait()
        buslog.close()
    bus_rc = bus.returncode
    # Processes left: any process ever seen under the bus that still lives
    # (same pid and start time), or anything running from the temporary dir.
    time.sleep(0.5)
    table = proc_table()
    left = sorted(p for p, stt in seen_procs if table.get(p, (None, None))[1] == stt)
    # Every service start recorded its pid; none may be left (its command
    # line names the temporary directory, which rules out a reused pid).
    for p in table:
        if p == os.getpid():
            continue
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                if tmp.encode() in f.read() and p not in left:
                    left.append(p)
        except OSError:
            pass

    # ---- figures and checks
    st = Stats()
    sent_by, seen_all = {}, []
    for r in res:
        for key, v in r.items():
            if key == "errors":
                st.setdefault("errors", []).extend(v)
            elif key == "sent_by":
                sent_by.update(v)
            elif key == "seen":
                seen_all.extend(v)
            else:
                st.add(key, v)
    sig_missing = 0
    for seen in seen_all:
        for name, n in sent_by.items():
            sig_missing += n - seen.get(name, 0)
    storm_cold = {i: 0 for i in range(ECHO_SERVICES)}
    storm_warm = 0
    for k, _when, owned in storms:
        if owned is False:
            storm_cold[k % ECHO_SERVICES] += 1
        else:
            storm_warm += 1
    spawns = {i: count_lines(f"{tmp}/echo{i}.starts") for i in range(ECHO_SERVICES)}
    crash_starts = count_lines(f"{tmp}/crash.starts")
    chatty_starts = count_lines(f"{tmp}/chatty.starts")
    n_stormers = totals["stormers"]
    g = st.get
    fig = {
        "duration_s": a.duration, "clients": a.clients, "roles": totals, "warmup_s": warmup,
        "method_calls_sent": g("call_sent", 0), "method_calls_received_by_peers": g("call_received", 0),
        "method_replies_received": g("reply_received", 0), "calls_lost": g("call_lost", 0),
        "call_errors": g("call_error", 0), "replies_wrong": g("reply_wrong", 0),
        "replies_reordered": g("reply_reordered", 0), "calls_reordered": g("call_reordered", 0),
        "signals_sent": g("signal_sent", 0),
        "signal_deliveries_expected": sum(sent_by.values()) * totals["subscribers"],
        "signal_deliveries_received": g("signal_received", 0),
        "signals_missing": sig_missing, "signal_gaps_or_reorders": g("signal_gap_or_reorder", 0),
        "churn_connections": g("churn_connections", 0), "churn_failures": g("churn_failed", 0),
        "storms": len(storms), "storms_cold": sum(storm_cold.values()), "storms_warm": storm_warm,
        "storm_calls_sent": g("storm_call_sent", 0), "storm_calls_answered": g("storm_answered", 0),
        "storm_calls_failed": g("storm_failed", 0) + g("storm_wrong", 0),
        "echo_spawns": sum(spawns.values()), "echo_spawns_per_service": spawns,
        "echo_cold_storms_per_service": storm_cold,
        "crash_starts": crash_starts, "crash_elapsed_s": round(crash_elapsed, 1),
        "chatty_starts": chatty_starts, "chatty_pid_unchanged": c_pid == chatty_pid,
        "chatty_bytes": c_written, "chatty_rate_MBps": round(c_written / c_elapsed / 1e6, 2),
        "connections_lost": g("connection_lost", 0),
        "libdbus_spam_runs": libdbus and libdbus["runs"], "libdbus_spam_calls": libdbus and libdbus["calls"],
        "libdbus_spam_failed_runs": libdbus and libdbus["failed"],
        "rss_kb": {"idle": s0["rss_kb"], "start": s1["rss_kb"], "after_warmup": warm_sample["rss_kb"],
                   "end_of_load": end_load["rss_kb"], "quiet": quiet["rss_kb"],
                   "max": max(s["rss_kb"] for s in samples)},
        "fds": {"idle": s0["fds"], "start": s1["fds"], "after_warmup": warm_sample["fds"], "end_of_load": end_load["fds"],
                "quiet": quiet["fds"], "max": max(s["fds"] for s in samples)},
        "descendants": {"max": max(s["descendants"] for s in samples), "quiet": len(live_before_stop)},
        "processes_left_after_stop": left, "bus_exit_status": bus_rc,
        "bus_cpu_s": bus_cpu, "bus_cpu_percent": round(100 * bus_cpu / (quiet["t"] - s0["t"]), 1)
        if bus_cpu is not None else None,
        "errors": st.get("errors", [])[:20], "error_count": g("error_count", 0),
    }
    # checks
    if fig["calls_lost"] or fig["call_errors"] or fig["replies_wrong"]:
        failures.append("method calls lost or wrong")
    if fig["replies_reordered"] or fig["calls_reordered"]:
        failures.append("method calls reordered")
    if fig["method_replies_received"] != fig["method_calls_sent"]:
        failures.append("replies received != calls sent")
    if fig["signals_missing"] or fig["signal_gaps_or_reorders"]:
        failures.append("signals lost or reordered")
    if fig["signal_deliveries_received"] != fig["signal_deliveries_expected"]:
        failures.append("signal deliveries != expected")
    if fig["churn_failures"]:
        failures.append("connect/disconnect failures")
    if fig["storm_calls_answered"] != len(storms) * n_stormers or fig["storm_calls_failed"]:
        failures.append("storm calls not all answered")
    if spawns != storm_cold:
        failures.append(f"spawns per service {spawns} != cold storms per service {storm_cold}")
    if crash_starts < crash_elapsed / 3:
        failures.append(f"the crash loop restarted only {crash_starts} times in {crash_elapsed:.0f} s")
    if chatty_starts != 1 or c_pid != chatty_pid:
        failures.append("the chatty service was restarted or killed")
    if fig["chatty_rate_MBps"] < 0.8 * a.chatty_rate / 1e6:
        failures.append(f"the chatty service was slowed to {fig['chatty_rate_MBps']} MB/s")
    if libdbus and (libdbus["failed"] or not libdbus["runs"]):
        failures.append("dbus-test-tool spam failed")
    if fig["connections_lost"]:
        failures.append("connections closed by the bus")
    limit = warm_sample["rss_kb"] * (1 + a.rss_tolerance / 100)
    if end_load["rss_kb"] > limit:
        failures.append(f"RSS grew: {end_load['rss_kb']} kB at the end > {limit:.0f} kB "
                        f"(after warm-up {warm_sample['rss_kb']} kB + {a.rss_tolerance:g}%)")
    if quiet["fds"] > s1["fds"] + a.fd_tolerance:
        failures.append(f"fds: {quiet['fds']} once quiet > {s1['fds']} at start + {a.fd_tolerance}")
    if left:
        failures.append(f"processes left after the bus stopped: {left}")
    if bus_rc != 0:
        failures.append(f"bus exit status {bus_rc}")
    fig["failures"] = failures
    fig["samples"] = [{k: (round(v, 2) if isinstance(v, float) else v) for k, v in s.items()} for s in samples]
    if a.json:
        with open(a.json, "w") as f:
            json.dump(fig, f, indent=1)
    show = {k: v for k, v in fig.items() if k != "samples"}
    print(json.dumps(show, indent=1))
    if left:
        for p in left:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
    if a.keep or failures:
        print(f"soak: kept {tmp} (bus.log)")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    print("soak: " + ("FAIL: " + "; ".join(failures) if failures else "PASS"), flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
