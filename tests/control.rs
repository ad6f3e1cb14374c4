//! The control commands (`busvisor list`, `status`, `start`, `stop`,
//! `restart`, `logs`, `events`, `reload`) against a real busvisor that
//! supervises a small python3 service speaking D-Bus by hand.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value as Json;
use zbus::message::Message;

/// Per CLI invocation.
const CLI_TIMEOUT: Duration = Duration::from_secs(30);

/// The test service: SASL EXTERNAL, Hello and RequestName(argv[1]) by hand,
/// a line on stdout at start and per call, an empty reply to every method
/// call; the method `Exit` makes it exit with status 3. It exits when the
/// bus closes its connection.
const ECHO_PY: &str = r#"#!/usr/bin/env python3
# A minimal D-Bus service speaking the protocol by hand: SASL EXTERNAL,
# Hello, RequestName(NAME), then an empty reply to every method call.
# Method "Exit" makes it exit with status 3 (after replying).
import os, socket, struct, sys

NAME = sys.argv[1]

def bus_path():
    addr = os.environ.get("DBUS_STARTER_ADDRESS") or os.environ["DBUS_SESSION_BUS_ADDRESS"]
    for part in addr.split(";")[0].split(":", 1)[1].split(","):
        k, _, v = part.partition("=")
        if k == "path":
            return v
    raise SystemExit("no unix:path= in " + addr)

class W:
    def __init__(self):
        self.b = bytearray()
    def pad(self, n):
        self.b += b"\0" * ((-len(self.b)) % n)
    def u32(self, v):
        self.pad(4); self.b += struct.pack("<I", v)
    def s(self, v):
        e = v.encode(); self.u32(len(e)); self.b += e + b"\0"
    def g(self, v):
        e = v.encode(); self.b.append(len(e)); self.b += e + b"\0"

def message(mtype, serial, fields, sig="", body=b"", flags=0):
    if sig:
        fields = fields + [(8, "g", sig)]
    w = W()
    w.b += b"l" + bytes([mtype, flags, 1])
    w.u32(len(body)); w.u32(serial); w.u32(0)
    for code, t, v in fields:
        w.pad(8); w.b.append(code); w.g(t)
        {"s": w.s, "o": w.s, "g": w.g, "u": w.u32}[t](v)
    struct.pack_into("<I", w.b, 12, len(w.b) - 16)
    w.pad(8)
    return bytes(w.b) + body

def read_exact(sock, n):
    b = b""
    while len(b) < n:
        c = sock.recv(n - len(b))
        if not c:
            raise SystemExit(0)
        b += c
    return b

def read_message(sock):
    fixed = read_exact(sock, 16)
    assert fixed[0:1] == b"l"
    mtype, flags = fixed[1], fixed[2]
    blen, serial, flen = struct.unpack_from("<III", fixed, 4)
    rest = read_exact(sock, flen + ((-(16 + flen)) % 8) + blen)
    buf = fixed + rest
    fields, i = {}, 16
    while i < 16 + flen:
        i += (-i) % 8
        code = buf[i]; n = buf[i + 1]; t = buf[i + 2:i + 2 + n].decode(); i += 3 + n
        if t in ("s", "o"):
            i += (-i) % 4; (ln,) = struct.unpack_from("<I", buf, i); v = buf[i + 4:i + 4 + ln].decode(); i += 5 + ln
        elif t == "g":
            ln = buf[i]; v = buf[i + 1:i + 1 + ln].decode(); i += 2 + ln
        elif t == "u":
            i += (-i) % 4; (v,) = struct.unpack_from("<I", buf, i); i += 4
        else:
            raise SystemExit("unexpected header field type " + t)
        fields[code] = v
    return mtype, flags, serial, fields

sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(bus_path())
sock.sendall(b"\0AUTH EXTERNAL " + str(os.getuid()).encode().hex().encode() + b"\r\n")
line = b""
while not line.endswith(b"\r\n"):
    line += read_exact(sock, 1)
assert line.startswith(b"OK "), line
sock.sendall(b"BEGIN\r\n")
bus = [(1, "o", "/org/freedesktop/DBus"), (2, "s", "org.freedesktop.DBus"), (6, "s", "org.freedesktop.DBus")]
sock.sendall(message(1, 1, bus + [(3, "s", "Hello")]))
body = W(); body.s(NAME); body.u32(4)
sock.sendall(message(1, 2, bus + [(3, "s", "RequestName")], "su", bytes(body.b)))
print("echo service", NAME, "up, pid", os.getpid(), flush=True)
serial = 3
while True:
    mtype, flags, mserial, fields = read_message(sock)
    if mtype != 1:
        continue
    member = fields.get(3, "")
    print("call", member, "from", fields.get(7, "?"), flush=True)
    if not flags & 1:
        sock.sendall(message(2, serial, [(5, "u", mserial), (6, "s", fields.get(7, ""))]))
        serial += 1
    if member == "Exit":
        print("exiting with status 3", file=sys.stderr, flush=True)
        sys.exit(3)
"#;

const ECHO_NAME: &str = "org.busvisor.Test.Echo";

fn python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// A busvisor with a services directory holding `echo` (bus name
/// org.busvisor.Test.Echo), `sentinel` (org.busvisor.Test.Sentinel), and
/// `broken` (exits with status 7 before taking its name). Every service
/// process seen is killed by pid at the end.
struct Env {
    bus: TestBus,
    /// Holds the services directory and the script.
    svc_dir: tempfile::TempDir,
    script: PathBuf,
    pids: std::cell::RefCell<Vec<u32>>,
}

impl Env {
    fn new() -> Env {
        let svc_dir = tempfile::Builder::new()
            .prefix("busvisor-ctl")
            .tempdir()
            .expect("tempdir");
        let script = svc_dir.path().join("echo.py");
        std::fs::write(&script, ECHO_PY).expect("write script");
        let sd = svc_dir.path().join("services.d");
        std::fs::create_dir(&sd).unwrap();
        let def = |name: &str| {
            format!(
                "name = \"{name}\"\nexec = [\"{}\", \"{}\", \"{name}\"]\nrestart = \"on-failure\"\nrestart_delay = \"100ms\"\n",
                python(),
                script.display()
            )
        };
        std::fs::write(sd.join("echo.toml"), def(ECHO_NAME)).unwrap();
        std::fs::write(sd.join("sentinel.toml"), def("org.busvisor.Test.Sentinel")).unwrap();
        std::fs::write(
            sd.join("broken.toml"),
            "name = \"org.busvisor.Test.Broken\"\n\
             exec = [\"/bin/sh\", \"-c\", \"echo broken service failing >&2; exit 7\"]\n\
             restart = \"no\"\n",
        )
        .unwrap();
        let sd_arg = format!("--services-dir={}", sd.display());
        let bus = start_bus_with_args(Some(&config_xml(&[])), &[&sd_arg]);
        Env {
            bus,
            svc_dir,
            script,
            pids: Default::default(),
        }
    }

    fn services_dir(&self) -> PathBuf {
        self.svc_dir.path().join("services.d")
    }

    /// Run `busvisor ARGS --address=BUS`.
    fn cli(&self, args: &[&str]) -> ToolOutput {
        busvisor_at(&self.bus.address, args)
    }

    #[track_caller]
    fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(out.success(), "busvisor {args:?} failed: {out:?}");
        out.stdout
    }

    #[track_caller]
    fn json(&self, args: &[&str]) -> Json {
        let text = self.cli_ok(args);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?}: bad JSON ({e}): {text}"))
    }

    /// The service's entry of `busvisor status NAME --json`, remembering
    /// the service's pids.
    #[track_caller]
    fn status(&self, name: &str) -> Json {
        let out = self.cli(&["status", name, "--json"]);
        // 0 running, 3 not running.
        assert!(matches!(out.status.code(), Some(0 | 3)), "{out:?}");
        let doc: Json = serde_json::from_str(&out.stdout).expect(&out.stdout);
        assert_eq!(doc["version"], 1, "{doc}");
        let st = doc["services"][0].clone();
        for p in st["pids"].as_array().into_iter().flatten() {
            self.pids.borrow_mut().push(p.as_u64().unwrap() as u32);
        }
        st
    }

    fn main_pid(&self, name: &str) -> u32 {
        self.status(name)["main_pid"].as_u64().expect("main_pid") as u32
    }

    /// A property read with busctl, as busctl prints it (`s "running"`).
    fn busctl_property(&self, id: &str, prop: &str) -> String {
        let addr = format!("--address={}", self.bus.address);
        let path = format!("/org/busvisor/Supervisor1/service/{id}");
        let out = run_tool(
            "busctl",
            &[
                &addr,
                "get-property",
                "org.busvisor.Supervisor1",
                &path,
                "org.busvisor.Service1",
                prop,
            ],
            OP_TIMEOUT,
        );
        out.assert_ok();
        out.stdout.trim().to_owned()
    }

    /// Spawn `busvisor ARGS --address=BUS` in the background, stdout to `file`.
    fn spawn_cli(&self, args: &[&str], file: &Path) -> ChildGuard {
        let addr = format!("--address={}", self.bus.address);
        let mut v = args.to_vec();
        v.push(&addr);
        spawn_tool(busvisor_bin(), &v, file)
    }

    /// Call a method of ECHO_NAME from this process (activating it if needed).
    fn call_echo(&self, member: &str) -> String {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let conn = connect(&self.bus.address).await;
            within_t(
                Duration::from_secs(20),
                conn.call_method(Some(ECHO_NAME), "/", Some("org.busvisor.Test"), member, &()),
            )
            .await
            .unwrap_or_else(|e| panic!("{member} on {ECHO_NAME}: {e}"));
            unique(&conn)
        })
    }

    /// Start and stop `sentinel` until its events show up in `file`: from
    /// then on, a background `busvisor events` is known to be subscribed.
    fn sync_events(&self, files: &[&Path]) {
        let seen = |f: &Path| {
            std::fs::read_to_string(f)
                .unwrap_or_default()
                .lines()
                .any(|l| l.contains("sentinel") && l.contains("stopped"))
        };
        for _ in 0..50 {
            self.cli_ok(&["start", "sentinel"]);
            self.cli_ok(&["stop", "sentinel"]);
            if wait_until(Duration::from_millis(500), || files.iter().all(|f| seen(f))) {
                return;
            }
        }
        panic!("busvisor events never printed the sentinel's events");
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // Kill every service process seen, by pid, if it is still ours.
        for pid in self.pids.borrow().iter() {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let script = self.script.to_string_lossy();
            if String::from_utf8_lossy(&cmdline).contains(&*script) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(*pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

fn skip() -> bool {
    // The control API is busvisor's own: nothing to compare with dbus-daemon.
    is_reference()
}

fn parse_lines(text: &str) -> Vec<Json> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line ({e}): {l}")))
        .collect()
}

#[test]
fn list_shows_services_and_states() {
    if skip() {
        return;
    }
    let env = Env::new();
    let out = env.cli_ok(&["list"]);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("SERVICE "), "{out}");
    for h in ["STATE", "PID", "NAMES", "REASON"] {
        assert!(lines[0].contains(h), "{out}");
    }
    let echo = lines.iter().find(|l| l.starts_with("echo ")).expect(&out);
    assert!(
        echo.contains("inactive") && echo.contains(ECHO_NAME),
        "{out}"
    );
    // Aligned: the STATE column starts at the same place on every line.
    let col = lines[0].find("STATE").unwrap();
    let n = lines.len();
    assert_eq!(lines[n - 2], "", "{out}");
    assert_eq!(lines[n - 1], "3 services listed.", "{out}");
    for l in &lines[1..n - 2] {
        let state = &l[col..];
        assert!(
            ["inactive", "running", "activating", "failed"]
                .iter()
                .any(|s| state.starts_with(s)),
            "misaligned: {l:?} in\n{out}"
        );
    }
    // No colour when stdout is not a terminal.
    assert!(!out.contains('\x1b'), "{out:?}");

    env.cli_ok(&["start", "echo"]);
    let pid = env.main_pid("echo");
    let out = env.cli_ok(&["list"]);
    let echo = out.lines().find(|l| l.starts_with("echo ")).expect(&out);
    assert!(echo.contains("running"), "{out}");
    assert!(echo.contains(&pid.to_string()), "{out}");

    let j = env.json(&["list", "--json"]);
    assert_eq!(j["version"], 1);
    let arr = j["services"].as_array().expect("array");
    let ids: Vec<&str> = arr.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["broken", "echo", "sentinel"], "{j}");
    let e = &arr[1];
    assert_eq!(e["state"], "running");
    assert_eq!(e["main_pid"], pid);
    assert_eq!(e["names"], serde_json::json!([ECHO_NAME]));
    assert_eq!(e["path"], "/org/busvisor/Supervisor1/service/echo");
    assert!(e["reason"].is_string());
}

#[test]
fn start_stop_restart_change_the_state() {
    if skip() {
        return;
    }
    let env = Env::new();
    assert_eq!(env.status("echo")["state"], "inactive");
    assert_eq!(env.busctl_property("echo", "State"), "s \"inactive\"");

    // start, by id
    let out = env.cli_ok(&["start", "echo"]);
    let st = env.status("echo");
    assert_eq!(st["state"], "running", "{st}");
    let pid1 = st["main_pid"].as_u64().unwrap();
    assert!(pid1 > 0);
    assert_eq!(
        out.trim(),
        format!("started echo: running, main pid {pid1}")
    );
    assert_eq!(env.busctl_property("echo", "State"), "s \"running\"");
    assert_eq!(env.busctl_property("echo", "MainPID"), format!("u {pid1}"));

    // start again: still the same process
    env.cli_ok(&["start", ECHO_NAME]);
    assert_eq!(env.main_pid("echo") as u64, pid1);

    // restart, by bus name: a new process
    let j = env.json(&["restart", ECHO_NAME, "--json"]);
    let j = &j["services"][0];
    assert_eq!(j["id"], "echo");
    assert_eq!(j["state"], "running");
    let pid2 = j["main_pid"].as_u64().unwrap();
    assert!(pid2 != 0 && pid2 != pid1, "{j}");
    assert_eq!(env.main_pid("echo") as u64, pid2);
    assert_eq!(env.busctl_property("echo", "MainPID"), format!("u {pid2}"));
    // the first process is gone
    assert!(
        !Path::new(&format!("/proc/{pid1}")).exists() || {
            let s = std::fs::read_to_string(format!("/proc/{pid1}/stat")).unwrap_or_default();
            s.contains(") Z ")
        }
    );

    // stop
    let out = env.cli_ok(&["stop", "echo"]);
    assert_eq!(out.trim(), "stopped echo: inactive");
    let st = env.status("echo");
    assert_eq!(st["state"], "inactive", "{st}");
    assert_eq!(st["main_pid"], Json::Null);
    assert_eq!(st["pids"], serde_json::json!([]));
    assert_eq!(env.busctl_property("echo", "State"), "s \"inactive\"");
    let j = env.json(&["stop", "echo", "--json"]);
    assert_eq!(j["services"][0]["state"], "inactive");
}

#[test]
fn show_lists_every_property_and_status_sums_up() {
    if skip() {
        return;
    }
    let env = Env::new();
    env.cli_ok(&["start", "echo"]);
    let pid = env.main_pid("echo");
    let props = [
        "Id",
        "Names",
        "DefinitionFile",
        "ExecPath",
        "State",
        "Reason",
        "MainPID",
        "PIDs",
        "Requester",
        "RequesterPID",
        "StartTime",
        "StateChangeTime",
        "Restarts",
        "LastExitPID",
        "LastExitStatus",
        "LastExitSignal",
        "LastExitTime",
        "NextRestartTime",
        "IdleTimeout",
        "Source",
        "Enabled",
        "DefinitionError",
        "LastFailure",
        "LastFailureTime",
    ];
    // show: every property as KEY=VALUE, in the API's order.
    let text = env.cli_ok(&["show", ECHO_NAME]);
    let keys: Vec<&str> = text.lines().map(|l| l.split('=').next().unwrap()).collect();
    assert_eq!(keys, props, "{text}");
    assert!(text.contains(&format!("\nMainPID={pid}\n")), "{text}");
    assert!(text.contains("\nState=running\n"), "{text}");
    assert!(text.contains("\nSource=busvisor\n"), "{text}");
    let v = env.cli_ok(&["show", "echo", "-p", "MainPID", "--value"]);
    assert_eq!(v, format!("{pid}\n"));
    // Either spelling of a property; JSON in the one dialect.
    let j = env.json(&["show", "echo", "-p", "main_pid,State,StartTime", "--json"]);
    assert_eq!(j["main_pid"], pid, "{j}");
    assert_eq!(j["state"], "running", "{j}");
    assert!(j["start_time"].as_str().unwrap().contains('T'), "{j}");
    let out = env.cli(&["show", "echo", "-p", "Nope"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("no such property: Nope"), "{out:?}");

    let st = env.status(ECHO_NAME);
    assert_eq!(st["id"], "echo");
    assert_eq!(st["pids"], serde_json::json!([pid]));
    assert!(
        st["exec_path"].as_str().unwrap().ends_with("python3"),
        "{st}"
    );
    assert!(
        st["definition_file"]
            .as_str()
            .unwrap()
            .ends_with("services.d/echo.toml"),
        "{st}"
    );
    assert_eq!(st["processes"][0]["pid"], pid, "{st}");
    assert!(
        st["processes"][0]["command"]
            .as_str()
            .unwrap()
            .contains("echo.py"),
        "{st}"
    );

    // Crash it: the exit and the failure are described in words, and
    // survive the restart.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || {
            let s = env.status("echo");
            s["state"] == "running" && s["main_pid"] != pid && !s["main_pid"].is_null()
        }),
        "not restarted: {}",
        env.status("echo")
    );
    let pid2 = env.main_pid("echo");
    let text = env.cli_ok(&["status", "echo"]);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], format!("● echo - {ECHO_NAME}"), "{text}");
    let field = |k: &str| {
        lines
            .iter()
            .find_map(|l| l.trim_start().strip_prefix(&format!("{k}: ")))
            .unwrap_or_else(|| panic!("no {k} in\n{text}"))
    };
    assert!(
        field("Loaded").ends_with("echo.toml (busvisor definition; enabled)"),
        "{text}"
    );
    assert!(field("Active").starts_with("running since "), "{text}");
    assert!(field("Active").ends_with(" ago"), "{text}");
    assert!(
        field("Main PID").starts_with(&format!("{pid2} (")),
        "{text}"
    );
    assert!(field("Main PID").contains("echo.py"), "{text}");
    assert_eq!(field("Restarts"), "1");
    assert!(
        field("Last exit").starts_with(&format!("{pid} killed by SIGKILL, ")),
        "{text}"
    );
    assert!(
        field("Last failure").starts_with(&format!("main process {pid} killed by signal 9")),
        "{text}"
    );
    // The labels end in one column.
    let col = lines[1].find(": ").unwrap();
    for l in lines.iter().skip(1).take_while(|l| !l.is_empty()) {
        if !l.trim_start().starts_with(['├', '└']) {
            assert_eq!(l.find(": "), Some(col), "{l:?}\n{text}");
        }
    }
    // The last log lines close it.
    assert!(
        lines.last().unwrap().contains(&format!("echo[{pid2}]")),
        "{text}"
    );
    assert!(!text.contains('\x1b'));
}

#[test]
fn logs_return_what_the_service_printed() {
    if skip() {
        return;
    }
    let env = Env::new();
    env.cli_ok(&["start", "echo"]);
    let pid = env.main_pid("echo");
    env.call_echo("Hello1");
    let want = format!("echo service {ECHO_NAME} up, pid {pid}");
    assert!(
        wait_until(OP_TIMEOUT, || env
            .cli_ok(&["logs", "echo"])
            .contains("call Hello1")),
        "{}",
        env.cli_ok(&["logs", "echo"])
    );
    let out = env.cli_ok(&["logs", ECHO_NAME, "-o", "cat"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], want, "{out}");
    assert!(lines[1].starts_with("call Hello1 from :"), "{out}");
    let out = env.cli_ok(&["logs", "echo", "-n", "1", "-o", "cat"]);
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.starts_with("call Hello1"), "{out}");
    let j = parse_lines(&env.cli_ok(&["logs", "echo", "--json"]));
    assert_eq!(j[0]["line"], want.as_str());
    assert_eq!(j[0]["id"], "echo");

    // -f: the backlog, then new lines as they come.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("follow");
    let mut follow = env.spawn_cli(&["logs", "echo", "-f", "-n", "1", "-o", "cat"], &f);
    let read = || std::fs::read_to_string(&f).unwrap_or_default();
    assert!(
        wait_until(OP_TIMEOUT, || read().contains("call Hello1")),
        "{}",
        read()
    );
    // Nothing is lost between the backlog and the stream: lines printed
    // while `logs -f` runs show up, in order, exactly once.
    for i in 2..6 {
        env.call_echo(&format!("Hello{i}"));
    }
    assert!(
        wait_until(OP_TIMEOUT, || read().contains("call Hello5")),
        "{}",
        read()
    );
    let text = read();
    let calls: Vec<&str> = text
        .lines()
        .map(|l| l.split(' ').nth(1).unwrap_or(""))
        .collect();
    assert_eq!(
        calls,
        ["Hello1", "Hello2", "Hello3", "Hello4", "Hello5"],
        "{text}"
    );
    assert!(follow.is_running());
    follow.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(follow.wait_timeout(OP_TIMEOUT).is_some());
}

#[test]
fn events_follow_a_full_lifecycle() {
    if skip() {
        return;
    }
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let jf = dir.path().join("events.json");
    let hf = dir.path().join("events.txt");
    let mut ev_json = env.spawn_cli(&["events", "--json"], &jf);
    let mut ev_human = env.spawn_cli(&["events"], &hf);
    env.sync_events(&[&jf, &hf]);

    // Activation by a client's call.
    let requester = env.call_echo("Ping");
    let pid1 = env.main_pid("echo");
    // A crash, and the automatic restart.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid1 as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || {
            let s = env.status("echo");
            s["state"] == "running" && s["main_pid"] != pid1 && !s["main_pid"].is_null()
        }),
        "not restarted"
    );
    let pid2 = env.main_pid("echo");
    // An explicit stop.
    env.cli_ok(&["stop", "echo"]);
    let done = |f: &Path| {
        std::fs::read_to_string(f)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("echo") && l.contains("stopped"))
            .count()
            >= 2
    };
    assert!(
        wait_until(OP_TIMEOUT, || done(&jf) && done(&hf)),
        "events missing:\n{}\n{}",
        std::fs::read_to_string(&jf).unwrap_or_default(),
        std::fs::read_to_string(&hf).unwrap_or_default()
    );
    assert!(ev_json.is_running() && ev_human.is_running());
    ev_json.signal(nix::sys::signal::Signal::SIGTERM);
    ev_human.signal(nix::sys::signal::Signal::SIGTERM);
    ev_json.wait_timeout(OP_TIMEOUT);
    ev_human.wait_timeout(OP_TIMEOUT);

    let all = parse_lines(&std::fs::read_to_string(&jf).unwrap());
    // One serial per event, increasing by one: nothing was missed.
    let serials: Vec<u64> = all.iter().map(|e| e["serial"].as_u64().unwrap()).collect();
    for w in serials.windows(2) {
        assert_eq!(w[1], w[0] + 1, "serials {serials:?}");
    }
    for e in &all {
        assert!(e["time"].as_str().unwrap().contains('T'), "{e}");
    }
    let echo: Vec<&Json> = all.iter().filter(|e| e["id"] == "echo").collect();
    let kinds: Vec<&str> = echo.iter().map(|e| e["event"].as_str().unwrap()).collect();
    // The expected lifecycle, in order (other events may come between).
    let expected = [
        "activation-requested",
        "started",
        "ready",
        "exited",
        "restarting",
        "started",
        "ready",
        "stopping",
        "exited",
        "stopped",
    ];
    let mut at = Vec::new();
    let mut i = 0;
    for want in expected {
        while i < kinds.len() && kinds[i] != want {
            i += 1;
        }
        assert!(i < kinds.len(), "{want} missing after {at:?} in {kinds:?}");
        at.push(i);
        i += 1;
    }
    let ev = |n: usize| echo[at[n]];
    assert_eq!(ev(0)["requester"], requester.as_str());
    assert_eq!(ev(0)["requester_pid"], std::process::id());
    assert_eq!(ev(1)["pid"], pid1);
    assert_eq!(ev(2)["main_pid"], pid1);
    assert_eq!(ev(3)["pid"], pid1);
    assert_eq!(ev(3)["how"], "killed");
    assert_eq!(ev(3)["status"], 9);
    assert_eq!(ev(3)["failure"], true);
    assert_eq!(ev(4)["attempt"], 1);
    assert!(ev(4)["delay_ms"].as_u64().is_some());
    assert_eq!(ev(5)["pid"], pid2);
    assert_eq!(ev(6)["main_pid"], pid2);
    assert_eq!(ev(8)["pid"], pid2);
    assert_eq!(ev(8)["how"], "killed");
    assert_eq!(ev(8)["status"], 15);

    // The human form: `YYYY-MM-DD HH:MM:SS.mmm ZONE  #SERIAL  ID  EVENT
    // key=value...` in aligned columns, the same events with the same
    // serials.
    let text = std::fs::read_to_string(&hf).unwrap();
    assert!(!text.contains('\x1b'));
    // The two commands subscribed at slightly different times: compare
    // the events both saw, by serial; the human one missed none either.
    let mut human_serials = Vec::new();
    let first = serials[0];
    let mut compared = 0;
    let event_col = text.lines().next().and_then(|l| l.find(" #")).unwrap();
    for l in text.lines() {
        let w: Vec<&str> = l.split_whitespace().collect();
        assert!(w.len() >= 6, "{l:?}");
        let (d, t) = (w[0].as_bytes(), w[1].as_bytes());
        assert!(d.len() == 10 && d[4] == b'-' && d[7] == b'-', "{l:?}");
        assert!(
            t.len() == 12 && t[2] == b':' && t[5] == b':' && t[8] == b'.',
            "{l:?}"
        );
        assert!(!w[2].is_empty() && !w[2].starts_with('#'), "no zone: {l:?}");
        // Aligned: the serial column starts at the same place everywhere.
        assert_eq!(l.find(" #"), Some(event_col), "{l:?}\n{text}");
        let serial: u64 = w[3]
            .strip_prefix('#')
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no serial in {l:?}"));
        human_serials.push(serial);
        if serial >= first {
            let e = &all[(serial - first) as usize];
            assert_eq!(e["serial"], serial);
            assert_eq!(w[4], e["id"].as_str().unwrap(), "{l:?}");
            assert_eq!(w[5], e["event"].as_str().unwrap(), "{l:?}");
            compared += 1;
        }
    }
    assert!(compared > 0, "{text}");
    assert_eq!(human_serials.last(), serials.last(), "{text}");
    for w in human_serials.windows(2) {
        assert_eq!(w[1], w[0] + 1, "{text}");
    }
    let words = |l: &str| l.split_whitespace().skip(4).collect::<Vec<_>>().join(" ");
    let ready = format!("echo ready main_pid={pid1}");
    assert!(text.lines().any(|l| words(l) == ready), "{text}");
    let crash = format!("echo exited pid={pid1} signal=SIGKILL failure=true");
    assert!(text.lines().any(|l| words(l) == crash), "{text}");
    assert!(
        text.lines()
            .any(|l| words(l).starts_with("echo restarting attempt=1 delay=")),
        "{text}"
    );
}

#[test]
fn events_can_follow_one_service_and_its_output() {
    if skip() {
        return;
    }
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("events.json");
    let mut ev = env.spawn_cli(&["events", "--json", "--logs", "--service", ECHO_NAME], &f);
    let read = || std::fs::read_to_string(&f).unwrap_or_default();
    // Subscribed once echo's own events show.
    assert!(
        wait_until(Duration::from_secs(20), || {
            env.cli_ok(&["restart", "echo"]);
            wait_until(Duration::from_millis(500), || read().contains("\"ready\""))
        }),
        "{}",
        read()
    );
    env.cli_ok(&["start", "sentinel"]);
    env.call_echo("LogMe");
    assert!(
        wait_until(OP_TIMEOUT, || read().contains("call LogMe")),
        "{}",
        read()
    );
    ev.signal(nix::sys::signal::Signal::SIGTERM);
    ev.wait_timeout(OP_TIMEOUT);
    let all = parse_lines(&read());
    assert!(all.iter().all(|e| e["id"] == "echo"), "{all:?}");
    let log = all
        .iter()
        .find(|e| e["event"] == "log" && e["line"].as_str().unwrap().starts_with("call LogMe"))
        .expect("a log event");
    assert!(log["serial"].is_null());
    let pid = env.main_pid("echo");
    assert_eq!(log["pid"], pid, "{log}");
}

#[test]
fn reload_rereads_the_definitions() {
    if skip() {
        return;
    }
    let env = Env::new();
    std::fs::write(
        env.services_dir().join("extra.toml"),
        "name = \"org.busvisor.Test.Extra\"\nexec = [\"/bin/true\"]\n",
    )
    .unwrap();
    let out = env.cli_ok(&["reload"]);
    assert!(out.starts_with("reloaded: "), "{out}");
    let j = env.json(&["reload", "--json"]);
    assert!(
        j["services"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["id"] == "extra"),
        "{j}"
    );
    assert_eq!(
        (j["defined"].as_u64(), j["skipped"].as_u64()),
        (Some(4), Some(0))
    );
    assert!(
        env.cli_ok(&["list"])
            .lines()
            .any(|l| l.starts_with("extra "))
    );
}

#[test]
fn errors_name_the_cause_and_exit_non_zero() {
    if skip() {
        return;
    }
    let env = Env::new();
    for cmd in [
        "status", "start", "stop", "restart", "logs", "show", "cat", "kill",
    ] {
        let out = env.cli(&[cmd, "nope"]);
        // As systemctl: 4 when status has no such service.
        let code = if cmd == "status" { 4 } else { 1 };
        assert_eq!(out.status.code(), Some(code), "{cmd}: {out:?}");
        assert_eq!(
            out.stderr.trim(),
            "busvisor: no such service: nope",
            "{cmd}: {out:?}"
        );
        assert!(out.stdout.is_empty(), "{out:?}");
    }
    // A failed start carries the bus's message.
    let out = env.cli(&["start", "broken"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        out.stderr.starts_with("busvisor: cannot start broken: "),
        "{out:?}"
    );
    assert!(out.stderr.contains('7'), "no exit status in {out:?}");
    // The service's own output explains more.
    assert!(
        env.cli_ok(&["logs", "broken"])
            .contains("broken service failing")
    );

    // No address at all, and no user bus to fall back on.
    let out = Command::new(busvisor_bin())
        .arg("list")
        .env_remove("DBUS_SESSION_BUS_ADDRESS")
        .env_remove("XDG_RUNTIME_DIR")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "busvisor: no bus address: DBUS_SESSION_BUS_ADDRESS and XDG_RUNTIME_DIR are not set \
         (pass --address ADDRESS, or set DBUS_SESSION_BUS_ADDRESS)"
    );
    // Nobody listening.
    let out = run_tool(
        busvisor_bin(),
        &["list", "--address=unix:path=/nonexistent/busvisor-test"],
        CLI_TIMEOUT,
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        out.stderr.starts_with(
            "busvisor: cannot connect to the bus at unix:path=/nonexistent/busvisor-test: "
        ),
        "{out:?}"
    );
    // Usage errors are clap's: exit 2.
    let out = env.cli(&["status"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = env.cli(&["logs", "echo", "-n", "many"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[test]
fn address_from_the_environment_or_before_the_command() {
    if skip() {
        return;
    }
    let env = Env::new();
    let out = run_tool_env(
        busvisor_bin(),
        &["list", "--json"],
        &[("DBUS_SESSION_BUS_ADDRESS", &env.bus.address)],
        CLI_TIMEOUT,
    );
    out.assert_ok();
    let j: Json = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(j["services"].as_array().unwrap().len(), 3);
    // `busvisor --address=A status NAME`, as the README writes it.
    let addr = format!("--address={}", env.bus.address);
    let out = run_tool(
        busvisor_bin(),
        &[&addr, "--json", "status", "echo"],
        CLI_TIMEOUT,
    );
    assert_eq!(out.status.code(), Some(3), "not running: {out:?}");
    let j: Json = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(j["services"][0]["id"], "echo");
}

#[test]
fn events_and_logs_end_when_the_bus_goes_away() {
    if skip() {
        return;
    }
    let env = Env::new();
    env.cli_ok(&["start", "echo"]);
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("events");
    let mut ev = env.spawn_cli(&["events"], &f);
    let mut logs = env.spawn_cli(&["logs", "echo", "-f"], &dir.path().join("logs"));
    env.sync_events(&[&f]);
    env.bus.proc.signal(nix::sys::signal::Signal::SIGTERM);
    for (what, child) in [("events", &mut ev), ("logs -f", &mut logs)] {
        let st = child.wait_timeout(OP_TIMEOUT);
        assert_eq!(st.and_then(|s| s.code()), Some(1), "{what}: {st:?}");
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.child.stderr.take().unwrap(), &mut err).unwrap();
        assert!(
            err.starts_with("busvisor: the bus at ") && err.contains("closed the connection"),
            "{what}: {err:?}"
        );
    }
}

/// The unique name of the connection of process `pid`.
async fn unique_name_of(conn: &zbus::Connection, pid: u32) -> Option<String> {
    let names: Vec<String> = bus_ok(conn, "ListNames", &()).await;
    for n in names.into_iter().filter(|n| n.starts_with(':')) {
        let r = bus_call(conn, "GetConnectionUnixProcessID", &(n.as_str(),)).await;
        if r.is_ok_and(|m| m.body().deserialize::<u32>().ok() == Some(pid)) {
            return Some(n);
        }
    }
    None
}

/// `busvisor events` and `logs -f` believe only the supervisor: a client
/// that sends them lifecycle signals or log lines of its own, addressed to
/// them or broadcast, is not shown.
#[test]
fn events_and_logs_ignore_forged_signals() {
    if skip() {
        return;
    }
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let ef = dir.path().join("events.txt");
    let lf = dir.path().join("logs.txt");
    let mut events = env.spawn_cli(&["events", "--logs"], &ef);
    env.sync_events(&[&ef]);
    env.call_echo("Hello1");
    let mut logs = env.spawn_cli(&["logs", "echo", "-f", "-n", "1"], &lf);
    let read = |f: &Path| std::fs::read_to_string(f).unwrap_or_default();
    assert!(wait_until(OP_TIMEOUT, || read(&lf).contains("call Hello1")));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let forger = connect(&env.bus.address).await;
        let mut targets = vec![None];
        for pid in [events.pid(), logs.pid()] {
            let name = unique_name_of(&forger, pid).await;
            targets.push(Some(name.expect("the CLI's connection")));
        }
        for dest in targets {
            let sig = |member: &'static str| {
                let b = Message::signal(
                    "/org/busvisor/Supervisor1",
                    "org.busvisor.Supervisor1",
                    member,
                );
                match &dest {
                    Some(d) => b.destination(d.clone()),
                    None => b,
                }
            };
            let failed = sig("Failed")
                .build(&(999_999u64, "echo", "FORGED failure"))
                .unwrap();
            let line = sig("LogLine")
                .build(&("echo", 1u32, "FORGED line"))
                .unwrap();
            within(forger.send(&failed)).await.unwrap();
            within(forger.send(&line)).await.unwrap();
        }
        sync(&forger).await;
    });
    // What the supervisor says still shows, after the forgeries.
    env.call_echo("Hello2");
    env.cli_ok(&["start", "sentinel"]);
    env.cli_ok(&["stop", "sentinel"]);
    assert!(wait_until(OP_TIMEOUT, || read(&lf).contains("call Hello2")));
    assert!(wait_until(OP_TIMEOUT, || read(&ef).contains("call Hello2")
        && read(&ef).matches("stopped").count() >= 2));
    for (what, f) in [("events", &ef), ("logs -f", &lf)] {
        assert!(!read(f).contains("FORGED"), "{what} showed:\n{}", read(f));
    }
    for p in [&mut events, &mut logs] {
        assert!(p.is_running());
        p.signal(nix::sys::signal::Signal::SIGTERM);
        assert!(p.wait_timeout(OP_TIMEOUT).is_some());
    }
}
