//! Bus activation and supervision, end to end: the real busvisor binary,
//! real clients (busctl, gdbus, dbus-send, zbus), real services (the
//! examples in services.d and the fixtures in tests/fixtures, written in
//! Python on services.d/minibus.py, or sh).
//!
//! Each test writes its service definitions into a temporary directory, with
//! absolute paths to the fixtures, and every process it causes is stopped by
//! pid at the end ([`ActBus`]'s drop kills busvisor, then every process that
//! carries one of its invocation tokens).
//!
//! Timings are printed with `--nocapture` ("measured: ...").

mod common;

use common::{FIXTURES, write_def, write_testsvc};

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use nix::sys::signal::Signal;
use zbus::message::Message;

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/services.d");
const ERR: &str = "org.freedesktop.DBus.Error.";

// ---------------------------------------------------------------- harness

/// A busvisor serving one directory of TOML definitions; on drop, busvisor
/// is killed and so is every process left with one of its invocation tokens.
struct ActBus {
    bus: TestBus,
    dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl ActBus {
    /// Add a definition to the running bus (written, then ReloadConfig).
    async fn define(&self, id: &str, name: &str, exec: &[&str], extra: &str) {
        write_def(&self.dir, id, name, exec, extra);
        bus_call(&connect(self.addr()).await, "ReloadConfig", &())
            .await
            .unwrap();
    }

    /// A fresh services dir, filled by `defs`, then the bus.
    fn new(defs: impl FnOnce(&Path)) -> ActBus {
        Self::with(defs, None, &[])
    }

    fn with(defs: impl FnOnce(&Path), config: Option<&str>, env: &[(&str, &str)]) -> ActBus {
        let (bus, dir, tmp) = common::start_bus_with_services("busvisor-act", defs, config, env);
        ActBus {
            bus,
            dir,
            _tmp: Some(tmp),
        }
    }

    /// The examples of services.d, through their real .toml files.
    fn examples() -> ActBus {
        let bus = start_bus_with_env(None, &["--services-dir", EXAMPLES], &[]);
        ActBus {
            bus,
            dir: EXAMPLES.into(),
            _tmp: None,
        }
    }

    fn addr(&self) -> &str {
        &self.bus.address
    }

    fn pid(&self) -> u32 {
        self.bus.pid()
    }

    /// A scratch file path in the test's temporary directory.
    fn file(&self, name: &str) -> PathBuf {
        self.bus.dir.path().join(name)
    }
}

impl Drop for ActBus {
    fn drop(&mut self) {
        kill_bus_and_services(&mut self.bus);
    }
}

fn fixture(name: &str) -> String {
    format!("{FIXTURES}/{name}")
}

async fn env_of(conn: &zbus::Connection, dest: &str, var: &str) -> String {
    let m = within(conn.call_method(Some(dest), TEST_PATH, Some(TEST_IFACE), "Env", &(var,)))
        .await
        .unwrap_or_else(|e| panic!("Env {var} of {dest}: {e}"));
    m.body().deserialize().unwrap()
}

fn err_text(e: &zbus::Error) -> String {
    match e {
        zbus::Error::MethodError(_, Some(t), _) => t.clone(),
        other => other.to_string(),
    }
}

fn epoch_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// A `date +%s.%N` timestamp written by a fixture.
fn read_epoch(path: &Path) -> f64 {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .parse()
        .unwrap()
}

/// `n_calls` method calls and `n_starts` StartServiceByName calls to `name`,
/// each from its own connection, all at once. Each must fail: returns
/// (error name, error text, epoch seconds when it arrived).
async fn concurrent_failures(
    addr: &str,
    name: &str,
    n_calls: usize,
    n_starts: usize,
) -> Vec<(String, String, f64)> {
    let mut conns = Vec::new();
    for _ in 0..n_calls + n_starts {
        conns.push(connect(addr).await);
    }
    let mut set = tokio::task::JoinSet::new();
    for (i, conn) in conns.into_iter().enumerate() {
        let name = name.to_owned();
        set.spawn(async move {
            let r = if i < n_calls {
                within(conn.call_method(
                    Some(name.as_str()),
                    TEST_PATH,
                    Some(TEST_IFACE),
                    "Echo",
                    &("x",),
                ))
                .await
            } else {
                bus_call(&conn, "StartServiceByName", &(name.as_str(), 0u32)).await
            };
            let at = epoch_now();
            match r {
                Ok(m) => panic!("call {i} to {name} succeeded: {m:?}"),
                Err(e) => (err_name(&e), err_text(&e), at),
            }
        });
    }
    let mut out = Vec::new();
    while let Some(r) = set.join_next().await {
        out.push(r.unwrap());
    }
    out
}

fn busctl(addr: &str, args: &[&str]) -> ToolOutput {
    let a = format!("--address={addr}");
    let mut all = vec![a.as_str()];
    all.extend_from_slice(args);
    run_tool("busctl", &all, OP_TIMEOUT)
}

fn gdbus_call(addr: &str, dest: &str, path: &str, method: &str, args: &[&str]) -> ToolOutput {
    let mut all = vec![
        "call",
        "--address",
        addr,
        "--dest",
        dest,
        "--object-path",
        path,
        "--method",
        method,
    ];
    all.extend_from_slice(args);
    run_tool("gdbus", &all, OP_TIMEOUT)
}

fn dbus_send(addr: &str, args: &[&str]) -> ToolOutput {
    let b = format!("--bus={addr}");
    let mut all = vec![b.as_str(), "--print-reply"];
    all.extend_from_slice(args);
    run_tool("dbus-send", &all, OP_TIMEOUT)
}

/// The number after "uint32 " / "u " in a tool's output.
fn parse_u32(out: &str) -> u32 {
    out.split_whitespace()
        .filter_map(|w| w.trim_matches(|c: char| !c.is_ascii_digit()).parse().ok())
        .next_back()
        .unwrap_or_else(|| panic!("no number in {out:?}"))
}

// ---------------------------------------------------------------- examples

const ECHO: &str = "org.busvisor.Example.Echo";
const ECHO_PATH: &str = "/org/busvisor/Example/Echo";

/// The Echo example starts on the first call of each kind of client and is
/// then reused: one pid for busctl, gdbus and dbus-send.
#[test]
fn example_echo_auto_starts_for_busctl_gdbus_and_dbus_send() {
    if is_reference() {
        return; // busvisor-only: its services come from busvisor's --services-dir
    }
    let b = ActBus::examples();
    let t = Instant::now();
    let out = busctl(
        b.addr(),
        &["call", ECHO, ECHO_PATH, ECHO, "Echo", "s", "hi"],
    );
    out.assert_ok();
    eprintln!(
        "measured: first busctl call with activation of echo.py: {:?}",
        t.elapsed()
    );
    assert_eq!(out.stdout.trim(), "s \"hi\"");

    let out = gdbus_call(
        b.addr(),
        ECHO,
        ECHO_PATH,
        "org.busvisor.Example.Echo.Echo",
        &["hi"],
    );
    out.assert_ok();
    assert_eq!(out.stdout.trim(), "('hi',)");

    let out = dbus_send(
        b.addr(),
        &[
            &format!("--dest={ECHO}"),
            ECHO_PATH,
            "org.busvisor.Example.Echo.Pid",
        ],
    );
    out.assert_ok();
    let pid1 = parse_u32(&out.stdout);
    let out = busctl(b.addr(), &["call", ECHO, ECHO_PATH, ECHO, "Pid"]);
    assert_eq!(
        parse_u32(&out.stdout),
        pid1,
        "the service was started twice"
    );
    assert_eq!(proc_stat(pid1).map(|s| s.0), Some(b.pid()));

    // gdbus introspection of the example works (gdbus call relies on it).
    let out = run_tool(
        "gdbus",
        &[
            "introspect",
            "--address",
            b.addr(),
            "--dest",
            ECHO,
            "--object-path",
            ECHO_PATH,
        ],
        OP_TIMEOUT,
    );
    out.assert_ok();
    assert!(out.stdout.contains("Echo(in  s arg_0,"), "{}", out.stdout);

    // Quit: the reply comes, then the process exits 0 and is reaped; the
    // next call starts a new one.
    busctl(b.addr(), &["call", ECHO, ECHO_PATH, ECHO, "Quit"]).assert_ok();
    assert!(
        wait_until(Duration::from_secs(5), || pid_gone(pid1)),
        "echo.py not reaped"
    );
    let out = busctl(b.addr(), &["call", ECHO, ECHO_PATH, ECHO, "Pid"]);
    out.assert_ok();
    assert_ne!(parse_u32(&out.stdout), pid1);
}

/// The double-forking example: the launcher exits 0, busvisor waits for the
/// name, and the daemon is busvisor's own child (subreaper), reaped when it
/// exits (no zombie), whether it quits or is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_daemon_double_forks_and_stays_a_child_of_busvisor() {
    if is_reference() {
        return; // busvisor-only: its services come from busvisor's --services-dir
    }
    const NAME: &str = "org.busvisor.Example.Daemon";
    const PATH: &str = "/org/busvisor/Example/Daemon";
    let b = ActBus::examples();
    let conn = connect(b.addr()).await;
    let get = |member: &'static str| {
        let conn = conn.clone();
        async move {
            let m = within(conn.call_method(Some(NAME), PATH, Some(NAME), member, &()))
                .await
                .unwrap_or_else(|e| panic!("{member}: {e}"));
            m.body().deserialize::<u32>().unwrap()
        }
    };
    let pid = get("Pid").await;
    let ppid = get("Ppid").await;
    assert_eq!(ppid, b.pid(), "the daemon's getppid() is not busvisor");
    assert_eq!(
        proc_stat(pid).map(|s| s.0),
        Some(b.pid()),
        "/proc/{pid}/stat ppid"
    );
    // The launcher and the intermediate session leader were reaped.
    assert!(
        wait_until(Duration::from_secs(2), || zombie_children(b.pid())
            .is_empty()),
        "zombies left: {:?}",
        zombie_children(b.pid())
    );
    let mut guard = PidGuard::default();
    guard.add(pid);

    within(conn.call_method(Some(NAME), PATH, Some(NAME), "Quit", &()))
        .await
        .unwrap();
    let t = Instant::now();
    assert!(
        wait_until(Duration::from_secs(3), || pid_gone(pid)),
        "daemon {pid} not reaped"
    );
    eprintln!("measured: daemon quit -> /proc/PID gone: {:?}", t.elapsed());

    // Again, and this time kill it from outside with SIGKILL.
    let pid2 = get("Pid").await;
    assert_ne!(pid2, pid);
    guard.add(pid2);
    assert_eq!(proc_stat(pid2).map(|s| s.0), Some(b.pid()));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid2 as i32), Signal::SIGKILL).unwrap();
    assert!(
        wait_until(Duration::from_secs(3), || pid_gone(pid2)),
        "killed daemon {pid2} left a zombie"
    );
    assert!(zombie_children(b.pid()).is_empty());
}

/// The Crasher example (restart = on-failure, restart_delay 200ms): Crash()
/// exits 1 without a reply; calls made while it restarts are answered by the
/// new instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_crasher_restarts_and_calls_during_the_restart_reach_the_new_instance() {
    if is_reference() {
        return; // busvisor-only: its services come from busvisor's --services-dir
    }
    const NAME: &str = "org.busvisor.Example.Crasher";
    const PATH: &str = "/org/busvisor/Example/Crasher";
    let b = ActBus::examples();
    let conn = connect(b.addr()).await;
    let ping = || async {
        let m = within(conn.call_method(Some(NAME), PATH, Some(NAME), "Ping", &()))
            .await
            .unwrap_or_else(|e| panic!("Ping: {e}"));
        m.body().deserialize::<String>().unwrap()
    };
    let first = ping().await;
    let pid1: u32 = first.rsplit(' ').next().unwrap().parse().unwrap();

    for round in 0..2 {
        let crash = within(conn.call_method(Some(NAME), PATH, Some(NAME), "Crash", &())).await;
        let t = Instant::now();
        let e = crash.expect_err("Crash replied");
        assert_eq!(err_name(&e), format!("{ERR}NoReply"), "{e}");
        // Right away, while the restart delay runs: this call must wait for
        // the new instance, not fail.
        let answer = ping().await;
        let elapsed = t.elapsed();
        eprintln!("measured: crash {round} -> answer from the new instance: {elapsed:?}");
        assert!(answer.starts_with("pong from "), "{answer}");
        assert_ne!(answer, first, "answered by the crashed instance?");
        assert!(pid_gone(pid1));
        assert!(
            elapsed >= Duration::from_millis(200),
            "restarted before restart_delay: {elapsed:?}"
        );
    }
}

// ---------------------------------------------------------------- basics

/// StartServiceByName answers 1 (started) and then 2 (already running).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_service_by_name_returns_1_then_2() {
    if is_reference() {
        return; // busvisor-only: its services come from busvisor's --services-dir
    }
    let b = ActBus::new(|d| write_testsvc(d, "t", "org.busvisor.T", &[], ""));
    let conn = connect(b.addr()).await;
    let has: bool = bus_ok(&conn, "NameHasOwner", &("org.busvisor.T",)).await;
    assert!(!has);
    let r: u32 = bus_ok(&conn, "StartServiceByName", &("org.busvisor.T", 0u32)).await;
    assert_eq!(r, 1);
    let has: bool = bus_ok(&conn, "NameHasOwner", &("org.busvisor.T",)).await;
    assert!(has, "1 came before the name was owned");
    let r: u32 = bus_ok(&conn, "StartServiceByName", &("org.busvisor.T", 0u32)).await;
    assert_eq!(r, 2);
    // dbus-send says the same.
    let out = dbus_send(
        b.addr(),
        &[
            "--dest=org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus.StartServiceByName",
            "string:org.busvisor.T",
            "uint32:0",
        ],
    );
    assert_eq!(parse_u32(&out.assert_ok().stdout), 2);
}

/// NO_AUTO_START (busctl --auto-start=no) to an unowned activatable name:
/// NameHasNoOwner, and nothing is started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_auto_start_gets_name_has_no_owner() {
    if is_reference() {
        return; // busvisor-only: its services come from busvisor's --services-dir
    }
    let b = ActBus::new(|_| {});
    let rec = b.file("starts");
    write_testsvc(
        &b.dir,
        "t",
        "org.busvisor.T",
        &["--record", rec.to_str().unwrap()],
        "",
    );
    let conn = connect(b.addr()).await;
    bus_call(&conn, "ReloadConfig", &()).await.unwrap();

    let out = busctl(
        b.addr(),
        &[
            "--auto-start=no",
            "call",
            "org.busvisor.T",
            TEST_PATH,
            TEST_IFACE,
            "Pid",
        ],
    );
    assert!(!out.success(), "{out:?}");
    assert!(out.stderr.contains("does not exist"), "{out:?}");

    // The same from zbus, to see the error name.
    let msg = Message::method_call(TEST_PATH, "Pid")
        .destination("org.busvisor.T")
        .interface(TEST_IFACE)
        .with_flags(zbus::message::Flags::NO_AUTO_START)
        .build(&())
        .unwrap();
    let serial = msg.primary_header().serial_num();
    let mut s = stream(&conn);
    within(conn.send(&msg)).await.unwrap();
    let reply = next_matching(&mut s, OP_TIMEOUT, |m| {
        m.header().reply_serial() == Some(serial)
    })
    .await
    .expect("no reply to the NO_AUTO_START call");
    assert_eq!(
        reply.header().error_name().map(|e| e.to_string()),
        Some(format!("{ERR}NameHasNoOwner"))
    );
    // Activation is decided while the call is routed, before the error
    // reply: had it started the service, its state would say so now.
    assert_eq!(service_state(&conn, "org.busvisor.T").await, "inactive");
    assert!(
        read_pids(&rec).is_empty(),
        "NO_AUTO_START started the service"
    );
}

/// The State property of the service that provides `name`, from busvisor's
/// control API.
async fn service_state(conn: &zbus::Connection, name: &str) -> String {
    const SUP: &str = "org.busvisor.Supervisor1";
    let path: zbus::wire::OwnedObjectPath = within(conn.call_method(
        Some(SUP),
        "/org/busvisor/Supervisor1",
        Some(SUP),
        "GetService",
        &(name,),
    ))
    .await
    .expect("GetService")
    .body()
    .deserialize()
    .unwrap();
    let v: zbus::wire::OwnedVariant = within(conn.call_method(
        Some(SUP),
        path.as_str(),
        Some("org.freedesktop.DBus.Properties"),
        "Get",
        &("org.busvisor.Service1", "State"),
    ))
    .await
    .expect("Get State")
    .body()
    .deserialize()
    .unwrap();
    String::try_from(v).unwrap()
}

/// 20 first calls at once, from 20 connections: one start, 20 replies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_first_calls_start_exactly_one_instance() {
    if is_reference() {
        return; // busvisor-only: its services come from busvisor's --services-dir
    }
    let b = ActBus::new(|_| {});
    let rec = b.file("starts");
    write_testsvc(
        &b.dir,
        "t",
        "org.busvisor.T",
        &["--record", rec.to_str().unwrap(), "--delay", "0.5"],
        "",
    );
    let seed = connect(b.addr()).await;
    bus_call(&seed, "ReloadConfig", &()).await.unwrap();
    let mut conns = Vec::new();
    for _ in 0..20 {
        conns.push(connect(b.addr()).await);
    }
    let t = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for (i, conn) in conns.into_iter().enumerate() {
        set.spawn(async move {
            let text = format!("caller {i}");
            let m = within(conn.call_method(
                Some("org.busvisor.T"),
                TEST_PATH,
                Some(TEST_IFACE),
                "Echo",
                &(text.as_str(),),
            ))
            .await
            .unwrap_or_else(|e| panic!("caller {i}: {e}"));
            assert_eq!(m.body().deserialize::<String>().unwrap(), text);
        });
    }
    let mut n = 0;
    while let Some(r) = set.join_next().await {
        r.unwrap();
        n += 1;
    }
    eprintln!(
        "measured: 20 concurrent first calls all answered after {:?}",
        t.elapsed()
    );
    assert_eq!(n, 20);
    let pids = read_pids(&rec);
    assert_eq!(pids.len(), 1, "started {} times: {pids:?}", pids.len());
}

// ---------------------------------------------------------------- failures

fn assert_all_failed(
    results: &[(String, String, f64)],
    want: &str,
    text_has: &str,
    cause: f64,
    within_s: f64,
    label: &str,
) {
    assert!(!results.is_empty());
    let mut worst: f64 = 0.0;
    for (name, text, at) in results {
        assert_eq!(name, want, "{label}: {text}");
        assert!(
            text.contains(text_has),
            "{label}: {text:?} lacks {text_has:?}"
        );
        let lag = at - cause;
        worst = worst.max(lag);
        assert!(lag < within_s, "{label}: error {lag:.3}s after its cause");
    }
    eprintln!(
        "measured: {label}: {} waiters got {want}, at most {:.0} ms after the cause",
        results.len(),
        worst * 1000.0
    );
}

/// A program that does not exist: Spawn.ExecFailed for every waiter at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_failure_reaches_every_waiter_as_exec_failed() {
    if is_reference() {
        return; // busvisor-only: its services come from busvisor's --services-dir
    }
    let b = ActBus::new(|d| {
        write_def(
            d,
            "missing",
            "org.busvisor.Missing",
            &["/nonexistent/busvisor-no-such-program", "x"],
            "",
        )
    });
    let cause = epoch_now();
    let r = concurrent_failures(b.addr(), "org.busvisor.Missing", 3, 2).await;
    assert_all_failed(
        &r,
        &format!("{ERR}Spawn.ExecFailed"),
        "busvisor-no-such-program",
        cause,
        1.0,
        "exec failure",
    );
    // A bare program name that is not in PATH fails the same way.
    std::fs::write(
        b.dir.join("missing2.toml"),
        "name = \"org.busvisor.Missing2\"\nexec = [\"busvisor-no-such-program-in-path\"]\n",
    )
    .unwrap();
    let conn = connect(b.addr()).await;
    bus_call(&conn, "ReloadConfig", &()).await.unwrap();
    let e = call(&conn, "org.busvisor.Missing2", "Pid")
        .await
        .unwrap_err();
    assert_eq!(err_name(&e), format!("{ERR}Spawn.ExecFailed"), "{e}");
}

/// Exit 3 before taking the name: Spawn.ChildExited "…status 3" to every
/// waiter (calls and StartServiceByName), within a second of the exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_before_the_name_reaches_every_waiter_as_child_exited() {
    if is_reference() {
        return; // busvisor-only: its services come from busvisor's --services-dir
    }
    let b = ActBus::new(|_| {});
    let when = b.file("exit-time");
    b.define(
        "exit3",
        "org.busvisor.Exit3",
        &[&fixture("exit3.sh"), when.to_str().unwrap(), "0.5"],
        "",
    )
    .await;
    let r = concurrent_failures(b.addr(), "org.busvisor.Exit3", 4, 2).await;
    let cause = read_epoch(&when);
    assert_all_failed(
        &r,
        &format!("{ERR}Spawn.ChildExited"),
        "status 3",
        cause,
        1.0,
        "exit 3",
    );
}

/// Killed by a signal before taking the name: Spawn.ChildSignaled with the
/// signal number, for SIGSEGV and SIGKILL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signal_before_the_name_reaches_every_waiter_as_child_signaled() {
    if is_reference() {
        return; // busvisor-only: its services come from busvisor's --services-dir
    }
    let b = ActBus::new(|_| {});
    for (sig, num) in [("SEGV", 11), ("KILL", 9)] {
        let when = b.file(&format!("kill-time-{sig}"));
        let name = format!("org.busvisor.Kill{sig}");
        write_def(
            &b.dir,
            &format!("kill{sig}"),
            &name,
            &[&fixture("selfkill.sh"), when.to_str().unwrap(), sig, "0.5"],
            "",
        );
        bus_call(&connect(b.addr()).await, "ReloadConfig", &())
            .await
            .unwrap();
        let r = concurrent_failures(b.addr(), &name, 3, 2).await;
        let cause = read_epoch(&when);
        assert_all_failed(
            &r,
            &format!("{ERR}Spawn.ChildSignaled"),
            &format!("signal {num}"),
            cause,
            1.0,
            &format!("SIG{sig}"),
        );
    }
}

/// Never takes its name: TimedOut after start_timeout (1s) for every
/// waiter, and the process is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_taking_the_name_times_out_and_the_process_is_killed() {
    if is_reference() {
        return; // busvisor-only: its services come from busvisor's --services-dir
    }
    let b = ActBus::new(|_| {});
    let pidfile = b.file("noname.pid");
    b.define(
        "noname",
        "org.busvisor.NoName",
        &[&fixture("noname.sh"), pidfile.to_str().unwrap()],
        "start_timeout = \"1s\"\nrestart = \"no\"",
    )
    .await;
    let t0 = epoch_now();
    let r = concurrent_failures(b.addr(), "org.busvisor.NoName", 3, 2).await;
    for (_, _, at) in &r {
        let took = at - t0;
        assert!(
            (0.9..2.5).contains(&took),
            "TimedOut after {took:.3}s, want about 1s"
        );
    }
    assert_all_failed(
        &r,
        &format!("{ERR}TimedOut"),
        "timed out",
        t0,
        2.5,
        "start timeout 1s",
    );
    let pid = read_pid_file(&pidfile);
    assert!(
        wait_until(Duration::from_secs(3), || pid_gone(pid)),
        "the service {pid} was not killed"
    );
}

/// A slow start (1.5 s before taking the name) is waited for, by a call and
/// by StartServiceByName alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_start_is_waited_for() {
    if is_reference() {
        return; // busvisor-only: its services come from busvisor's --services-dir
    }
    let b = ActBus::new(|d| {
        write_testsvc(
            d,
            "slow",
            "org.busvisor.Slow",
            &["--delay", "1.5"],
            "start_timeout = \"5s\"",
        )
    });
    let c1 = connect(b.addr()).await;
    let c2 = connect(b.addr()).await;
    let t = Instant::now();
    let (pid, started) = tokio::join!(call_pid(&c1, "org.busvisor.Slow"), async {
        // Join the start that c1's call began.
        let deadline = Instant::now() + Duration::from_secs(5);
        while service_state(&c2, "org.busvisor.Slow").await != "activating" {
            assert!(
                Instant::now() < deadline,
                "the call did not start the service"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        bus_ok::<_, u32>(&c2, "StartServiceByName", &("org.busvisor.Slow", 0u32)).await
    });
    let took = t.elapsed();
    eprintln!("measured: slow start (1.5s sleep) answered after {took:?}");
    assert!(took >= Duration::from_millis(1500));
    assert_eq!(started, 1);
    assert!(pid_alive(pid));
}

/// A double-forked daemon that dies (exit 3) before taking its name, after
/// its launcher exited 0. dbus-daemon, which only watches the launcher,
/// would wait for the start timeout; busvisor tracks the whole tree (its
/// design promises immediate typed failures), so the waiters should hear of
/// it at once, not after start_timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_dying_before_its_name_fails_the_waiters_at_once() {
    if is_reference() {
        return; // busvisor-only: its services come from busvisor's --services-dir
    }
    let b = ActBus::new(|_| {});
    let when = b.file("daemon-exit-time");
    b.define(
        "forkfail",
        "org.busvisor.ForkFail",
        &[&fixture("forkfail.sh"), when.to_str().unwrap(), "0.5"],
        "start_timeout = \"5s\"\nrestart = \"no\"",
    )
    .await;
    let r = concurrent_failures(b.addr(), "org.busvisor.ForkFail", 2, 1).await;
    let cause = read_epoch(&when);
    assert_all_failed(
        &r,
        &format!("{ERR}Spawn.ChildExited"),
        "status 3",
        cause,
        1.0,
        "daemon exit 3",
    );
}

/// max_pending_service_starts = 3: the fourth concurrent request for a
/// starting service gets LimitsExceeded; the three others are answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_activation_limit_gives_limits_exceeded() {
    if is_reference() {
        return; // busvisor-only: its services come from busvisor's --services-dir
    }
    let cfg = config_xml(&[("max_pending_service_starts", 3)]);
    let b = ActBus::with(
        |d| write_testsvc(d, "slow", "org.busvisor.Slow", &["--delay", "1"], ""),
        Some(&cfg),
        &[],
    );
    // Three calls pipelined on one connection, then a driver round trip on
    // it: the bus routes a connection's messages in order, so when GetId is
    // answered all three wait in the activation queue.
    let first = connect(b.addr()).await;
    let fourth = connect(b.addr()).await;
    let mut s = stream(&first);
    let mut serials = Vec::new();
    for _ in 0..3 {
        let m = Message::method_call(TEST_PATH, "Pid")
            .destination("org.busvisor.Slow")
            .interface(TEST_IFACE)
            .build(&())
            .unwrap();
        serials.push(m.primary_header().serial_num());
        within(first.send(&m)).await.unwrap();
    }
    bus_call(&first, "GetId", &()).await.unwrap();
    let e = call(&fourth, "org.busvisor.Slow", "Pid").await.unwrap_err();
    assert_eq!(err_name(&e), format!("{ERR}LimitsExceeded"), "{e}");
    assert!(err_text(&e).contains("max_pending_service_starts=3"), "{e}");
    let mut pids = Vec::new();
    for serial in serials {
        let r = next_matching(&mut s, Duration::from_secs(10), |m| {
            m.header().reply_serial() == Some(serial)
        })
        .await
        .expect("a reply for each queued call");
        assert_eq!(r.message_type(), zbus::message::Type::MethodReturn, "{r:?}");
        pids.push(r.body().deserialize::<u32>().unwrap());
    }
    pids.dedup();
    assert_eq!(pids.len(), 1);
}

/// dbus-daemon runs a `[D-BUS Service]` Exec= without PATH search: a bare
/// program name fails with Spawn.ExecFailed (checked on dbus-daemon 1.14.10).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dbus_service_file_exec_is_not_searched_in_path() {
    if is_reference() {
        return; // busvisor-only: its services come from busvisor's --services-dir
    }
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("org.busvisor.Rel.service"),
        format!(
            "[D-BUS Service]\nName=org.busvisor.Rel\nExec=python3 {} org.busvisor.Rel\n",
            fixture("testsvc.py")
        ),
    )
    .unwrap();
    let cfg = config_xml(&[]).replace(
        "</busconfig>",
        &format!(
            "  <servicedir>{}</servicedir>\n</busconfig>",
            tmp.path().display()
        ),
    );
    let b = ActBus::with(|_| {}, Some(&cfg), &[]);
    let conn = connect(b.addr()).await;
    let e = call(&conn, "org.busvisor.Rel", "Pid").await.unwrap_err();
    assert_eq!(err_name(&e), format!("{ERR}Spawn.ExecFailed"), "{e}");
}

// ---------------------------------------------------------------- restart

/// restart = "always": a clean exit (Quit) is followed by a new instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_always_brings_a_cleanly_exited_service_back() {
    if is_reference() {
        return; // busvisor-only: its services come from busvisor's --services-dir
    }
    let b = ActBus::new(|_| {});
    let rec = b.file("starts");
    write_testsvc(
        &b.dir,
        "always",
        "org.busvisor.Always",
        &["--record", rec.to_str().unwrap()],
        "restart = \"always\"\nrestart_delay = \"100ms\"",
    );
    let conn = connect(b.addr()).await;
    bus_call(&conn, "ReloadConfig", &()).await.unwrap();
    let pid1 = call_pid(&conn, "org.busvisor.Always").await;
    call(&conn, "org.busvisor.Always", "Quit").await.unwrap();
    let t = Instant::now();
    // Restarted without any call asking for it.
    assert!(
        wait_until(Duration::from_secs(5), || read_pids(&rec).len() == 2),
        "not restarted: {:?}",
        read_pids(&rec)
    );
    eprintln!(
        "measured: restart=always clean exit -> new process: {:?}",
        t.elapsed()
    );
    let pid2 = call_pid(&conn, "org.busvisor.Always").await;
    assert_ne!(pid1, pid2);
    assert_eq!(read_pids(&rec), vec![pid1, pid2]);
}

/// Backoff: a restart that fails before taking the name is retried, the
/// delay doubling each time (restart_delay 200ms: 200, 400 ms), until the
/// service comes up; the call made after the crash is answered then.
/// (systemd with RestartSteps and s6 keep retrying until the start limit.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_restarts_are_retried_with_a_doubling_delay() {
    if is_reference() {
        return; // busvisor-only: its services come from busvisor's --services-dir
    }
    let b = ActBus::new(|_| {});
    let state = b.bus.dir.path().to_path_buf();
    write_def(
        &b.dir,
        "flaky",
        "org.busvisor.Flaky",
        &[
            &fixture("flaky.sh"),
            state.to_str().unwrap(),
            "org.busvisor.Flaky",
            "2",
        ],
        "restart = \"on-failure\"\nrestart_delay = \"200ms\"\nrestart_delay_max = \"5s\"",
    );
    let conn = connect(b.addr()).await;
    bus_call(&conn, "ReloadConfig", &()).await.unwrap();
    let _ = call_pid(&conn, "org.busvisor.Flaky").await;
    let crash = within(conn.call_method(
        Some("org.busvisor.Flaky"),
        TEST_PATH,
        Some(TEST_IFACE),
        "Exit",
        &(1i32,),
    ))
    .await;
    assert!(crash.is_err());
    let r = call(&conn, "org.busvisor.Flaky", "Pid").await;
    let starts: Vec<f64> = std::fs::read_to_string(state.join("starts"))
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    eprintln!("measured: start times {starts:?}");
    let r = r.unwrap_or_else(|e| panic!("call after the crash failed: {e}"));
    let _: u32 = r.body().deserialize().unwrap();
    assert_eq!(starts.len(), 4, "{starts:?}");
    let gap1 = starts[2] - starts[1];
    let gap2 = starts[3] - starts[2];
    assert!(
        gap2 > gap1 * 1.5,
        "delay did not grow: {gap1:.3}s then {gap2:.3}s"
    );
}

/// The start-rate limit: burst 3 within 10s. After the third start the next
/// crash leaves the service failed; calls and StartServiceByName then fail at
/// once with a clear error naming the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_limit_ends_in_failed_with_a_clear_error() {
    if is_reference() {
        return; // busvisor-only: its services come from busvisor's --services-dir
    }
    let b = ActBus::new(|_| {});
    let rec = b.file("starts");
    write_testsvc(
        &b.dir,
        "limited",
        "org.busvisor.Limited",
        &["--record", rec.to_str().unwrap()],
        "restart = \"on-failure\"\nrestart_delay = \"50ms\"\nstart_limit = { burst = 3, interval = \"10s\" }",
    );
    let conn = connect(b.addr()).await;
    bus_call(&conn, "ReloadConfig", &()).await.unwrap();
    for i in 0..3 {
        let pid = call_pid(&conn, "org.busvisor.Limited").await;
        assert_eq!(read_pids(&rec).len(), i + 1);
        let r = within(conn.call_method(
            Some("org.busvisor.Limited"),
            TEST_PATH,
            Some(TEST_IFACE),
            "Exit",
            &(1i32,),
        ))
        .await;
        assert_eq!(err_name(&r.unwrap_err()), format!("{ERR}NoReply"));
        assert!(wait_until(Duration::from_secs(3), || pid_gone(pid)));
    }
    // Wait for the event that matters: the limit turned the service failed.
    let deadline = Instant::now() + Duration::from_secs(5);
    while service_state(&conn, "org.busvisor.Limited").await != "failed" {
        assert!(Instant::now() < deadline, "the service never became failed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(read_pids(&rec).len(), 3, "started again after the limit");
    let t = Instant::now();
    let e = call(&conn, "org.busvisor.Limited", "Pid")
        .await
        .unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "the call waited {:?}",
        t.elapsed()
    );
    assert_eq!(err_name(&e), format!("{ERR}Failed"), "{e}");
    let text = err_text(&e);
    assert!(
        text.contains("start limit") && text.contains("limited"),
        "unclear error: {text:?}"
    );
    let e = bus_call(&conn, "StartServiceByName", &("org.busvisor.Limited", 0u32))
        .await
        .unwrap_err();
    assert_eq!(err_name(&e), format!("{ERR}Failed"), "{e}");
    // busctl shows the text to a person.
    let out = busctl(
        b.addr(),
        &["call", "org.busvisor.Limited", TEST_PATH, TEST_IFACE, "Pid"],
    );
    assert!(
        !out.success() && out.stderr.contains("start limit"),
        "{out:?}"
    );
    eprintln!("measured: busctl says: {}", out.stderr.trim());
    assert_eq!(read_pids(&rec).len(), 3);
    // An explicit start (control API) clears the limit.
    busctl(
        b.addr(),
        &[
            "call",
            "org.busvisor.Supervisor1",
            "/org/busvisor/Supervisor1",
            "org.busvisor.Supervisor1",
            "Start",
            "s",
            "limited",
        ],
    )
    .assert_ok();
    let pid = call_pid(&conn, "org.busvisor.Limited").await;
    assert_eq!(read_pids(&rec).last(), Some(&pid));
    assert_eq!(read_pids(&rec).len(), 4);
}

// ---------------------------------------------------------------- environment

/// The environment of a service: DBUS_STARTER_ADDRESS, DBUS_STARTER_BUS_TYPE,
/// DBUS_SESSION_BUS_ADDRESS, BUSVISOR_INVOCATION, busvisor's own environment
/// minus INVOCATION_ID/NOTIFY_SOCKET/LISTEN_*, UpdateActivationEnvironment
/// values (for services started after the update only), and the
/// definition's `environment`, which wins over both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_get_the_starter_and_activation_environment() {
    if is_reference() {
        return; // busvisor-only: its services come from busvisor's --services-dir
    }
    let b = ActBus::with(
        |d| {
            write_testsvc(d, "early", "org.busvisor.Early", &[], "");
            write_testsvc(
                d,
                "late",
                "org.busvisor.Late",
                &[],
                "environment = { OWN_VAR = \"own\", SHARED = \"from-definition\" }",
            );
        },
        None,
        &[
            ("BUS_INHERITED", "inherited"),
            ("INVOCATION_ID", "x"),
            ("NOTIFY_SOCKET", "/x"),
            ("LISTEN_FDS", "3"),
        ],
    );
    let conn = connect(b.addr()).await;
    // Started before the update.
    let _ = call_pid(&conn, "org.busvisor.Early").await;
    let mut update = std::collections::HashMap::new();
    update.insert("ACT_VAR", "activation");
    update.insert("SHARED", "from-update");
    bus_call(&conn, "UpdateActivationEnvironment", &(update,))
        .await
        .unwrap();

    let e = |n: &'static str, v: &'static str| (n, v);
    for (svc, checks) in [
        (
            "org.busvisor.Early",
            vec![e("ACT_VAR", "<unset>"), e("SHARED", "<unset>")],
        ),
        (
            "org.busvisor.Late",
            vec![
                e("ACT_VAR", "activation"),
                e("SHARED", "from-definition"),
                e("OWN_VAR", "own"),
            ],
        ),
    ] {
        for (var, want) in checks {
            assert_eq!(env_of(&conn, svc, var).await, want, "{svc} {var}");
        }
        for (var, want) in [
            ("DBUS_STARTER_ADDRESS", b.addr()),
            ("DBUS_SESSION_BUS_ADDRESS", b.addr()),
            ("DBUS_STARTER_BUS_TYPE", "session"),
            ("BUS_INHERITED", "inherited"),
            ("INVOCATION_ID", "<unset>"),
            ("NOTIFY_SOCKET", "<unset>"),
            ("LISTEN_FDS", "<unset>"),
        ] {
            assert_eq!(env_of(&conn, svc, var).await, want, "{svc} {var}");
        }
        let token = env_of(&conn, svc, "BUSVISOR_INVOCATION").await;
        assert!(
            token.contains(&format!("-{}-", b.pid())),
            "{svc} token {token:?}"
        );
    }
    // The same value through gdbus, as a person would check it.
    let out = gdbus_call(
        b.addr(),
        "org.busvisor.Late",
        TEST_PATH,
        "org.busvisor.Test.Env",
        &["ACT_VAR"],
    );
    assert_eq!(out.assert_ok().stdout.trim(), "('activation',)");
}

// ---------------------------------------------------------------- output

/// What a service prints to stdout and stderr lands in busvisor's log,
/// tagged with the service id and its pid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_output_is_logged_with_service_and_pid() {
    if is_reference() {
        return; // busvisor-only: its services come from busvisor's --services-dir
    }
    let b = ActBus::new(|d| {
        write_testsvc(
            d,
            "talker",
            "org.busvisor.Talker",
            &["--say", "marker-7f3a hello"],
            "",
        )
    });
    let conn = connect(b.addr()).await;
    let pid = call_pid(&conn, "org.busvisor.Talker").await;
    let found = |needle: &str| {
        let tagged = format!("{needle} service=");
        b.bus
            .log()
            .lines()
            .find(|l| l.contains(&tagged))
            .map(str::to_owned)
    };
    assert!(wait_until(Duration::from_secs(3), || found(
        "marker-7f3a hello (stderr)"
    )
    .is_some()));
    for needle in ["marker-7f3a hello", "marker-7f3a hello (stderr)"] {
        let line = found(needle).unwrap_or_else(|| panic!("{needle:?} not in the log"));
        assert!(
            line.contains("service=talker") || line.contains("service=\"talker\""),
            "untagged: {line}"
        );
        assert!(line.contains(&format!("pid={pid}")), "no pid: {line}");
        eprintln!("measured: log line: {line}");
    }
}

// ---------------------------------------------------------------- idle

/// idle_timeout = "1s": the process goes away after a second without
/// traffic; the next call starts a new one and is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_service_exits_and_the_next_call_activates_it_again() {
    if is_reference() {
        return; // busvisor-only: its services come from busvisor's --services-dir
    }
    let b = ActBus::new(|_| {});
    let rec = b.file("starts");
    write_testsvc(
        &b.dir,
        "idle",
        "org.busvisor.Idle",
        &["--record", rec.to_str().unwrap()],
        "idle_timeout = \"1s\"",
    );
    let conn = connect(b.addr()).await;
    bus_call(&conn, "ReloadConfig", &()).await.unwrap();
    let pid1 = call_pid(&conn, "org.busvisor.Idle").await;
    let busy = Instant::now();
    // Busy for 2 s: calls every 300 ms keep it alive.
    let mut last_call = Instant::now();
    while busy.elapsed() < Duration::from_millis(2000) {
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            call_pid(&conn, "org.busvisor.Idle").await,
            pid1,
            "stopped while busy"
        );
        last_call = Instant::now();
    }
    assert!(
        wait_until(Duration::from_secs(5), || pid_gone(pid1)),
        "idle service {pid1} still there"
    );
    let gone_after = last_call.elapsed();
    eprintln!("measured: idle_timeout 1s -> process gone {gone_after:?} after the last call");
    assert!(
        gone_after >= Duration::from_millis(950),
        "stopped too early: {gone_after:?}"
    );
    let has: bool = bus_ok(&conn, "NameHasOwner", &("org.busvisor.Idle",)).await;
    assert!(!has);
    let pid2 = call_pid(&conn, "org.busvisor.Idle").await;
    assert_ne!(pid1, pid2);
    assert_eq!(read_pids(&rec), vec![pid1, pid2]);
}

// ---------------------------------------------------------------- reload

/// A client calling ReloadConfig in a loop: every call is answered, the
/// definitions are read far fewer times than asked (calls that arrive
/// during a scan share the next one), and other clients are not held up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_config_flood_is_coalesced() {
    if is_reference() {
        return; // busvisor-only: its services come from busvisor's --services-dir
    }
    let b = ActBus::new(|d| {
        for i in 0..50 {
            write_testsvc(d, &format!("s{i}"), &format!("org.busvisor.S{i}"), &[], "");
        }
    });
    let flooder = connect(b.addr()).await;
    let other = connect(b.addr()).await;
    const N: usize = 300;
    let started = Instant::now();
    let calls: Vec<_> = (0..N)
        .map(|_| {
            let c = flooder.clone();
            tokio::spawn(async move { bus_call(&c, "ReloadConfig", &()).await })
        })
        .collect();
    // Meanwhile another client's calls keep being answered.
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let t = Instant::now();
        let _: String = bus_ok(&other, "GetId", &()).await;
        slowest = slowest.max(t.elapsed());
    }
    for c in calls {
        within(c).await.unwrap().expect("ReloadConfig answered");
    }
    let elapsed = started.elapsed();
    let scans = b.bus.log().matches("service definitions loaded").count();
    eprintln!(
        "measured: {N} ReloadConfig calls in {elapsed:?}, {scans} scans; slowest GetId meanwhile {slowest:?}"
    );
    // One scan at start, then at most a few per batch of waiting callers.
    assert!(scans > 1 && scans < N / 4, "{scans} scans for {N} calls");
    let names = bus_ok::<_, Vec<String>>(&other, "ListActivatableNames", &()).await;
    assert!(names.contains(&"org.busvisor.S49".to_owned()));
}

/// SIGHUP re-reads the definitions (the files are read without the routing
/// lock) and broadcasts ActivatableServicesChanged. The directory does not
/// exist when the bus starts, so it is not watched: only the signal finds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_definitions() {
    if is_reference() {
        return; // busvisor-only: its services come from busvisor's --services-dir
    }
    // A <servicedir> that is missing at start is not watched (a missing
    // --services-dir is an error): only SIGHUP reads what comes into it.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("later");
    let extra = format!("<servicedir>{}</servicedir>", dir.display());
    let bus = start_bus_with_env(Some(&config_with(ALLOW_ALL_RULES, &extra)), &[], &[]);
    let c = connect(&bus.address).await;
    add_match(&c, "type='signal',member='ActivatableServicesChanged'").await;
    let mut s = stream(&c);
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(
        dir.join("org.busvisor.Late.service"),
        "[D-BUS Service]\nName=org.busvisor.Late\nExec=/bin/true\n",
    )
    .unwrap();
    let names = bus_ok::<_, Vec<String>>(&c, "ListActivatableNames", &()).await;
    assert!(
        !names.contains(&"org.busvisor.Late".to_owned()),
        "{names:?}"
    );
    let t = Instant::now();
    bus.proc.signal(Signal::SIGHUP);
    let sig = next_matching(&mut s, OP_TIMEOUT, |m| {
        is_signal(m, "ActivatableServicesChanged")
    })
    .await;
    assert!(sig.is_some(), "no ActivatableServicesChanged after SIGHUP");
    eprintln!(
        "measured: SIGHUP -> ActivatableServicesChanged: {:?}",
        t.elapsed()
    );
    let names = bus_ok::<_, Vec<String>>(&c, "ListActivatableNames", &()).await;
    assert!(names.contains(&"org.busvisor.Late".to_owned()), "{names:?}");
}

/// A new definition file is picked up (the directory is watched), and
/// ReloadConfig re-reads the definitions and broadcasts
/// ActivatableServicesChanged, even when nothing changed (as dbus-daemon).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_config_picks_up_a_new_file_and_broadcasts_the_change() {
    if is_reference() {
        return; // busvisor-only: its services come from busvisor's --services-dir
    }
    let b = ActBus::new(|d| write_testsvc(d, "a", "org.busvisor.A", &[], ""));
    let watcher = connect(b.addr()).await;
    add_match(&watcher, "type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',member='ActivatableServicesChanged'").await;
    let mut s = stream(&watcher);
    let list = |c: zbus::Connection| async move {
        bus_ok::<_, Vec<String>>(&c, "ListActivatableNames", &()).await
    };
    let names = list(watcher.clone()).await;
    assert!(
        names.contains(&"org.busvisor.A".to_owned())
            && !names.contains(&"org.busvisor.B".to_owned())
    );

    // A new file: found by the directory watch.
    let t = Instant::now();
    write_testsvc(&b.dir, "b", "org.busvisor.B", &[], "");
    let sig = next_matching(&mut s, Duration::from_secs(3), |m| {
        is_signal(m, "ActivatableServicesChanged")
    })
    .await;
    assert!(
        sig.is_some(),
        "no ActivatableServicesChanged after adding a file"
    );
    eprintln!(
        "measured: new file -> ActivatableServicesChanged (inotify): {:?}",
        t.elapsed()
    );
    assert!(
        list(watcher.clone())
            .await
            .contains(&"org.busvisor.B".to_owned())
    );
    let _ = collect_for(&mut s, Duration::from_millis(300), |_| false).await;

    // An explicit ReloadConfig (gdbus) broadcasts too; dbus-monitor sees it.
    let monitor_out = b.file("monitor.txt");
    let mut monitor = spawn_tool(
        "dbus-monitor",
        &[
            "--address",
            b.addr(),
            "type='signal',member='ActivatableServicesChanged'",
        ],
        &monitor_out,
    );
    // A monitor gets NameLost for its own name once it is one: from then on
    // it sees everything.
    assert!(
        wait_until(OP_TIMEOUT, || std::fs::read_to_string(&monitor_out)
            .unwrap_or_default()
            .contains("member=NameLost")),
        "dbus-monitor did not become a monitor"
    );
    let t = Instant::now();
    let out = gdbus_call(
        b.addr(),
        "org.freedesktop.DBus",
        "/org/freedesktop/DBus",
        "org.freedesktop.DBus.ReloadConfig",
        &[],
    );
    out.assert_ok();
    let sig = next_matching(&mut s, Duration::from_secs(3), |m| {
        is_signal(m, "ActivatableServicesChanged")
    })
    .await;
    assert!(
        sig.is_some(),
        "no ActivatableServicesChanged after ReloadConfig"
    );
    eprintln!(
        "measured: ReloadConfig -> ActivatableServicesChanged: {:?}",
        t.elapsed()
    );
    assert!(
        wait_until(Duration::from_secs(3), || std::fs::read_to_string(
            &monitor_out
        )
        .is_ok_and(|t| t.contains("member=ActivatableServicesChanged"))),
        "dbus-monitor saw no signal"
    );
    monitor.signal(Signal::SIGTERM);
    let _ = monitor.wait_timeout(Duration::from_secs(2));
    // The new service works.
    let pid = call_pid(&watcher, "org.busvisor.B").await;
    assert!(pid_alive(pid));
    // A removed file goes away from the list.
    std::fs::remove_file(b.dir.join("a.toml")).unwrap();
    bus_call(&watcher, "ReloadConfig", &()).await.unwrap();
    let names = list(watcher.clone()).await;
    assert!(!names.contains(&"org.busvisor.A".to_owned()), "{names:?}");
}

/// dbus-daemon rescans its service directories when a name is not found
/// (activation.c: a lookup miss reloads), so a definition added after start
/// works without ReloadConfig.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_file_is_found_without_reload_on_a_lookup_miss() {
    if is_reference() {
        return; // busvisor-only: its services come from busvisor's --services-dir
    }
    let b = ActBus::new(|_| {});
    let conn = connect(b.addr()).await;
    write_testsvc(&b.dir, "late", "org.busvisor.LateFile", &[], "");
    let pid = call_pid(&conn, "org.busvisor.LateFile").await;
    assert!(pid_alive(pid));
}

// ---------------------------------------------------------------- .service files

/// A `[D-BUS Service]` file in a `<servicedir>` of the XML configuration,
/// with Exec= quoting: the argv reaches the program exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dbus_service_file_in_a_config_servicedir_with_exec_quoting() {
    if is_reference() {
        return; // busvisor-only: its services come from busvisor's --services-dir
    }
    let tmp = tempfile::tempdir().unwrap();
    let sdir = tmp.path().join("dbus-1 services");
    std::fs::create_dir(&sdir).unwrap();
    let python = which("python3");
    std::fs::write(
        sdir.join("org.busvisor.Quoted.service"),
        format!(
            // Two layers: the desktop-file escapes (`\\` is one backslash)
            // then the shell-like quoting of Exec=.
            r#"[D-BUS Service]
# a comment
Name=org.busvisor.Quoted
Exec={python} "{}" org.busvisor.Quoted 'two words' "a \\"q\\" b" back\\ slash   'it''s'
"#,
            fixture("testsvc.py")
        ),
    )
    .unwrap();
    let cfg = config_xml(&[]).replace(
        "</busconfig>",
        &format!(
            "  <servicedir>{}</servicedir>\n</busconfig>",
            sdir.display()
        ),
    );
    let b = ActBus::with(|_| {}, Some(&cfg), &[]);
    let conn = connect(b.addr()).await;
    let names: Vec<String> = bus_ok(&conn, "ListActivatableNames", &()).await;
    assert!(
        names.contains(&"org.busvisor.Quoted".to_owned()),
        "{names:?}"
    );
    let m = call(&conn, "org.busvisor.Quoted", "Args").await.unwrap();
    let args: Vec<String> = m.body().deserialize().unwrap();
    assert_eq!(
        args,
        [
            "org.busvisor.Quoted",
            "two words",
            "a \"q\" b",
            "back slash",
            "its"
        ]
    );
    // A .service file's working directory is busvisor's, as with dbus-daemon.
    let pid = call_pid(&conn, "org.busvisor.Quoted").await;
    assert!(pid_alive(pid));
    // Reaches busctl too.
    busctl(
        b.addr(),
        &[
            "call",
            "org.busvisor.Quoted",
            TEST_PATH,
            TEST_IFACE,
            "Echo",
            "s",
            "q",
        ],
    )
    .assert_ok();
}

// ---------------------------------------------------------------- shutdown

/// SIGTERM to busvisor stops every service, including a double-forked
/// daemon, setsid() grandchildren, and a service that ignores SIGTERM
/// (SIGKILL after stop_timeout); busvisor then exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_every_service_and_setsid_grandchild_then_exits_0() {
    if is_reference() {
        return; // busvisor-only: its services come from busvisor's --services-dir
    }
    let mut b = ActBus::new(|_| {});
    let g1 = b.file("g1");
    let g2 = b.file("g2");
    write_testsvc(
        &b.dir,
        "tree",
        "org.busvisor.Tree",
        &["--grandchild", g1.to_str().unwrap()],
        "",
    );
    write_testsvc(
        &b.dir,
        "stubborn",
        "org.busvisor.Stubborn",
        &["--ignore-term", "--grandchild", g2.to_str().unwrap()],
        "stop_timeout = \"1s\"",
    );
    std::fs::copy(format!("{EXAMPLES}/daemon.py"), b.dir.join("daemon.py")).unwrap();
    std::fs::copy(format!("{EXAMPLES}/minibus.py"), b.dir.join("minibus.py")).unwrap();
    std::fs::copy(format!("{EXAMPLES}/daemon.toml"), b.dir.join("daemon.toml")).unwrap();
    let conn = connect(b.addr()).await;
    bus_call(&conn, "ReloadConfig", &()).await.unwrap();
    let mut pids = vec![
        call_pid(&conn, "org.busvisor.Tree").await,
        call_pid(&conn, "org.busvisor.Stubborn").await,
        read_pid_file(&g1),
        read_pid_file(&g2),
    ];
    let m = within(conn.call_method(
        Some("org.busvisor.Example.Daemon"),
        "/org/busvisor/Example/Daemon",
        Some("org.busvisor.Example.Daemon"),
        "Pid",
        &(),
    ))
    .await
    .unwrap();
    pids.push(m.body().deserialize().unwrap());
    let _guard = PidGuard { pids: pids.clone() };
    for p in &pids {
        assert!(pid_alive(*p), "{p} not running");
    }
    drop(conn);
    let t = Instant::now();
    b.bus.proc.signal(Signal::SIGTERM);
    let status = b
        .bus
        .proc
        .wait_timeout(Duration::from_secs(10))
        .expect("busvisor did not exit after SIGTERM");
    eprintln!(
        "measured: SIGTERM -> busvisor exit (one service ignores SIGTERM, stop_timeout 1s): {:?}",
        t.elapsed()
    );
    assert_eq!(
        status.code(),
        Some(0),
        "busvisor exit status; log:\n{}",
        b.bus.log()
    );
    let left: Vec<u32> = pids.iter().copied().filter(|p| !pid_gone(*p)).collect();
    assert!(left.is_empty(), "survived busvisor: {left:?}");
    assert!(
        service_pids_of(b.pid()).is_empty(),
        "tokened processes survive: {:?}",
        service_pids_of(b.pid())
    );
}

/// `busvisor run --services-dir D -- sh -c '...'`: the command calls an
/// activated service (which leaves a setsid grandchild); when it ends,
/// busvisor exits with its status and leaves no process behind.
#[test]
fn busvisor_run_leaves_no_process_behind() {
    if is_reference() {
        return; // busvisor-only: its services come from busvisor's --services-dir
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("services");
    std::fs::create_dir(&dir).unwrap();
    let g = tmp.path().join("grandchild");
    let rec = tmp.path().join("starts");
    write_testsvc(
        &dir,
        "t",
        "org.busvisor.T",
        &[
            "--grandchild",
            g.to_str().unwrap(),
            "--record",
            rec.to_str().unwrap(),
        ],
        "",
    );
    let script = format!(
        "busctl --address=\"$DBUS_SESSION_BUS_ADDRESS\" call org.busvisor.T {TEST_PATH} {TEST_IFACE} Echo s hi || exit 10; \
         gdbus call --session --dest org.busvisor.T --object-path {TEST_PATH} --method {TEST_IFACE}.Echo hi || exit 11; \
         exit 5"
    );
    let out = run_tool(
        busvisor_bin(),
        &[
            "run",
            "--services-dir",
            dir.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            &script,
        ],
        Duration::from_secs(20),
    );
    let svc = read_pids(&rec);
    let mut guard = PidGuard { pids: svc.clone() };
    if let Ok(s) = std::fs::read_to_string(&g) {
        guard.add(s.trim().parse().unwrap());
    }
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    assert!(
        out.stdout.contains("s \"hi\"") && out.stdout.contains("('hi',)"),
        "{out:?}"
    );
    assert_eq!(svc.len(), 1, "{svc:?}");
    let left: Vec<u32> = guard
        .pids
        .iter()
        .copied()
        .filter(|p| !pid_gone(*p))
        .collect();
    assert!(left.is_empty(), "left behind by busvisor run: {left:?}");
}

/// A message that arrives while a service is being stopped on request,
/// after its name went but before its last process is gone, waits and
/// starts a new instance once the stop completes (it used to wait forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_during_a_requested_stop_starts_a_new_instance() {
    if is_reference() {
        return; // busvisor-only: its services come from busvisor's --services-dir
    }
    let tmp = tempfile::tempdir().unwrap();
    let g = tmp.path().join("grandchild");
    let b = ActBus::new(|dir| {
        write_testsvc(
            dir,
            "t",
            "org.busvisor.T",
            &[
                "--grandchild",
                g.to_str().unwrap(),
                "--grandchild-ignores-term",
            ],
            // Long enough that a loaded machine still looks within it.
            "stop_timeout = \"4s\"\n",
        )
    });
    let conn = connect(b.addr()).await;
    let pid1 = call_pid(&conn, "org.busvisor.T").await;
    let mut guard = PidGuard { pids: vec![pid1] };
    let grandchild: u32 = std::fs::read_to_string(&g).unwrap().trim().parse().unwrap();
    guard.add(grandchild);
    // Stop: the main process dies of SIGTERM (its name goes), the
    // grandchild holds the stop until its SIGKILL.
    let stopper = connect(b.addr()).await;
    let stop = tokio::spawn(async move {
        stopper
            .call_method(
                Some("org.busvisor.Supervisor1"),
                "/org/busvisor/Supervisor1",
                Some("org.busvisor.Supervisor1"),
                "Stop",
                &("t",),
            )
            .await
            .map(|_| ())
    });
    let gone = wait_until(OP_TIMEOUT, || pid_gone(pid1));
    assert!(gone, "the main process did not die of SIGTERM");
    let has: bool = bus_ok(&conn, "NameHasOwner", &("org.busvisor.T",)).await;
    assert!(!has, "the name should be gone with its owner");
    assert!(!pid_gone(grandchild), "the stop should still be waiting");
    let pid2 = call_pid(&conn, "org.busvisor.T").await;
    guard.add(pid2);
    assert_ne!(pid1, pid2, "a new instance answered");
    assert!(pid_gone(grandchild), "the old tree was gone first");
    within(stop).await.unwrap().expect("Stop answered");
}

/// Stop while an explicit Start waits for the service to come up: the Start
/// gets StartFailed at once instead of waiting forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_answers_a_pending_start() {
    if is_reference() {
        return; // busvisor-only: its services come from busvisor's --services-dir
    }
    let rec_dir = tempfile::tempdir().unwrap();
    let rec = rec_dir.path().join("starts");
    let b = ActBus::new(|dir| {
        write_testsvc(
            dir,
            "slow",
            "org.busvisor.Slow",
            &["--delay", "5", "--record", rec.to_str().unwrap()],
            "",
        )
    });
    let sup = |conn: zbus::Connection, member: &'static str| async move {
        conn.call_method(
            Some("org.busvisor.Supervisor1"),
            "/org/busvisor/Supervisor1",
            Some("org.busvisor.Supervisor1"),
            member,
            &("slow",),
        )
        .await
        .map(|_| ())
    };
    let start = tokio::spawn(sup(connect(b.addr()).await, "Start"));
    assert!(
        wait_until(OP_TIMEOUT, || !read_pids(&rec).is_empty()),
        "the service was not spawned"
    );
    let _guard = PidGuard {
        pids: read_pids(&rec),
    };
    within(sup(connect(b.addr()).await, "Stop"))
        .await
        .expect("Stop");
    let started = within(start).await.unwrap();
    let e = started.expect_err("the Start must fail");
    let zbus::Error::MethodError(name, _, _) = &e else {
        panic!("{e}")
    };
    assert_eq!(name.as_str(), "org.busvisor.Supervisor1.Error.StartFailed");
    assert!(err_text(&e).contains("stopped"), "{e}");
}
