//! GLib's installed gdbus test programs, run against busvisor through
//! `G_TEST_DBUS_DAEMON` (GTestDBus starts the named binary with
//! dbus-daemon's flags and its own config file). Package: libglib2.0-tests.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use std::time::{Duration, Instant};

const DIR: &str = "/usr/libexec/installed-tests/glib";

/// The programs, with GTest paths to skip and why.
const PROGRAMS: &[(&str, &[&str])] = &[
    ("gdbus-names", &[]),
    ("gdbus-connection", &[]),
    ("gdbus-subscribe", &[]),
    ("gdbus-proxy", &[]),
    ("gdbus-export", &[]),
    ("gdbus-introspection", &[]),
    ("gdbus-exit-on-close", &[]),
    ("gdbus-connection-flush", &[]),
    ("gdbus-bz627724", &[]),
    ("gdbus-close-pending", &[]),
    ("gdbus-connection-loss", &[]),
    ("gdbus-connection-slow", &[]),
    ("gdbus-proxy-threads", &[]),
    ("gdbus-proxy-unique-name", &[]),
    ("gdbus-proxy-well-known-name", &[]),
    ("gdbus-test-codegen", &[]),
    ("gdbus-method-invocation", &[]),
    ("gdbus-overflow", &[]),
    // /appinfo/flatpak-doc-export fails the same way under dbus-daemon
    // 1.14.10 with Debian 12's GLib 2.74.6 (the desktop file's name is not
    // known to the app info it builds: "'uri' should not be NULL"), so it
    // says nothing about the bus.
    ("dbus-appinfo", &["/appinfo/flatpak-doc-export"]),
];

fn run_one(name: &str, skips: &[&str]) -> Result<Duration, String> {
    let started = Instant::now();
    let mut cmd = Command::new(Path::new(DIR).join(name));
    for s in skips {
        cmd.arg("-s").arg(s);
    }
    // Output goes to files: the programs are chatty, and an unread pipe would block them.
    let logs = tempfile::tempdir().map_err(|e| e.to_string())?;
    let out_path = logs.path().join("out");
    let out_file = std::fs::File::create(&out_path).map_err(|e| e.to_string())?;
    let err_file = out_file.try_clone().map_err(|e| e.to_string())?;
    // GTestDBus does not always stop its bus when a program crashes: mark
    // the buses of this run, to stop any that is left by pid.
    let mark = format!("{}-{name}", std::process::id());
    let mut child = cmd
        .current_dir(DIR)
        .env(common::TEST_MARK_VAR, &mark)
        .env("G_TEST_DBUS_DAEMON", env!("CARGO_BIN_EXE_busvisor"))
        .env("RUST_LOG", "warn")
        .env_remove("DBUS_SESSION_BUS_ADDRESS")
        .stdin(Stdio::null())
        .stdout(out_file)
        .stderr(err_file)
        .spawn()
        .map_err(|e| format!("cannot start {name}: {e}"))?;
    let deadline = started + Duration::from_secs(90);
    let status = run_until(&mut child, deadline);
    common::kill_marked(&mark);
    let status = match status {
        Ok(s) => s,
        Err(()) => return Err(format!("{name}: timed out after 90 s")),
    };
    match status.code() {
        Some(0) => Ok(started.elapsed()),
        // 77: the program skipped itself; that is no pass.
        code => {
            let output = std::fs::read_to_string(&out_path).unwrap_or_default();
            let tail: Vec<&str> = output.lines().filter(|l| !l.contains("-DEBUG:")).collect();
            let tail = tail[tail.len().saturating_sub(15)..].join("\n");
            Err(format!("{name}: exit status {code:?}\n{tail}"))
        }
    }
}

fn run_until(
    child: &mut std::process::Child,
    deadline: Instant,
) -> Result<std::process::ExitStatus, ()> {
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(());
            }
        }
    }
}

#[test]
fn glib_gdbus_programs_pass() {
    assert!(
        Path::new(DIR).join("gdbus-names").exists(),
        "GLib's installed tests are missing: apt-get install libglib2.0-tests"
    );
    let mut failures = Vec::new();
    for (name, skips) in PROGRAMS {
        match run_one(name, skips) {
            Ok(t) => eprintln!("glib {name}: ok ({:.1} s)", t.as_secs_f64()),
            Err(e) => {
                eprintln!("glib {e}");
                failures.push(e);
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} GLib programs failed:\n{}",
        failures.len(),
        PROGRAMS.len(),
        failures.join("\n\n")
    );
}
