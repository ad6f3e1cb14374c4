//! dbus's own installed tests (Debian package dbus-tests), run case by case
//! against busvisor: each test program starts the bus it tests from
//! `DBUS_TEST_DAEMON`. The cases busvisor is known to fail are listed, with
//! why, in `dbus_tests_known_failures.txt`; the test fails when a case fails
//! that is not listed (a regression) and when a listed case passes (the list
//! only shrinks). With BUSVISOR_TEST_REFERENCE=1 the cases run against
//! dbus-daemon instead, the list is ignored, and every case must pass or skip.

mod common;

use std::collections::BTreeSet;
use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
use nix::unistd::Pid;

/// Where the package puts the programs (`$T`) and their data (`$T/data`).
const DIR: &str = "/usr/lib/dbus-1.0/installed-tests/dbus";

/// The programs whose cases run against a bus started from DBUS_TEST_DAEMON.
const PROGRAMS: &[&str] = &[
    "test-dbus-daemon",
    "test-monitor",
    "test-uid-permissions",
    "test-dbus-daemon-eavesdrop",
    "test-fdpass",
    "test-header-fields",
    "test-corrupt",
    "test-relay",
    "test-containers",
    "test-sd-activation",
];

/// A case that has not finished by then hangs: it and its bus are killed.
/// dbus-daemon's slowest case (/activation/forking) takes about 7 s.
const CASE_TIMEOUT: Duration = Duration::from_secs(20);

/// Cases running at once.
const PARALLEL: usize = 2;

/// `prog case` per line, `#` starts a comment.
const KNOWN_FAILURES: &str = include_str!("dbus_tests_known_failures.txt");

#[derive(Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Pass,
    Skip,
    Fail,
    Timeout,
}

impl Verdict {
    fn failed(self) -> bool {
        matches!(self, Verdict::Fail | Verdict::Timeout)
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Pass => "pass",
            Verdict::Skip => "skip",
            Verdict::Fail => "FAIL",
            Verdict::Timeout => "TIMEOUT",
        })
    }
}

struct Case {
    prog: &'static str,
    name: String,
}

impl fmt::Display for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.prog, self.name)
    }
}

struct Outcome {
    verdict: Verdict,
    secs: f64,
    /// For a failure: the line that says why, as far as the output tells.
    why: String,
    /// The program's output (and its bus's log), for a regression's report.
    output: String,
}

/// The cases of `prog`, as its `-l` lists them.
fn list_cases(prog: &'static str) -> Vec<Case> {
    let out = Command::new(Path::new(DIR).join(prog))
        .arg("-l")
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog} -l: {e}"));
    assert!(out.status.success(), "{prog} -l: {}", out.status);
    let cases: Vec<Case> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with('/'))
        .map(|l| Case {
            prog,
            name: l.trim().to_owned(),
        })
        .collect();
    assert!(!cases.is_empty(), "{prog} -l listed no case");
    cases
}

/// The bus binary the cases start. The cases that need root run it as
/// messagebus or nobody, so busvisor is copied into a world-readable place
/// when its own is not (a target dir under a 0700 home); the copy lives as
/// long as the returned directory.
fn daemon_binary() -> (PathBuf, Option<tempfile::TempDir>) {
    if common::is_reference() {
        return (PathBuf::from(common::which("dbus-daemon")), None);
    }
    let bin = PathBuf::from(common::busvisor_bin());
    if world_usable(&bin) {
        return (bin, None);
    }
    let dir = tempfile::Builder::new()
        .prefix("busvisor-dbus-tests")
        .tempdir()
        .expect("tempdir");
    let copy = dir.path().join("busvisor");
    std::fs::copy(&bin, &copy).expect("copy busvisor");
    for p in [dir.path(), copy.as_path()] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    assert!(
        world_usable(&copy),
        "{} is not usable by others",
        copy.display()
    );
    (copy, Some(dir))
}

/// True if any user can run `bin`: it is readable and executable by others,
/// and every directory above it searchable.
fn world_usable(bin: &Path) -> bool {
    let mode = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.permissions().mode());
    mode(bin) & 0o005 == 0o005 && bin.ancestors().skip(1).all(|d| mode(d) & 0o001 != 0)
}

/// Run one case in a process group of its own, with its bus marked; after
/// it, nothing it started is left.
fn run_case(daemon: &Path, case: &Case, index: usize) -> Outcome {
    let logs = tempfile::tempdir().expect("tempdir");
    let out_path = logs.path().join("out");
    let out = std::fs::File::create(&out_path).expect("output file");
    let err = out.try_clone().expect("output file");
    let mark = format!("{}-dbus-tests-{index}", std::process::id());
    let started = Instant::now();
    let mut child = Command::new(Path::new(DIR).join(case.prog))
        .args(["--tap", "-p", &case.name])
        .current_dir(DIR)
        .env("DBUS_TEST_DAEMON", daemon)
        .env("DBUS_TEST_EXEC", DIR)
        .env("DBUS_TEST_DATA", Path::new(DIR).join("data"))
        .env(common::TEST_MARK_VAR, &mark)
        // An address here would make the programs use that bus instead of
        // starting one; the rest change what or how the cases test.
        .env_remove("DBUS_TEST_DAEMON_ADDRESS")
        .env_remove("DBUS_TEST_UNINSTALLED")
        .env_remove("DBUS_TEST_MALLOC_FAILURES")
        .env_remove("DBUS_TEST_ONLY")
        .env_remove("DBUS_SESSION_BUS_ADDRESS")
        .env_remove("DBUS_STARTER_ADDRESS")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {case}: {e}"));
    let status = finish(&mut child, started + CASE_TIMEOUT);
    common::kill_marked(&mark);
    let secs = started.elapsed().as_secs_f64();
    let output =
        String::from_utf8_lossy(&std::fs::read(&out_path).unwrap_or_default()).into_owned();
    let verdict = classify(status, &output);
    let why = match verdict {
        Verdict::Pass | Verdict::Skip => String::new(),
        Verdict::Fail => failure_line(status, &output),
        Verdict::Timeout => format!(
            "no result within {} s; last: {}",
            CASE_TIMEOUT.as_secs(),
            last_test_line(&output)
        ),
    };
    Outcome {
        verdict,
        secs,
        why,
        output,
    }
}

/// Wait for the case's program to exit, until `deadline`; then SIGKILL its
/// whole process group (the bus it started is in it) while the program is
/// not yet reaped, so that the group's id cannot have been reused; then reap
/// it. None if it had not exited by the deadline.
fn finish(child: &mut Child, deadline: Instant) -> Option<ExitStatus> {
    let pid = Pid::from_raw(child.id() as i32);
    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
    let exited = loop {
        if !matches!(waitid(Id::Pid(pid), flags), Ok(WaitStatus::StillAlive)) {
            break true;
        }
        if Instant::now() >= deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = killpg(pid, Signal::SIGKILL);
    let status = child.wait().expect("reap the test program");
    exited.then_some(status)
}

/// From the TAP output: a case passes or skips if its program exits 0 and
/// reports only `ok` lines (a skip is `ok N ... # SKIP`).
fn classify(status: Option<ExitStatus>, output: &str) -> Verdict {
    let Some(status) = status else {
        return Verdict::Timeout;
    };
    let (mut ok, mut skipped, mut bad) = (0, 0, false);
    for line in output.lines() {
        if line.starts_with("not ok") || line.starts_with("Bail out!") {
            bad = true;
        } else if line.starts_with("ok ") {
            if line.contains("# SKIP") {
                skipped += 1;
            } else {
                ok += 1;
            }
        }
    }
    match (status.success() && !bad, ok, skipped) {
        (true, 0, 0) | (false, _, _) => Verdict::Fail,
        (true, 0, _) => Verdict::Skip,
        (true, _, _) => Verdict::Pass,
    }
}

/// The assertion that failed, or how the program ended.
fn failure_line(status: Option<ExitStatus>, output: &str) -> String {
    output
        .lines()
        .find(|l| l.starts_with("ERROR:") || l.starts_with("not ok"))
        .map(|l| l.trim().to_owned())
        .unwrap_or_else(|| format!("{status:?}; last: {}", last_test_line(output)))
}

/// The program's last line that is neither its bus's log nor the GLib
/// test timeout's bookkeeping.
fn last_test_line(output: &str) -> &str {
    output
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| {
            !l.is_empty()
                && !is_bus_log(l)
                && !l.starts_with("# Resetting test timeout")
                && !l.starts_with("# Time since timeout reset")
        })
        .unwrap_or("(nothing)")
}

/// A line of busvisor's log (a timestamp first) or of dbus-daemon's.
fn is_bus_log(line: &str) -> bool {
    line.starts_with("dbus-daemon[")
        || line
            .get(..4)
            .is_some_and(|y| y.bytes().all(|b| b.is_ascii_digit()))
}

/// `prog case` of each listed known failure.
fn known_failures() -> BTreeSet<String> {
    KNOWN_FAILURES
        .lines()
        .map(|l| {
            l.split('#')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .collect::<Vec<_>>()
        })
        .filter(|w| !w.is_empty())
        .map(|w| {
            assert!(w.len() == 2, "known failures: not `prog case`: {w:?}");
            w.join(" ")
        })
        .collect()
}

fn shorten(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// The end of a case's output, for a report.
fn tail(output: &str, lines: usize) -> String {
    let all: Vec<&str> = output.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[test]
fn dbus_installed_tests() {
    if !Path::new(DIR).join(PROGRAMS[0]).exists() {
        eprintln!(
            "SKIPPED: dbus's installed tests are missing ({DIR}): apt-get install dbus-tests"
        );
        return;
    }
    let reference = common::is_reference();
    let (daemon, _copy) = daemon_binary();
    let cases: Vec<Case> = PROGRAMS.iter().flat_map(|p| list_cases(p)).collect();
    eprintln!(
        "dbus tests: {} cases against {}, {PARALLEL} at a time",
        cases.len(),
        daemon.display()
    );

    let started = Instant::now();
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Outcome>>> = Mutex::new(cases.iter().map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..PARALLEL {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(case) = cases.get(i) else { break };
                    let o = run_case(&daemon, case, i);
                    let why = if o.why.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", shorten(&o.why, 200))
                    };
                    eprintln!("{} {case} ({:.1}s){why}", o.verdict, o.secs);
                    results.lock().unwrap()[i] = Some(o);
                }
            });
        }
    });
    let results: Vec<Outcome> = results
        .into_inner()
        .unwrap()
        .into_iter()
        .map(|o| o.expect("every case ran"))
        .collect();
    let count = |v: Verdict| results.iter().filter(|o| o.verdict == v).count();
    eprintln!(
        "dbus tests against {}: {} pass, {} skip, {} FAIL, {} TIMEOUT of {} cases in {:.0} s",
        if reference { "dbus-daemon" } else { "busvisor" },
        count(Verdict::Pass),
        count(Verdict::Skip),
        count(Verdict::Fail),
        count(Verdict::Timeout),
        cases.len(),
        started.elapsed().as_secs_f64()
    );

    let outcomes = || cases.iter().zip(&results);
    if reference {
        let failed: Vec<String> = outcomes()
            .filter(|(_, o)| o.verdict.failed())
            .map(|(c, o)| format!("{} {c}: {}\n{}", o.verdict, o.why, tail(&o.output, 20)))
            .collect();
        assert!(
            failed.is_empty(),
            "{} cases fail against dbus-daemon:\n{}",
            failed.len(),
            failed.join("\n\n")
        );
        return;
    }

    let known = known_failures();
    let names: BTreeSet<String> = cases.iter().map(Case::to_string).collect();
    let mut problems = Vec::new();
    for (case, o) in outcomes() {
        let listed = known.contains(&case.to_string());
        match (o.verdict, listed) {
            (v, false) if v.failed() => problems.push(format!(
                "REGRESSION {v} {case}: {}\n{}",
                o.why,
                tail(&o.output, 20)
            )),
            (Verdict::Pass, true) => problems.push(format!(
                "FIXED {case}: passes now; delete it from tests/dbus_tests_known_failures.txt"
            )),
            (Verdict::Skip, true) => eprintln!("note: known failure {case} skipped here"),
            _ => {}
        }
    }
    for stale in known.difference(&names) {
        problems.push(format!(
            "listed as a known failure but no such case: {stale}"
        ));
    }
    assert!(
        problems.is_empty(),
        "{} differences from tests/dbus_tests_known_failures.txt:\n{}",
        problems.len(),
        problems.join("\n\n")
    );
}
