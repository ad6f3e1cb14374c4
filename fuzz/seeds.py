#!/usr/bin/env python3
"""Make the seed corpora of the fuzz targets (docs/FUZZING.md) from real inputs.

Runs a private dbus-daemon, puts a recording relay in front of it, drives it
with real clients (dbus-send, gdbus, busctl, dbus-monitor, and zbus through
`busvisor` if given), and keeps what each client sent: the SASL exchange up
to BEGIN for `sasl`, each message for `message_reader`, and the arguments of
AddMatch/BecomeMonitor for `match_rule`. The file targets are seeded from the
machine's and the tests' files. Seeds land in OUT/<target>/, named by content.

usage: fuzz/seeds.py OUT [BUSVISOR_BINARY]
"""

import glob
import hashlib
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DBUS_DATA = "/usr/lib/dbus-1.0/installed-tests/dbus/data"


def save(out, target, data):
    d = os.path.join(out, target)
    os.makedirs(d, exist_ok=True)
    name = hashlib.sha1(data).hexdigest()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def relay(listen_path, bus_path, record):
    """Accept clients on listen_path, relay to bus_path, record what each sends."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(listen_path)
    srv.listen(16)

    def pump(src, dst, log):
        try:
            while True:
                b = src.recv(65536)
                if not b:
                    break
                if log is not None:
                    log.extend(b)
                dst.sendall(b)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def serve():
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            b = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            b.connect(bus_path)
            log = bytearray()
            record.append(log)
            threading.Thread(target=pump, args=(c, b, log), daemon=True).start()
            threading.Thread(target=pump, args=(b, c, None), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return srv


def messages(stream):
    """Split a client's post-BEGIN bytes into messages."""
    out = []
    i = 0
    while i + 16 <= len(stream):
        endian = "<" if stream[i : i + 1] == b"l" else ">"
        body_len, _serial, fields_len = struct.unpack(endian + "III", stream[i + 4 : i + 16])
        header_end = 16 + fields_len
        header_end += (8 - header_end % 8) % 8
        end = i + header_end + body_len
        if end > len(stream):
            break
        out.append(bytes(stream[i:end]))
        i = end
    return out


def match_args(msg):
    """String arguments of AddMatch calls, and the rules of BecomeMonitor."""
    rules = []
    if b"AddMatch" in msg or b"BecomeMonitor" in msg:
        # Strings in the body: length-prefixed, NUL-terminated, match-rule-like.
        for m in re.finditer(rb"[\x20-\x7e]{4,}", msg):
            s = m.group(0)
            if b"=" in s and b"'" in s or s.startswith(b"type="):
                rules.append(s)
    return rules


def capture(out, busvisor):
    tmp = tempfile.mkdtemp(prefix="busvisor-seeds-")
    bus_path = os.path.join(tmp, "bus")
    conf = os.path.join(tmp, "bus.conf")
    with open(conf, "w") as f:
        f.write(
            "<busconfig><type>session</type>"
            f"<listen>unix:path={bus_path}</listen>"
            "<policy context='default'><allow send_destination='*' eavesdrop='true'/>"
            "<allow eavesdrop='true'/><allow own='*'/></policy></busconfig>"
        )
    daemon = subprocess.Popen(["dbus-daemon", "--nofork", f"--config-file={conf}"])
    try:
        for _ in range(100):
            if os.path.exists(bus_path):
                break
            time.sleep(0.05)
        relay_path = os.path.join(tmp, "relay")
        record = []
        srv = relay(relay_path, bus_path, record)
        addr = f"unix:path={relay_path}"
        env = dict(os.environ, DBUS_SESSION_BUS_ADDRESS=addr)
        bus = ("org.freedesktop.DBus", "/org/freedesktop/DBus")
        run = [
            ["dbus-send", "--session", "--print-reply", "--dest=" + bus[0], bus[1],
             "org.freedesktop.DBus.ListNames"],
            ["dbus-send", "--session", "--print-reply", "--dest=" + bus[0], bus[1],
             "org.freedesktop.DBus.GetNameOwner", "string:org.freedesktop.DBus"],
            ["dbus-send", "--session", "--type=signal", "/a/b", "org.example.I.Sig",
             "string:x", "int32:-7", "array:string:a,b", "dict:string:int32:k,1",
             "variant:boolean:true", "objpath:/p", "double:1.5", "byte:3", "uint64:9"],
            ["dbus-send", "--session", "--print-reply", "--dest=" + bus[0], bus[1],
             "org.freedesktop.DBus.AddMatch",
             "string:type='signal',sender='org.example.S',interface='org.example.I',"
             "member='Sig',path_namespace='/a',arg0='x',arg1path='/p/'"],
            ["dbus-send", "--session", "--print-reply", "--dest=" + bus[0], bus[1],
             "org.freedesktop.DBus.Properties.GetAll", "string:org.freedesktop.DBus"],
            ["gdbus", "call", "--session", "--dest", bus[0], "--object-path", bus[1],
             "--method", "org.freedesktop.DBus.Introspectable.Introspect"],
            ["gdbus", "call", "--session", "--dest", bus[0], "--object-path", bus[1],
             "--method", "org.freedesktop.DBus.RequestName", "org.example.Seed", "4"],
            ["gdbus", "emit", "--session", "--object-path", "/a", "--signal",
             "org.example.I.Sig", "('s', 3, [1,2], {'k': <'v'>}, <(1, 'x')>)"],
            ["busctl", "--user", f"--address={addr}", "call", bus[0], bus[1], bus[0],
             "GetConnectionCredentials", "s", "org.freedesktop.DBus"],
            ["busctl", f"--address={addr}", "call", bus[0], bus[1], bus[0],
             "ListActivatableNames"],
            ["busctl", f"--address={addr}", "emit", "/a", "org.example.I", "Sig",
             "a{sv}", "1", "k", "s", "v"],
            # Longer than the reader's 4 KiB chunk, and than its first 64 KiB
            # buffer: read straight into a buffer that grows.
            ["dbus-send", "--session", "--type=signal", "/a", "org.example.I.Big",
             "string:" + "x" * 9000],
            ["dbus-send", "--session", "--type=signal", "/a", "org.example.I.Big",
             "string:" + "y" * 70000],
        ]
        if busvisor:
            run.append([busvisor, f"--address={addr}", "list"])
        for argv in run:
            subprocess.run(argv, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=10)
        # Monitors: libdbus's eavesdropping AddMatch and BecomeMonitor.
        for argv in (["dbus-monitor", "--address", addr, "type='signal'",
                      "type='method_call',interface='org.example.I'"],
                     ["dbus-monitor", "--address", addr, "--pcap", "sender='org.example.S'"],
                     ["busctl", f"--address={addr}", "monitor", "--match",
                      "type='signal',member='Sig'"]):
            p = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
            time.sleep(0.5)
            subprocess.run(["dbus-send", "--session", "--type=signal", "/a",
                            "org.example.I.Sig", "string:x"], env=env)
            time.sleep(0.3)
            p.terminate()
            p.wait()
        time.sleep(0.3)
        srv.close()
    finally:
        daemon.terminate()
        daemon.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    for log in record:
        log = bytes(log)
        end = log.find(b"BEGIN\r\n")
        if end < 0:
            continue
        end += len(b"BEGIN\r\n")
        save(out, "sasl", log[:end])
        msgs = messages(log[end:])
        save(out, "sasl", log[: end + (len(msgs[0]) if msgs else 0)])
        for m in msgs:
            save(out, "message_reader", m)
            for r in match_args(m):
                save(out, "match_rule", r)
        if len(msgs) > 1:
            save(out, "message_reader", b"".join(msgs[:4]))


def auth_scripts(out):
    """The client lines of dbus's own SASL test scripts (server side)."""
    for path in glob.glob(f"{DBUS_DATA}/auth/*.auth-script"):
        text = open(path, encoding="utf-8", errors="replace").read()
        if not re.search(r"^SERVER", text, re.M):
            continue
        lines = re.findall(r"^SEND '(.*)'", text, re.M)
        if lines:
            # The scripts' placeholders, for a root client (as the target's peer is).
            lines = [l.replace("USERID_HEX", "30").replace("USERNAME_HEX", "726f6f74")
                     for l in lines]
            data = b"\0" + b"".join(l.encode() + b"\r\n" for l in lines)
            save(out, "sasl", data)


def rules_from_source(out):
    """Match rules quoted in the rule parser's tests (from dbus's tests and the spec)."""
    for path in [f"{REPO}/src/bus/matching/rule.rs", f"{REPO}/src/bus/matching/index.rs"]:
        text = open(path, encoding="utf-8").read()
        for m in re.finditer(r'"((?:type|sender|interface|member|path|path_namespace|'
                             r'destination|arg\d+\w*|eavesdrop)=[^"]*)"', text):
            save(out, "match_rule", m.group(1).replace("\\'", "'").encode())


def without_includes(text):
    return re.sub(r"<include(dir)?\b[^>]*?(/>|>.*?</include(dir)?>)", "", text, flags=re.S)


def files(out):
    confs = (glob.glob("/usr/share/dbus-1/*.conf") + glob.glob("/usr/share/dbus-1/system.d/*.conf")
             + glob.glob(f"{REPO}/src/config/*.conf")
             + glob.glob(f"{REPO}/tests/fixtures/**/*.conf", recursive=True)
             + glob.glob(f"{DBUS_DATA}/**/*.conf", recursive=True))
    for path in confs:
        text = open(path, encoding="utf-8", errors="replace").read()
        save(out, "xml_config", without_includes(text).encode())
    services = (glob.glob("/usr/share/dbus-1/*services/*.service")
                + glob.glob(f"{DBUS_DATA}/**/*.service", recursive=True)
                + glob.glob(f"{DBUS_DATA}/**/*.service.in", recursive=True))
    for path in services:
        save(out, "service_file", open(path, "rb").read())
    tomls = (glob.glob(f"{REPO}/services.d/*.toml") + glob.glob(f"{REPO}/tests/**/*.toml", recursive=True)
             + glob.glob(f"{REPO}/docs/**/*.toml", recursive=True))
    for path in tomls:
        save(out, "toml_files", open(path, "rb").read())
    # TOML texts in the parsers' tests (raw strings).
    for path in [f"{REPO}/src/config/busvisor_toml.rs", f"{REPO}/src/activation/definition.rs"]:
        text = open(path, encoding="utf-8").read()
        for block in re.findall(r'r#"(.*?)"#', text, re.S):
            if "=" in block:
                save(out, "toml_files", block.encode())
        # Plain string literals of TOML definitions.
        for lit in re.findall(r'"((?:[^"\\\n]|\\.)*exec = \[(?:[^"\\\n]|\\.)*)"', text):
            save(out, "toml_files", lit.encode().decode("unicode_escape").encode())
        # ```toml blocks in doc comments.
        for block in re.findall(r"//! ```toml\n(.*?)//! ```", text, re.S):
            save(out, "toml_files", re.sub(r"(?m)^//! ?", "", block).encode())
    # TOML examples in the docs (```toml blocks).
    for path in glob.glob(f"{REPO}/docs/*.md") + [f"{REPO}/README.md"]:
        text = open(path, encoding="utf-8").read()
        for block in re.findall(r"```toml\n(.*?)```", text, re.S):
            save(out, "toml_files", block.encode())
    for path in glob.glob(f"{DBUS_DATA}/*messages/*.message-raw"):
        save(out, "message_reader", open(path, "rb").read())


def main():
    out = sys.argv[1]
    busvisor = sys.argv[2] if len(sys.argv) > 2 else None
    capture(out, busvisor)
    auth_scripts(out)
    rules_from_source(out)
    files(out)
    for t in sorted(os.listdir(out)):
        print(t, len(os.listdir(os.path.join(out, t))))


if __name__ == "__main__":
    main()
