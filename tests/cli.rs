//! The command line: `busvisor run -- CMD` (dbus-run-session) and the
//! dbus-daemon compatible flags.

mod common;

use std::time::Duration;

use common::*;

fn run_busvisor(args: &[&str]) -> ToolOutput {
    run_tool(busvisor_bin(), args, Duration::from_secs(20))
}

/// The socket path in a `unix:path=...` address, if it is one.
fn socket_path(address: &str) -> Option<std::path::PathBuf> {
    let rest = address.strip_prefix("unix:path=")?;
    Some(rest.split(',').next()?.into())
}

#[test]
fn run_exits_with_the_command_status() {
    let out = run_busvisor(&["run", "--", "sh", "-c", "exit 3"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let out = run_busvisor(&["run", "--", "true"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}

#[test]
fn run_reports_a_killed_command_as_128_plus_signal() {
    let out = run_busvisor(&["run", "--", "sh", "-c", "kill -TERM $$"]);
    assert_eq!(out.status.code(), Some(128 + 15), "{out:?}");
}

#[test]
fn run_with_a_missing_command_fails_clearly() {
    let out = run_busvisor(&["run", "--", "/nonexistent/busvisor-no-such-cmd"]);
    assert_eq!(out.status.code(), Some(127), "{out:?}");
    assert!(out.stderr.contains("busvisor-no-such-cmd"), "{out:?}");
}

#[test]
fn run_gives_the_command_a_working_bus_that_goes_away() {
    let script = r#"
        echo "ADDR=$DBUS_SESSION_BUS_ADDRESS"
        gdbus call --session --dest org.freedesktop.DBus --object-path /org/freedesktop/DBus \
            --method org.freedesktop.DBus.GetId || exit 11
        dbus-send --session --print-reply --dest=org.freedesktop.DBus /org/freedesktop/DBus \
            org.freedesktop.DBus.ListNames || exit 12
        gdbus call --session --dest org.freedesktop.DBus --object-path /org/freedesktop/DBus \
            --method org.freedesktop.DBus.RequestName org.busvisor.RunTest 0 || exit 13
        exit 7
    "#;
    let out = run_busvisor(&["run", "--", "sh", "-c", script]);
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    let addr = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("ADDR="))
        .expect("no address printed")
        .to_owned();
    assert!(
        addr.starts_with("unix:") && addr.contains("guid="),
        "{addr}"
    );
    // Not the machine's bus.
    assert_ne!(
        Some(addr.clone()),
        std::env::var("DBUS_SESSION_BUS_ADDRESS").ok()
    );
    // gdbus printed the bus id: 32 hex digits in ('...',).
    assert!(
        out.stdout.contains("('") && out.stdout.contains("',)"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("org.freedesktop.DBus"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("(uint32 1,)"),
        "RequestName reply: {}",
        out.stdout
    );
    // The bus is gone: its socket file is removed and nothing listens.
    if let Some(p) = socket_path(&addr) {
        assert!(!p.exists(), "socket {} left behind", p.display());
    }
    let probe = run_tool(
        "busctl",
        &["--address", &addr, "list", "--no-pager"],
        OP_TIMEOUT,
    );
    assert!(!probe.success(), "bus still answers after run: {probe:?}");
}

#[test]
fn run_bus_sees_the_command_as_a_peer() {
    // The command's own connection shows up with its pid.
    let script = r#"
        gdbus call --session --dest org.freedesktop.DBus --object-path /org/freedesktop/DBus \
            --method org.freedesktop.DBus.ListNames
    "#;
    let out = run_busvisor(&["run", "--", "sh", "-c", script]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    // The bus itself plus gdbus's unique name.
    assert!(
        out.stdout.contains("'org.freedesktop.DBus'"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("':1."), "{}", out.stdout);
}

#[test]
fn print_address_and_pid_and_dbus_daemon_flags() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("bus");
    let child = std::process::Command::new(busvisor_bin())
        .args(["--session", "--nofork", "--nopidfile", "--nosyslog"])
        .arg(format!("--address=unix:path={}", sock.display()))
        .args(["--print-address", "--print-pid"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut guard = ChildGuard::new(child);
    use std::io::BufRead;
    let mut r = std::io::BufReader::new(guard.child.stdout.take().unwrap());
    let mut addr = String::new();
    let mut pid = String::new();
    r.read_line(&mut addr).unwrap();
    r.read_line(&mut pid).unwrap();
    assert!(
        addr.starts_with(&format!("unix:path={}", sock.display())),
        "{addr:?}"
    );
    assert_eq!(pid.trim().parse::<u32>().ok(), Some(guard.pid()), "{pid:?}");
    let out = run_tool(
        "dbus-send",
        &[
            &format!("--bus={}", addr.trim()),
            "--print-reply",
            "--dest=org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus.GetConnectionUnixProcessID",
            "string:org.freedesktop.DBus",
        ],
        OP_TIMEOUT,
    );
    out.assert_ok();
    assert!(
        out.stdout.contains(&format!("uint32 {}", guard.pid())),
        "{}",
        out.stdout
    );
    guard.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(
        guard.wait_timeout(OP_TIMEOUT).and_then(|s| s.code()),
        Some(0)
    );
}

#[test]
fn print_address_to_a_file_descriptor() {
    // dbus-daemon style: --print-address 3 writes to an inherited fd.
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("bus");
    let out_path = dir.path().join("addr");
    let script = format!(
        "exec 3>{out} ; exec {bin} --nofork --address=unix:path={sock} --print-address 3",
        out = out_path.display(),
        bin = busvisor_bin(),
        sock = sock.display()
    );
    let child = std::process::Command::new("sh")
        .args(["-c", &script])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let _guard = ChildGuard::new(child);
    assert!(
        wait_until(OP_TIMEOUT, || std::fs::read_to_string(&out_path)
            .unwrap_or_default()
            .ends_with('\n')),
        "no address written to fd 3"
    );
    let addr = std::fs::read_to_string(&out_path).unwrap();
    assert!(
        addr.starts_with(&format!("unix:path={}", sock.display())),
        "{addr:?}"
    );
    run_tool(
        "busctl",
        &["--address", addr.trim(), "list", "--no-pager"],
        OP_TIMEOUT,
    )
    .assert_ok();
}

#[test]
fn one_configuration_only_and_introspect_prints_xml() {
    // As dbus-daemon: --system is a configuration, not one more option.
    // (The system bus itself is tested in tests/system_bus.rs.)
    for other in ["--session", "--config-file=/nonexistent.conf"] {
        let out = run_busvisor(&["--system", other, "--nofork"]);
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        assert!(out.stderr.contains("cannot be used with"), "{out:?}");
    }
    let out = run_busvisor(&["--introspect"]);
    out.assert_ok();
    assert!(
        out.stdout
            .contains("<interface name=\"org.freedesktop.DBus\">"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.trim_end().ends_with("</node>"));
}

#[test]
fn bad_config_file_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.conf");
    std::fs::write(
        &cfg,
        "<busconfig><limit name=\"max_message_size\">notanumber</limit>",
    )
    .unwrap();
    let sock = dir.path().join("bus");
    let out = run_busvisor(&[
        "--nofork",
        &format!("--config-file={}", cfg.display()),
        &format!("--address=unix:path={}", sock.display()),
        "--print-address",
    ]);
    assert!(!out.success(), "{out:?}");
    assert!(out.stdout.trim().is_empty());
    assert!(!out.stderr.trim().is_empty());
    assert!(!sock.exists());
}

/// `busvisor run` with a log level, RUST_LOG as given (or unset): busctl
/// makes one GetId call on the private bus; returns busvisor's stderr.
fn bus_log_of_one_call(level: &str, rust_log: Option<&str>) -> String {
    let mut cmd = std::process::Command::new(busvisor_bin());
    cmd.args([
        "run",
        "--log-level",
        level,
        "--",
        "sh",
        "-c",
        "busctl --address=\"$DBUS_SESSION_BUS_ADDRESS\" call org.freedesktop.DBus \
         /org/freedesktop/DBus org.freedesktop.DBus GetId",
    ])
    .env_remove("RUST_LOG")
    .stdin(std::process::Stdio::null());
    if let Some(v) = rust_log {
        cmd.env("RUST_LOG", v);
    }
    let out = cmd.output().expect("busvisor run");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The issue's logging contract: at info one line when a client connects
/// and one when it goes; a line per message at trace; RUST_LOG wins over
/// --log-level.
#[test]
fn log_levels_and_rust_log() {
    let info = bus_log_of_one_call("info", None);
    let lines = |log: &str, what: &str| log.lines().filter(|l| l.contains(what)).count();
    assert_eq!(lines(&info, " connected peer=:1."), 1, "{info}");
    assert_eq!(lines(&info, " disconnected peer=:1."), 1, "{info}");
    assert_eq!(lines(&info, "message peer="), 0, "{info}");

    let trace = bus_log_of_one_call("trace", None);
    assert!(
        trace
            .lines()
            .any(|l| l.contains("message peer=:1.") && l.contains("\"GetId\"")),
        "no per-message line at trace:\n{trace}"
    );

    let quiet = bus_log_of_one_call("trace", Some("warn"));
    assert_eq!(lines(&quiet, "connected peer="), 0, "{quiet}");
    assert_eq!(lines(&quiet, "message peer="), 0, "{quiet}");
}

/// The real dbus-run-session with busvisor as its daemon, with and without
/// a config file (with one, dbus-run-session reads the address pipe to its
/// end: busvisor closes it after writing, as dbus-daemon does), and
/// `busvisor run --config-file`: each gives the command a working bus and
/// exits with the command's status.
#[test]
fn dbus_run_session_and_run_with_a_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bus.conf");
    std::fs::write(&cfg, config_xml(&[])).unwrap();
    let cfg_arg = format!("--config-file={}", cfg.display());
    let daemon_arg = format!("--dbus-daemon={}", busvisor_bin());
    let script = "dbus-send --session --print-reply --dest=org.freedesktop.DBus \
                  /org/freedesktop/DBus org.freedesktop.DBus.GetId >/dev/null || exit 11; exit 7";
    let runs: [Vec<&str>; 3] = [
        vec![&daemon_arg, &cfg_arg, "--", "sh", "-c", script],
        vec![&daemon_arg, "--", "sh", "-c", script],
        vec!["run", &cfg_arg, "--", "sh", "-c", script],
    ];
    for (i, args) in runs.iter().enumerate() {
        let program = if i < 2 {
            "dbus-run-session"
        } else {
            busvisor_bin()
        };
        let out = run_tool(program, args, Duration::from_secs(20));
        assert_eq!(out.status.code(), Some(7), "{program} {args:?}: {out:?}");
    }
}

/// As dbus-daemon, busvisor raises its own fd limit (the soft limit to the
/// hard one; as root with CAP_SYS_RESOURCE to at least 65536), and what it
/// spawns gets the limit busvisor started with.
#[test]
fn the_fd_limit_is_raised_for_the_bus_only() {
    let script = format!(
        "ulimit -Sn 512 && exec {} run -- sh -c \
         'echo child=$(ulimit -Sn); grep \"open files\" /proc/$PPID/limits'",
        busvisor_bin()
    );
    let out = run_tool("sh", &["-c", &script], Duration::from_secs(20));
    assert!(out.success(), "{out:?}");
    assert!(out.stdout.contains("child=512"), "{out:?}");
    let line = out
        .stdout
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("the bus's limits");
    let nums: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    assert_eq!(nums.len(), 2, "{line}");
    assert_eq!(
        nums[0], nums[1],
        "soft limit raised to the hard one: {line}"
    );
    assert_ne!(nums[0], "512", "{line}");
}

/// `--fork`: once the bus is ready, neither it nor its keeper keeps the
/// caller's stdout or stderr (a `$(...)` or a pipe reaches its end while
/// the bus runs), as dbus-daemon; with DBUS_DEBUG_OUTPUT set, the log
/// still goes to that stderr.
#[test]
fn fork_lets_go_of_the_callers_output_unless_debug_output_is_asked() {
    for debug in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("bus");
        let mut cmd = std::process::Command::new(busvisor_bin());
        cmd.args(["--session", "--fork", "--nopidfile", "--print-pid"])
            .arg(format!("--address=unix:path={}", sock.display()))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .env_remove("DBUS_DEBUG_OUTPUT");
        if debug {
            cmd.env("DBUS_DEBUG_OUTPUT", "1");
        }
        let mut child = cmd.spawn().unwrap();
        let mut stdout = String::new();
        std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut stdout).unwrap();
        let pid: i32 = stdout.trim().parse().expect("a pid");
        assert!(child.wait().unwrap().success());
        // The bus runs; whether stderr reaches its end says who holds it.
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut { stderr }, &mut s);
            let _ = tx.send(s);
        });
        let ended = rx.recv_timeout(Duration::from_secs(3));
        assert!(sock.exists(), "the bus is not running");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
        assert!(wait_until(OP_TIMEOUT, || pid_gone(pid as u32)));
        assert_eq!(
            ended.is_ok(),
            !debug,
            "debug {debug}: stderr {}",
            if ended.is_ok() {
                "was let go"
            } else {
                "was kept"
            }
        );
    }
}
