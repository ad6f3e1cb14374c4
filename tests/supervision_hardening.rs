//! Supervision under bad conditions, end to end: the real busvisor binary,
//! real clients (zbus, busctl, the CLI) and real service processes
//! (tests/fixtures/testsvc.py, python3 and sh one-liners): output that is
//! not UTF-8 or has no newline, pids the kernel reuses, a /proc full of
//! processes without an environment, the start limit over time, inherited
//! descriptors, names already owned, and where a bare `exec` is looked up.
//!
//! Every process a test causes is stopped by pid at the end ([`Bus`]'s drop
//! kills busvisor, then every process carrying one of its invocation tokens).

mod common;

use common::{FIXTURES, write_def, write_testsvc};

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

const SUP: &str = "org.busvisor.Supervisor1";
const SUP_PATH: &str = "/org/busvisor/Supervisor1";

/// A busvisor serving one directory of TOML definitions.
struct Bus {
    bus: TestBus,
    dir: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Bus {
    fn new(defs: impl FnOnce(&Path)) -> Bus {
        Self::with_env(defs, &[])
    }

    /// With `cgroups`, services get cgroups wherever busvisor can make
    /// them (as root); without, the token and the tree.
    fn in_mode(cgroups: bool, defs: impl FnOnce(&Path)) -> Bus {
        let env: &[(&str, &str)] = if cgroups {
            &[]
        } else {
            &[("BUSVISOR_CGROUPS", "0")]
        };
        Self::with_env(defs, env)
    }

    fn with_env(defs: impl FnOnce(&Path), env: &[(&str, &str)]) -> Bus {
        let (bus, dir, tmp) = common::start_bus_with_services("busvisor-hard", defs, None, env);
        Bus {
            bus,
            dir,
            _tmp: tmp,
        }
    }

    fn addr(&self) -> &str {
        &self.bus.address
    }

    fn file(&self, name: &str) -> PathBuf {
        self._tmp.path().join(name)
    }

    /// Define service `id` as python3 running `source` (written beside the
    /// bus) with `args` and then services.d (for minibus), load it, and
    /// connect.
    async fn python_service(
        &self,
        id: &str,
        source: &str,
        args: &[&str],
        extra: &str,
    ) -> zbus::Connection {
        self.python_service_with("python3", id, source, args, extra)
            .await
    }

    /// The same with the given python interpreter.
    async fn python_service_with(
        &self,
        python: &str,
        id: &str,
        source: &str,
        args: &[&str],
        extra: &str,
    ) -> zbus::Connection {
        let script = self.file(&format!("{id}.py"));
        std::fs::write(&script, source).unwrap();
        let services = concat!(env!("CARGO_MANIFEST_DIR"), "/services.d");
        let mut argv = vec![python, script.to_str().unwrap()];
        argv.extend_from_slice(args);
        argv.push(services);
        // Named org.busvisor.<Id>: the name the script takes.
        write_def(
            &self.dir,
            id,
            &format!("org.busvisor.{}", capitalized(id)),
            &argv,
            extra,
        );
        let conn = connect(self.addr()).await;
        bus_call(&conn, "ReloadConfig", &()).await.unwrap();
        conn
    }

    /// Run the CLI against this bus.
    fn cli(&self, args: &[&str]) -> ToolOutput {
        let mut all = vec!["--address", self.addr()];
        all.extend_from_slice(args);
        run_tool(busvisor_bin(), &all, Duration::from_secs(30))
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        kill_bus_and_services(&mut self.bus);
    }
}

fn capitalized(id: &str) -> String {
    let mut c = id.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

/// A call to the manager object.
async fn sup_call<B>(conn: &zbus::Connection, member: &str, body: &B) -> zbus::Result<Message>
where
    B: serde::Serialize + zbus::wire::DynamicType,
{
    within_t(
        Duration::from_secs(20),
        conn.call_method(Some(SUP), SUP_PATH, Some(SUP), member, body),
    )
    .await
}

use zbus::message::Message;

/// A property of a service object.
async fn prop(conn: &zbus::Connection, id: &str, name: &str) -> zbus::wire::OwnedVariant {
    let path: zbus::wire::OwnedObjectPath = sup_call(conn, "GetService", &(id,))
        .await
        .expect("GetService")
        .body()
        .deserialize()
        .unwrap();
    let m = within(conn.call_method(
        Some(SUP),
        path.as_str(),
        Some("org.freedesktop.DBus.Properties"),
        "Get",
        &("org.busvisor.Service1", name),
    ))
    .await
    .unwrap_or_else(|e| panic!("Get {name}: {e}"));
    let v: zbus::wire::OwnedVariant = m.body().deserialize().unwrap();
    v
}

async fn state(conn: &zbus::Connection, id: &str) -> String {
    String::try_from(prop(conn, id, "State").await).unwrap()
}

async fn logs(conn: &zbus::Connection, id: &str) -> Vec<String> {
    sup_call(conn, "GetLogs", &(id, 0u32))
        .await
        .expect("GetLogs")
        .body()
        .deserialize()
        .unwrap()
}

fn err_text(e: &zbus::Error) -> String {
    match e {
        zbus::Error::MethodError(_, Some(t), _) => t.clone(),
        other => other.to_string(),
    }
}

// ---------------------------------------------------------------- fds

/// A descriptor busvisor inherited (here a pipe the test holds) does not
/// reach the services it starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_do_not_inherit_what_busvisor_inherited() {
    // Without O_CLOEXEC, so that busvisor inherits both ends.
    let (r, w) = nix::unistd::pipe().unwrap();
    let ino = nix::sys::stat::fstat(&r).unwrap().st_ino;
    let b = Bus::new(|d| write_testsvc(d, "plain", "org.busvisor.Plain", &[], ""));
    drop((r, w)); // the test's own copies; busvisor keeps its own
    let conn = connect(b.addr()).await;
    let pid = call_pid(&conn, "org.busvisor.Plain").await;
    let want = format!("pipe:[{ino}]");
    let bus_has = std::fs::read_dir(format!("/proc/{}/fd", b.bus.pid()))
        .unwrap()
        .flatten()
        .any(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy() == want));
    assert!(bus_has, "the test did not pass the pipe to busvisor");
    let leaked: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy() == want))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        leaked.is_empty(),
        "the service inherited fds {leaked:?} ({want})"
    );
}

// ---------------------------------------------------------------- scheduling

/// The scheduling policy of each thread of `pid` (field 41 of its stat).
fn thread_policies(pid: u32) -> Vec<i32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("stat")).ok())
        .map(|stat| {
            let after = &stat[stat.rfind(')').unwrap() + 2..];
            after.split_whitespace().nth(38).unwrap().parse().unwrap()
        })
        .collect()
}

/// The bus's runtime runs under SCHED_BATCH (src/scheduling.rs), the
/// services it starts under the default policy, and
/// BUSVISOR_BATCH_SCHEDULING=0 keeps the bus on the default too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bus_runs_as_a_batch_task_and_its_services_do_not() {
    if is_reference() {
        return; // busvisor's scheduling
    }
    let (other, batch) = (libc::SCHED_OTHER, libc::SCHED_BATCH);
    let off: &[(&str, &str)] = &[("BUSVISOR_BATCH_SCHEDULING", "0")];
    for (env, want) in [(&[][..], true), (off, false)] {
        let b = Bus::with_env(
            |d| write_testsvc(d, "plain", "org.busvisor.Plain", &[], ""),
            env,
        );
        let conn = connect(b.addr()).await;
        let pid = call_pid(&conn, "org.busvisor.Plain").await;
        let bus = thread_policies(b.bus.pid());
        assert_eq!(
            bus.contains(&batch),
            want,
            "bus threads {bus:?}, env {env:?}"
        );
        assert!(bus.iter().all(|p| *p == other || *p == batch), "{bus:?}");
        let service = thread_policies(pid);
        assert!(service.iter().all(|p| *p == other), "service {service:?}");
    }
}

// ---------------------------------------------------------------- /proc scan

/// A /proc scan by environment (how busvisor finds service processes where
/// it makes no cgroups) does not wait on processes whose environment is
/// empty: 300 of them cost milliseconds, not 300 × 10 ms.
#[test]
fn a_proc_scan_does_not_wait_for_empty_environments() {
    let mut children = Vec::new();
    for _ in 0..300 {
        let c = std::process::Command::new("sleep")
            .arg("60")
            .env_clear()
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("spawn sleep");
        children.push(ChildGuard::new(c));
    }
    // Each has exec'd (its environment readable, and empty).
    for c in &children {
        let path = format!("/proc/{}/comm", c.pid());
        assert!(wait_until(OP_TIMEOUT, || std::fs::read_to_string(&path)
            .is_ok_and(|s| s.trim() == "sleep")));
    }
    let t = Instant::now();
    let found = busvisor::supervision::procs::scan("BUSVISOR_INVOCATION");
    let took = t.elapsed();
    eprintln!("measured: scan with 300 empty environments: {took:?}");
    drop(found);
    assert!(took < Duration::from_millis(1500), "the scan took {took:?}");
}

// ---------------------------------------------------------------- start limit

/// After the start limit trips, activation is refused for the start-limit
/// interval; after it, the next call starts the service again (as
/// dbus-daemon would), without an explicit Start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_start_limit_expires_after_its_interval() {
    let b = Bus::new(|d| {
        write_testsvc(
            d,
            "limited",
            "org.busvisor.Limited",
            &[],
            "restart = \"on-failure\"\nrestart_delay = \"50ms\"\nstart_limit = { burst = 2, interval = \"2s\" }",
        )
    });
    let conn = connect(b.addr()).await;
    let mut last = 0;
    let tripped_by = Instant::now() + Duration::from_secs(10);
    while state(&conn, "limited").await != "failed" {
        assert!(Instant::now() < tripped_by, "the limit never tripped");
        if let Ok(m) = call(&conn, "org.busvisor.Limited", "Pid").await {
            let pid: u32 = m.body().deserialize().unwrap();
            if pid != last {
                last = pid;
                let _ = within(conn.call_method(
                    Some("org.busvisor.Limited"),
                    TEST_PATH,
                    Some(TEST_IFACE),
                    "Exit",
                    &(1i32,),
                ))
                .await;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let tripped = Instant::now();
    let e = call(&conn, "org.busvisor.Limited", "Pid")
        .await
        .unwrap_err();
    assert!(err_text(&e).contains("start limit"), "{e}");
    // Once the interval has passed, a call activates it again.
    tokio::time::sleep(Duration::from_secs(2).saturating_sub(tripped.elapsed())).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let pid = call_pid(&conn, "org.busvisor.Limited").await;
    assert_ne!(pid, last);
    assert_eq!(state(&conn, "limited").await, "running");
}

// ---------------------------------------------------------------- output

/// `sh -c SCRIPT; exec python3 testsvc.py NAME --say TEXT`: a service that
/// prints something first.
fn write_printing(dir: &Path, id: &str, name: &str, script: &str, say: &str) {
    let svc = format!("{FIXTURES}/testsvc.py");
    let sh = format!("{script}; exec python3 {svc} {name} --say {say}");
    write_def(dir, id, name, &["sh", "-c", &sh], "");
}

/// A byte that is not UTF-8 does not stop busvisor reading the service's
/// output: what follows is logged, and the service, which writes more, is
/// not killed by SIGPIPE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_that_is_not_utf8_is_read_on() {
    let b = Bus::new(|d| {
        write_printing(
            d,
            "bytes",
            "org.busvisor.Bytes",
            r"printf 'one\377two\n'; sleep 0.2",
            "after-marker",
        )
    });
    let conn = connect(b.addr()).await;
    let pid = call_pid(&conn, "org.busvisor.Bytes").await;
    assert!(wait_until(OP_TIMEOUT, || b
        .bus
        .log()
        .contains("after-marker (stderr)")));
    let l = logs(&conn, "bytes").await;
    assert!(l.iter().any(|x| x == "one\u{fffd}two"), "{l:?}");
    assert!(l.iter().any(|x| x == "after-marker"), "{l:?}");
    assert!(pid_alive(pid));
    assert_eq!(call_pid(&conn, "org.busvisor.Bytes").await, pid);
}

/// Output without a newline is split into marked pieces: busvisor's memory
/// stays bounded, and so does what it keeps of the service's output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_without_newline_is_split_and_bounded() {
    const MIB: usize = 1024 * 1024;
    let b = Bus::new(|d| {
        write_printing(
            d,
            "long",
            "org.busvisor.Long",
            "head -c 67108864 /dev/zero | tr '\\0' a; echo; echo end-of-long",
            "after-long",
        )
    });
    let rss = |pid: u32| -> usize {
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let kb: usize = s
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        kb * 1024
    };
    let before = rss(b.bus.pid());
    let conn = connect(b.addr()).await;
    within_t(Duration::from_secs(120), async {
        call_pid(&conn, "org.busvisor.Long").await;
    })
    .await;
    assert!(wait_until(Duration::from_secs(60), || b
        .bus
        .log()
        .contains("after-long (stderr)")));
    let grew = rss(b.bus.pid()).saturating_sub(before);
    eprintln!(
        "measured: peak RSS grew by {} KiB for a 64 MiB line",
        grew / 1024
    );
    assert!(grew < 24 * MIB, "busvisor's peak RSS grew by {grew} bytes");
    let l = logs(&conn, "long").await;
    let kept: usize = l.iter().map(|x| x.len()).sum();
    assert!(kept <= MIB, "{kept} bytes of output kept");
    let pieces: Vec<&String> = l.iter().filter(|x| x.starts_with('a')).collect();
    assert!(pieces.len() > 2, "{}", pieces.len());
    assert!(
        pieces.iter().all(|p| p.len() <= 8192 + 3),
        "a piece is too long"
    );
    assert!(pieces[0].ends_with('\u{2026}'), "the split is not marked");
    // 64 MiB in a few seconds is over the service's output budget: what
    // follows the line may be dropped, but then that is said.
    assert!(
        l.iter()
            .any(|x| x == "end-of-long" || x.contains("lines of output dropped")),
        "{:?}",
        &l[l.len() - 3..]
    );
}

// ---------------------------------------------------------------- PATH

/// A bare `exec[0]` is looked up in busvisor's own PATH, not in one a
/// client set with UpdateActivationEnvironment; `status` shows the program.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bare_exec_is_not_looked_up_in_the_activation_path() {
    let b = Bus::new(|d| write_testsvc(d, "pathsvc", "org.busvisor.PathSvc", &[], ""));
    // A "python3" of a client's choosing.
    let evil = b.file("evil");
    std::fs::create_dir(&evil).unwrap();
    let marker = b.file("evil-ran");
    let fake = evil.join("python3");
    std::fs::write(
        &fake,
        format!("#!/bin/sh\ntouch {}\nexit 1\n", marker.display()),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let conn = connect(b.addr()).await;
    let mut env = std::collections::HashMap::new();
    let path = format!("{}:{}", evil.display(), std::env::var("PATH").unwrap());
    env.insert("PATH", path.as_str());
    bus_call(&conn, "UpdateActivationEnvironment", &(env,))
        .await
        .unwrap();
    let r = call(&conn, "org.busvisor.PathSvc", "Pid").await;
    assert!(!marker.exists(), "the client's python3 ran");
    r.expect("the service started");
    let want = which("python3");
    let exec_path = String::try_from(prop(&conn, "pathsvc", "ExecPath").await).unwrap();
    assert_eq!(exec_path, want);
    let out = b.cli(&["status", "pathsvc"]);
    assert!(
        out.stdout
            .lines()
            .any(|l| l.trim_start().starts_with("Program:") && l.ends_with(&want)),
        "{out:?}"
    );
    let out = b.cli(&["show", "pathsvc", "-p", "ExecPath", "--value"]);
    assert_eq!(out.stdout.trim(), want, "{out:?}");
}

// ---------------------------------------------------------------- owned names

/// A service whose name another connection already owns (one daemon behind
/// several definitions, as gnome-keyring ships them) is not started a
/// second time through the control API: the call fails at once naming the
/// owner, and `list` shows who provides it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_refuses_a_service_whose_name_is_owned_elsewhere() {
    let b = Bus::new(|_| {});
    let rec = b.file("starts");
    write_testsvc(
        &b.dir,
        "dup",
        "org.busvisor.Dup",
        &["--record", rec.to_str().unwrap()],
        "",
    );
    let owner = connect(b.addr()).await;
    bus_call(&owner, "ReloadConfig", &()).await.unwrap();
    let r: u32 = bus_ok(&owner, "RequestName", &("org.busvisor.Dup", 4u32)).await;
    assert_eq!(r, 1);
    let me = std::process::id();
    let want = format!(
        "org.busvisor.Dup is already provided by {} (pid {me})",
        unique(&owner)
    );
    let conn = connect(b.addr()).await;
    let t = Instant::now();
    let e = sup_call(&conn, "Start", &("dup",)).await.unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "took {:?}",
        t.elapsed()
    );
    assert!(err_text(&e).contains(&want), "{e}");
    let e = sup_call(&conn, "Restart", &("dup",)).await.unwrap_err();
    assert!(err_text(&e).contains(&want), "{e}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!rec.exists(), "a second instance was spawned");
    let out = b.cli(&["list"]);
    let line = out
        .stdout
        .lines()
        .find(|l| l.starts_with("dup "))
        .unwrap_or("");
    assert!(line.contains(&want), "{out:?}");
    // Once the name is released, Start starts it.
    let _: u32 = bus_ok(&owner, "ReleaseName", &("org.busvisor.Dup",)).await;
    sup_call(&conn, "Start", &("dup",)).await.expect("Start");
    assert_eq!(std::fs::read_to_string(&rec).unwrap().lines().count(), 1);
}

// ---------------------------------------------------------------- reused pids

/// A service that ignores SIGTERM and has its children reaped by the kernel
/// (SIGCHLD ignored), with a child that dies of SIGTERM: that child's exit
/// never reaches busvisor, and its pid is free for anyone.
const REAPING_PARENT_PY: &str = r#"
import os, signal, sys, time
sys.path.insert(0, sys.argv[3])
import minibus
signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGCHLD, signal.SIG_IGN)
pid = os.fork()
if pid == 0:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    while True:
        time.sleep(60)
with open(sys.argv[2] + ".tmp", "w") as f:
    f.write(f"{pid}\n")
os.rename(sys.argv[2] + ".tmp", sys.argv[2])
obj = minibus.Object("/org/busvisor/Test", "org.busvisor.Test")

@obj.method("", "u")
def Pid():
    return os.getpid()

minibus.serve(sys.argv[1], obj)
"#;

/// A process of ours with pid `pid`, made by asking the kernel for it
/// (root: /proc/sys/kernel/ns_last_pid); None if others keep taking it.
/// It leads a session of its own (setsid(1) execs sleep in place): were
/// busvisor to take the reused pid for its service's, the harm stays in
/// that session, not the test runner's.
fn sleep_with_pid(pid: u32) -> Option<ChildGuard> {
    for _ in 0..50 {
        std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).ok()?;
        let c = std::process::Command::new("setsid")
            .args(["sleep", "60"])
            .stdin(std::process::Stdio::null())
            .spawn()
            .ok()?;
        let c = ChildGuard::new(c);
        if c.pid() == pid {
            return Some(c);
        }
    }
    None
}

/// A pid that left a service without busvisor reaping it, then reused by an
/// unrelated process, is not signalled by Stop (busvisor holds its service
/// processes by pidfd), nor is that process's session, and the Stop
/// completes: with cgroups, and with the token and the tree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_never_signals_a_reused_pid() {
    stop_never_signals_a_reused_pid_in(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_never_signals_a_reused_pid_without_cgroups() {
    stop_never_signals_a_reused_pid_in(false).await;
}

async fn stop_never_signals_a_reused_pid_in(cgroups: bool) {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to choose the next pid");
        return;
    }
    let b = Bus::in_mode(cgroups, |_| {});
    let child_file = b.file("child");
    let conn = b
        .python_service(
            "reaping",
            REAPING_PARENT_PY,
            &["org.busvisor.Reaping", child_file.to_str().unwrap()],
            "stop_timeout = \"4s\"",
        )
        .await;
    let main = call_pid(&conn, "org.busvisor.Reaping").await;
    let mut guard = PidGuard::default();
    guard.add(main);
    let child: u32 = std::fs::read_to_string(&child_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    guard.add(child);
    // Stop: the child dies of SIGTERM and the kernel reaps it; the main
    // process ignores SIGTERM, so the stop waits for its timeout.
    let stop_conn = conn.clone();
    let stop = tokio::spawn(async move { sup_call(&stop_conn, "Stop", &("reaping",)).await });
    assert!(
        wait_until(Duration::from_secs(3), || pid_gone(child)),
        "the child did not go"
    );
    let Some(mut reused) = sleep_with_pid(child) else {
        eprintln!("skipped: pid {child} was taken by others");
        return;
    };
    let r = within_t(Duration::from_secs(20), stop).await.unwrap();
    r.expect("Stop");
    assert!(
        pid_gone(main) || !pid_alive(main),
        "the main process survived"
    );
    assert!(
        reused.is_running(),
        "busvisor signalled the process that reused pid {child}"
    );
    let pids: Vec<u32> = prop(&conn, "reaping", "PIDs").await.try_into().unwrap();
    assert!(pids.is_empty(), "{pids:?}");
}

/// Round trips to the driver (`n`, or as many as fit in 20 s): their
/// latencies, sorted.
async fn round_trips(conn: &zbus::Connection, n: usize) -> Vec<Duration> {
    let mut out = Vec::with_capacity(n);
    let start = Instant::now();
    while out.len() < n && start.elapsed() < Duration::from_secs(20) {
        let t = Instant::now();
        bus_call(conn, "GetId", &()).await.expect("GetId");
        out.push(t.elapsed());
    }
    out.sort();
    out
}

fn vm_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Bytes a process has written so far (/proc/PID/io).
fn wchar(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("wchar:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// A service that prints as fast as it can does not slow other clients
/// down, and a `LogLine` subscriber that never reads does not make the bus
/// hold its output: lines beyond the service's budget are dropped, counted
/// and reported, and a subscriber's queue of them is bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chatty_service_neither_slows_the_bus_nor_fills_its_memory() {
    let b = Bus::new(|d| {
        let svc = format!("{FIXTURES}/testsvc.py");
        let line = "flood ".repeat(12);
        let sh = format!("yes '{line}' & exec python3 {svc} org.busvisor.Flood");
        write_def(d, "flood", "org.busvisor.Flood", &["sh", "-c", &sh], "");
    });
    let conn = connect(b.addr()).await;
    let quiet = round_trips(&conn, 300).await;
    // Subscribes to LogLine and never reads again.
    let mut deaf = RawClient::connect_authenticated(&b.bus.socket);
    deaf.hello();
    let rule = "type='signal',interface='org.busvisor.Supervisor1',member='LogLine'";
    deaf.send(&bus_method_msg("AddMatch", &(rule,))).unwrap();
    call_pid(&conn, "org.busvisor.Flood").await;
    let yes = service_pids_of(b.bus.pid())
        .into_iter()
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "yes")
        })
        .expect("the yes process");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss0, w0, t0) = (vm_rss_kib(b.bus.pid()), wchar(yes), Instant::now());
    let busy = round_trips(&conn, 1000).await;
    tokio::time::sleep(Duration::from_secs(6).saturating_sub(t0.elapsed())).await;
    let rate = (wchar(yes) - w0) as f64 / t0.elapsed().as_secs_f64() / 1e6;
    let rss1 = vm_rss_kib(b.bus.pid());
    let (p50, worst) = (busy[busy.len() / 2], busy[busy.len() - 1]);
    eprintln!(
        "measured: quiet p50 {:?}; flooding at {rate:.1} MB/s: {} round trips, p50 {p50:?}, \
         worst {worst:?}; bus RSS {rss0} KiB -> {rss1} KiB over {:?}",
        quiet[quiet.len() / 2],
        busy.len(),
        t0.elapsed()
    );
    assert!(rate > 10.0, "the service wrote only {rate:.1} MB/s");
    assert!(p50 < Duration::from_millis(5), "p50 {p50:?}");
    assert!(worst < Duration::from_millis(200), "worst {worst:?}");
    assert!(
        rss1 < rss0 + 16 * 1024,
        "the bus's RSS grew from {rss0} KiB to {rss1} KiB"
    );
    assert!(b.bus.log().contains("lines of output dropped"));
    let kept = logs(&conn, "flood").await;
    assert!(kept.iter().any(|l| l.contains("lines of output dropped")));
    drop(deaf);
}

/// A service whose helpers run with an empty environment (`env -i`):
/// one whose parent exits at once (re-parented to busvisor), one that
/// stays the service's child, one that ignores SIGTERM, and, with
/// `escapes`, one that also leaves the session (only a cgroup holds it).
/// Each helper appends its pid to `pids`.
fn write_helpers(dir: &Path, pids: &Path, escapes: bool) {
    let f = pids.display();
    let helper = |pre: &str| format!("env -i sh -c '{pre}echo $$ >> {f}; exec sleep 300'");
    let mut sh = format!(
        "({} &); {} & ({} &); ",
        helper(""),
        helper(""),
        helper("trap \"\" TERM; ")
    );
    if escapes {
        sh += &format!("(setsid {} &); ", helper(""));
    }
    sh += &format!("exec python3 {FIXTURES}/testsvc.py org.busvisor.Helpers");
    write_def(
        dir,
        "helpers",
        "org.busvisor.Helpers",
        &["sh", "-c", &sh],
        "stop_timeout = \"1s\"",
    );
}

/// Helpers that drop the invocation's token end with their service: Stop
/// ends them and each restart leaves none of the previous run's behind.
/// A bus serving the helpers service (see [`write_helpers`]), with or
/// without cgroups, and the file its helpers append their pids to.
fn helpers_bus(cgroups: bool, escapes: bool) -> (Bus, PathBuf) {
    let pids_file = std::sync::OnceLock::new();
    let b = Bus::in_mode(cgroups, |d| {
        let f = d.parent().unwrap().join("helper-pids");
        write_helpers(d, &f, escapes);
        pids_file.set(f).unwrap();
    });
    (b, pids_file.into_inner().unwrap())
}

/// Those of `pids` still there (alive, or zombies not yet reaped).
fn not_gone(pids: &[u32]) -> Vec<u32> {
    pids.iter().copied().filter(|p| !pid_gone(*p)).collect()
}

async fn helpers_without_token_end_with_their_service(cgroups: bool) {
    let (b, pids_file) = helpers_bus(cgroups, cgroups);
    let read = || read_pids(&pids_file);
    let per_run = if cgroups { 4 } else { 3 };
    let conn = connect(b.addr()).await;
    let mut guard = PidGuard::default();
    for run in 0..3 {
        if run == 0 {
            call_pid(&conn, "org.busvisor.Helpers").await;
        } else {
            sup_call(&conn, "Restart", &("helpers",))
                .await
                .expect("Restart");
        }
        assert!(wait_until(OP_TIMEOUT, || read().len() >= per_run * (run + 1)));
        let all = read();
        guard.pids = all.clone();
        let (old, new) = all.split_at(per_run * run);
        let leaked = || not_gone(old);
        assert!(
            wait_until(OP_TIMEOUT, || leaked().is_empty()),
            "run {run}: the previous runs' helpers {:?} are still there",
            leaked()
        );
        assert!(new.iter().all(|p| pid_alive(*p)), "run {run}: {new:?}");
        let cg = std::fs::read_to_string(format!("/proc/{}/cgroup", new[0])).unwrap();
        let in_cgroup = cg.contains(&format!("busvisor-{}/", b.bus.pid()));
        assert_eq!(in_cgroup, cgroups, "{cg}");
    }
    let t = Instant::now();
    sup_call(&conn, "Stop", &("helpers",)).await.expect("Stop");
    let all = read();
    let left = || not_gone(&all);
    assert!(
        wait_until(OP_TIMEOUT, || left().is_empty()),
        "helpers {:?} outlived Stop",
        left()
    );
    eprintln!(
        "measured (cgroups: {cgroups}): {} helpers over 3 runs, none left {:?} after Stop",
        all.len(),
        t.elapsed()
    );
    assert_eq!(state(&conn, "helpers").await, "inactive");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helpers_without_token_end_with_their_service_in_a_cgroup() {
    helpers_without_token_end_with_their_service(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helpers_without_token_end_with_their_service_without_cgroups() {
    helpers_without_token_end_with_their_service(false).await;
}

/// A service whose launched process exits 0 and leaves a process with an
/// empty environment (no token) to take its name: without cgroups, the
/// session busvisor made for it still says whose it is. It is the
/// service's main process, and Stop ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_that_drops_its_environment_is_still_the_service() {
    let python = which("python3");
    let sh = format!(
        "env -i PYTHONDONTWRITEBYTECODE=1 DBUS_STARTER_ADDRESS=\"$DBUS_STARTER_ADDRESS\" {python} \
         {FIXTURES}/testsvc.py org.busvisor.Bare & exit 0"
    );
    let b = Bus::with_env(
        |d| write_def(d, "bare", "org.busvisor.Bare", &["sh", "-c", &sh], ""),
        &[("BUSVISOR_CGROUPS", "0")],
    );
    let conn = connect(b.addr()).await;
    let pid = call_pid(&conn, "org.busvisor.Bare").await;
    let _guard = PidGuard { pids: vec![pid] };
    assert_eq!(state(&conn, "bare").await, "running");
    let main: u32 = prop(&conn, "bare", "MainPID").await.try_into().unwrap();
    assert_eq!(main, pid);
    sup_call(&conn, "Stop", &("bare",)).await.expect("Stop");
    assert!(
        wait_until(OP_TIMEOUT, || pid_gone(pid)),
        "{pid} outlived Stop"
    );
    assert_eq!(state(&conn, "bare").await, "inactive");
}

// ---------------------------------------------------------------- apps

/// A service that launches an application for the user the way a desktop
/// portal's OpenURI does (GLib's app launcher, in process), and that
/// double-forks a daemon of its own at start.
const LAUNCHER_PY: &str = r#"
import os, sys, time
sys.path.insert(0, sys.argv[3])
import minibus
from gi.repository import Gio
desktop, daemon_file = sys.argv[1], sys.argv[2]
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        with open(daemon_file + ".tmp", "w") as f:
            f.write(f"{os.getpid()}\n")
        os.rename(daemon_file + ".tmp", daemon_file)
        while True:
            time.sleep(60)
    os._exit(0)
obj = minibus.Object("/org/busvisor/Test", "org.busvisor.Test")

@obj.method("", "u")
def Pid():
    return os.getpid()

@obj.method("", "b")
def Launch():
    return Gio.DesktopAppInfo.new_from_filename(desktop).launch([], None)

minibus.serve("org.busvisor.Portal", obj)
"#;

/// The application: it records its pid and its child's.
const APP_SH: &str = "#!/bin/sh\nsleep 300 &\necho \"$$ $!\" > \"$0.pids.tmp\"\nmv \"$0.pids.tmp\" \"$0.pids.$$\"\nwait\n";

fn app_pids(dir: &Path) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.file_name().to_string_lossy().starts_with("app.sh.pids.") {
            let text = std::fs::read_to_string(e.path()).unwrap();
            out.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    out
}

/// Applications a service launches for the user (GLib's launcher marks
/// them) outlive the service when it crashes and when it is stopped; the
/// daemon the service double-forked does not.
async fn apps_a_service_launches_are_the_users(cgroups: bool) {
    // Debian's python3 has python3-gi; one earlier in PATH may not.
    let Some(python) = ["python3", "/usr/bin/python3"].into_iter().find(|p| {
        std::process::Command::new(p)
            .args(["-c", "from gi.repository import Gio"])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }) else {
        eprintln!("skipped: needs python3-gi");
        return;
    };
    let b = Bus::in_mode(cgroups, |_| {});
    let apps = b.file("apps");
    std::fs::create_dir(&apps).unwrap();
    let app = apps.join("app.sh");
    std::fs::write(&app, APP_SH).unwrap();
    std::fs::set_permissions(&app, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let desktop = b.file("busvisor-test-app.desktop");
    std::fs::write(
        &desktop,
        format!(
            "[Desktop Entry]\nType=Application\nName=Test app\nExec={}\n",
            app.display()
        ),
    )
    .unwrap();
    let daemon_file = b.file("daemon");
    let conn = b
        .python_service_with(
            python,
            "portal",
            LAUNCHER_PY,
            &[desktop.to_str().unwrap(), daemon_file.to_str().unwrap()],
            // Started again by the next call, not at once: the next run's
            // daemon is then known to be the one after the crash.
            "stop_timeout = \"2s\"\nrestart = \"no\"",
        )
        .await;
    let mut guard = PidGuard::default();
    let launch = |conn: zbus::Connection| async move {
        let m = call(&conn, "org.busvisor.Portal", "Launch")
            .await
            .expect("Launch");
        assert!(m.body().deserialize::<bool>().unwrap());
    };

    // The portal crashes: the app it launched lives on.
    launch(conn.clone()).await;
    assert!(wait_until(Duration::from_secs(10), || app_pids(&apps)
        .len()
        == 2));
    let first = app_pids(&apps);
    first.iter().for_each(|p| guard.add(*p));
    let main = call_pid(&conn, "org.busvisor.Portal").await;
    guard.add(main);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(main as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // `failed` (restart = "no") once the crash's leftovers are handled:
    // the moment the app would have been ended with them.
    let mut settled = false;
    for _ in 0..200 {
        if state(&conn, "portal").await == "failed" {
            settled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        settled,
        "the service did not settle as failed after its crash"
    );
    for p in &first {
        assert!(
            pid_alive(*p),
            "app process {p} died with the crashed service"
        );
    }

    // Started again, then stopped: its daemon goes, both apps stay.
    let _ = std::fs::remove_file(&daemon_file);
    launch(conn.clone()).await;
    assert!(wait_until(Duration::from_secs(10), || app_pids(&apps)
        .len()
        == 4));
    app_pids(&apps).iter().for_each(|p| guard.add(*p));
    assert!(wait_until(Duration::from_secs(10), || daemon_file.exists()));
    let daemon: u32 = std::fs::read_to_string(&daemon_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    guard.add(daemon);
    sup_call(&conn, "Stop", &("portal",)).await.expect("Stop");
    assert!(
        wait_until(Duration::from_secs(5), || !pid_alive(daemon)),
        "the service's own daemon survived Stop"
    );
    for p in app_pids(&apps) {
        assert!(
            pid_alive(p),
            "app process {p} died with the stopped service"
        );
    }
    let pids: Vec<u32> = prop(&conn, "portal", "PIDs").await.try_into().unwrap();
    assert!(pids.is_empty(), "{pids:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apps_a_service_launches_are_the_users_in_a_cgroup() {
    apps_a_service_launches_are_the_users(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apps_a_service_launches_are_the_users_without_cgroups() {
    apps_a_service_launches_are_the_users(false).await;
}

// ---------------------------------------------------------------- the keeper

/// KiB of `pid`'s resident set that are pages of the busvisor executable.
fn resident_kib_of_busvisor(pid: u32) -> u64 {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    let exe = exe
        .to_str()
        .unwrap()
        .trim_end_matches(" (deleted)")
        .to_owned();
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut ours = false;
    let mut kib = 0;
    for line in smaps.lines() {
        if let Some(rss) = line.strip_prefix("Rss:") {
            if ours {
                kib += rss
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap();
            }
        } else if line.split_whitespace().nth(1).is_some_and(|p| p.len() == 4) {
            ours = line.split_whitespace().nth(5) == Some(exe.as_str());
        }
    }
    kib
}

/// The keeper ran busvisor's start-up and then only waits: it gives the
/// pages of the executable back (they stay in the page cache), so that a
/// bus costs about one process's worth of resident code, not two. Before
/// it did, the keeper held more of the binary than the bus itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keeper_holds_little_of_the_binary() {
    if is_reference() {
        return; // busvisor's keeper: dbus-daemon has none
    }
    let b = start_bus(None);
    let conn = connect(&b.address).await;
    conn.call_method(
        Some("org.freedesktop.DBus"),
        "/org/freedesktop/DBus",
        Some("org.freedesktop.DBus"),
        "GetId",
        &(),
    )
    .await
    .unwrap();
    let (keeper, bus) = (b.keeper_pid(), b.pid());
    assert_ne!(keeper, bus, "no keeper above the bus");
    let (k, s) = (
        resident_kib_of_busvisor(keeper),
        resident_kib_of_busvisor(bus),
    );
    assert!(s > 0, "the bus maps none of its executable?");
    assert!(
        k * 2 < s,
        "the keeper holds {k} KiB of the executable, the bus {s} KiB"
    );
}

/// A bus with the helpers service running: its helper pids (all four kinds,
/// the one that leaves the session included) and the service's main pid.
async fn bus_with_helpers(cgroups: bool) -> (Bus, Vec<u32>, PidGuard) {
    let (b, pids_file) = helpers_bus(cgroups, true);
    let read = || read_pids(&pids_file);
    let conn = connect(b.addr()).await;
    let main = call_pid(&conn, "org.busvisor.Helpers").await;
    assert!(wait_until(OP_TIMEOUT, || read().len() >= 4));
    let mut all = read();
    all.push(main);
    let guard = PidGuard { pids: all.clone() };
    (b, all, guard)
}

/// The bus killed with SIGKILL: the keeper above it ends every process
/// the bus started (those that left the session and the token included),
/// removes its cgroups and socket, and exits with 128 + 9.
async fn nothing_outlives_a_bus_killed_with_sigkill(cgroups: bool) {
    let (mut b, all, _guard) = bus_with_helpers(cgroups).await;
    let bus = b.bus.pid();
    assert_ne!(bus, b.bus.keeper_pid(), "no keeper above the bus");
    let cgroup_dir = std::fs::read_to_string(format!("/proc/{}/cgroup", all[0]))
        .unwrap()
        .contains(&format!("busvisor-{bus}/"));
    assert_eq!(cgroup_dir, cgroups);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(bus as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let left = || not_gone(&all);
    // The helper that ignores SIGTERM gets SIGKILL after the grace period.
    assert!(
        wait_until(Duration::from_secs(10), || left().is_empty()),
        "{:?} outlived the bus",
        left()
    );
    let status = b
        .bus
        .proc
        .wait_timeout(Duration::from_secs(5))
        .expect("the keeper stayed");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::into_raw(status) >> 8,
        128 + 9
    );
    assert!(!b.bus.socket.exists(), "the socket file was left");
    let leftover = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            right
                .starts_with("cgroup2 ")
                .then(|| left.split_whitespace().nth(4).map(str::to_owned))?
        })
        .any(|mount| walk_has(Path::new(&mount), &format!("busvisor-{bus}"), 3));
    assert!(!leftover, "the bus's cgroup directory was left");
}

/// Whether a directory named `name` is within `depth` levels below `dir`.
fn walk_has(dir: &Path, name: &str, depth: usize) -> bool {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return false;
    };
    rd.flatten()
        .filter(|e| e.path().is_dir())
        .any(|e| e.file_name() == name || (depth > 0 && walk_has(&e.path(), name, depth - 1)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_outlives_a_bus_killed_with_sigkill_in_a_cgroup() {
    nothing_outlives_a_bus_killed_with_sigkill(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_outlives_a_bus_killed_with_sigkill_without_cgroups() {
    nothing_outlives_a_bus_killed_with_sigkill(false).await;
}

/// The keeper (the pid busvisor publishes) killed with SIGKILL: the bus
/// gets SIGTERM and stops its services itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bus_whose_keeper_is_killed_stops_its_services() {
    let (b, all, _guard) = bus_with_helpers(false).await;
    let bus = b.bus.pid();
    b.bus.proc.signal(nix::sys::signal::Signal::SIGKILL);
    let left = || {
        all.iter()
            .copied()
            .filter(|p| pid_alive(*p))
            .collect::<Vec<_>>()
    };
    assert!(
        wait_until(Duration::from_secs(10), || left().is_empty()
            && !pid_alive(bus)),
        "the bus or its services {:?} outlived the keeper",
        left()
    );
}
