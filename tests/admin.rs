//! What an administrator does with the CLI, against the real binary and
//! real services (tests/fixtures/testsvc.py): broken definitions where
//! they look, `status` with every process and the last lines, logs with
//! time, pid and stream, the verbs `kill`, `enable`/`disable`,
//! `reset-failed`, `cat`, `show`, `is-active`/`is-failed`, `--no-block`,
//! `check`, `list`'s filters, and the JSON dialect with its errors.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::Value as Json;

const CLI_TIMEOUT: Duration = Duration::from_secs(30);

fn skip() -> bool {
    // busvisor's own API and CLI: nothing to compare with dbus-daemon.
    is_reference()
}

/// A bus with the services `defs` writes, and the CLI against it.
struct Admin {
    bus: TestBus,
    dir: std::path::PathBuf,
    _tmp: tempfile::TempDir,
}

impl Admin {
    fn new(defs: impl FnOnce(&Path)) -> Admin {
        let config = config_xml(&[]);
        let (bus, dir, tmp) = start_bus_with_services("busvisor-admin", defs, Some(&config), &[]);
        Admin {
            bus,
            dir,
            _tmp: tmp,
        }
    }

    fn cli(&self, args: &[&str]) -> ToolOutput {
        busvisor_at(&self.bus.address, args)
    }

    /// `busctl --address=BUS ARGS`.
    fn busctl(&self, args: &[&str]) -> ToolOutput {
        let addr = format!("--address={}", self.bus.address);
        let mut v = vec![addr.as_str()];
        v.extend_from_slice(args);
        run_tool("busctl", &v, CLI_TIMEOUT)
    }

    #[track_caller]
    fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(out.success(), "busvisor {args:?}: {out:?}");
        out.stdout
    }

    /// Run with `--json`: the document, checked for its version.
    #[track_caller]
    fn json(&self, args: &[&str], code: i32) -> Json {
        let mut v = args.to_vec();
        v.push("--json");
        let out = self.cli(&v);
        assert_eq!(out.status.code(), Some(code), "busvisor {v:?}: {out:?}");
        let j: Json = serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("{v:?}: bad JSON ({e}): {}", out.stdout));
        assert_eq!(j["version"], 1, "{j}");
        j
    }

    fn state(&self, name: &str) -> String {
        let j = self.json(&["show", name, "-p", "State"], 0);
        j["state"].as_str().unwrap().to_owned()
    }
}

impl Drop for Admin {
    fn drop(&mut self) {
        kill_bus_and_services(&mut self.bus);
    }
}

fn testsvc(dir: &Path, id: &str, opts: &[&str], extra: &str) {
    write_testsvc(dir, id, &format!("org.busvisor.Admin.{id}"), opts, extra);
}

/// Where testsvc.py's `--grandchild` writes its helper's pid: the
/// directory holding it, the file, and the file as an argument.
fn grandchild_file() -> (tempfile::TempDir, std::path::PathBuf, String) {
    let tmp = tempfile::tempdir().unwrap();
    let gc = tmp.path().join("grandchild");
    let arg = gc.to_str().unwrap().to_owned();
    (tmp, gc, arg)
}

#[test]
fn broken_definitions_show_where_the_admin_looks() {
    if skip() {
        return;
    }
    let a = Admin::new(|d| {
        testsvc(d, "good", &[], "");
        std::fs::write(
            d.join("bad.toml"),
            "name = \"org.busvisor.Admin.bad\"\nexec = [\"/bin/true\"]\nrestrat = \"no\"\n",
        )
        .unwrap();
    });
    // list: a state of its own, with file:line:column and the key.
    let out = a.ok(&["list"]);
    let bad = out.lines().find(|l| l.starts_with("bad ")).expect(&out);
    assert!(bad.contains("bad-definition"), "{out}");
    let want = format!(
        "{}:3:1: unknown field `restrat`",
        a.dir.join("bad.toml").display()
    );
    assert!(bad.contains(&want), "{out}");
    let j = a.json(&["list", "--state=bad-definition"], 0);
    assert_eq!(j["services"].as_array().unwrap().len(), 1, "{j}");
    assert!(
        j["services"][0]["definition_error"]
            .as_str()
            .unwrap()
            .starts_with(&want)
    );
    // status: the error, and not running (3).
    let out = a.cli(&["status", "bad"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(out.stdout.starts_with("× bad\n"), "{out:?}");
    assert!(out.stdout.contains(&format!("Error: {want}")), "{out:?}");
    assert_eq!(a.cli(&["is-failed", "bad"]).status.code(), Some(0));
    // It cannot start, and says why.
    let out = a.cli(&["start", "bad"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        out.stderr.contains("cannot be loaded") && out.stderr.contains("restrat"),
        "{out:?}"
    );
    // reload counts, and fails while something is skipped.
    let out = a.cli(&["reload"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        out.stdout.starts_with("reloaded: 1 defined, 1 skipped\n"),
        "{out:?}"
    );
    assert!(
        out.stdout.contains(&format!("skipped bad: {want}")),
        "{out:?}"
    );
    let j = a.json(&["reload"], 1);
    assert_eq!(
        (j["defined"].as_u64(), j["skipped"].as_u64()),
        (Some(1), Some(1))
    );
    // Logged once, however often the definitions are read again.
    let logged = a.bus.log().matches("unknown field `restrat`").count();
    assert_eq!(logged, 1, "{}", a.bus.log());
    // Fixed: an ordinary service again.
    std::fs::write(
        a.dir.join("bad.toml"),
        "name = \"org.busvisor.Admin.bad\"\nexec = [\"/bin/true\"]\nrestart = \"no\"\n",
    )
    .unwrap();
    assert_eq!(a.ok(&["reload"]), "reloaded: 2 defined, 0 skipped\n");
    assert_eq!(a.state("bad"), "inactive");
}

#[test]
fn check_validates_without_a_bus() {
    if skip() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    write_def(d, "ok", "org.busvisor.Admin.ok", &["/bin/true"], "");
    write_def(
        d,
        "missing",
        "org.busvisor.Admin.missing",
        &["no-such-program-xyz"],
        "",
    );
    std::fs::write(d.join("bad.toml"), "name = 3\nexec = [\"/bin/true\"]\n").unwrap();
    std::fs::write(
        d.join("org.busvisor.Admin.S.service"),
        "[D-BUS Service]\nName=org.busvisor.Admin.S\nExec=/bin/true\n",
    )
    .unwrap();
    let dir = d.to_str().unwrap();
    let check = |args: &[&str]| run_tool(busvisor_bin(), args, CLI_TIMEOUT);
    let out = check(&["check", dir]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stdout.contains("bad.toml:1:8: "), "{out:?}");
    assert!(
        out.stdout.contains("\"no-such-program-xyz\" is not found"),
        "{out:?}"
    );
    assert!(
        out.stdout
            .ends_with("1 path checked: 3 definitions load, 2 problems\n"),
        "{out:?}"
    );
    // One file at a time; a good one passes.
    let good = d.join("ok.toml");
    let out = check(&["check", good.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(
        out.stdout,
        "1 path checked: 1 definition loads, 0 problems\n"
    );
    let svc = d.join("org.busvisor.Admin.S.service");
    assert!(check(&["check", svc.to_str().unwrap()]).success());
    let out = check(&["check", "--json", d.join("bad.toml").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let j: Json = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(j["version"], 1);
    assert_eq!(j["problems"].as_array().unwrap().len(), 1, "{j}");
    assert_eq!(j["definitions"], serde_json::json!([]));
    let out = check(&["check", "/nonexistent/busvisor-defs"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stdout.contains("no such file or directory"), "{out:?}");
}

#[test]
fn daemon_flags_that_would_start_a_useless_bus_are_errors() {
    if skip() {
        return;
    }
    let out = run_tool(
        busvisor_bin(),
        &["daemon", "--services-dir", "/nonexistent/busvisor-services"],
        CLI_TIMEOUT,
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        out.stderr
            .starts_with("busvisor: --services-dir /nonexistent/busvisor-services: "),
        "{out:?}"
    );
    let out = run_tool(
        busvisor_bin(),
        &["run", "--log-level", "verbose", "--", "true"],
        CLI_TIMEOUT,
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        out.stderr.contains("--log-level \"verbose\": not a level"),
        "{out:?}"
    );
}

#[test]
fn status_shows_every_process_the_last_lines_and_lasting_causes() {
    if skip() {
        return;
    }
    let (_tmp, gc, gcs) = grandchild_file();
    let a = Admin::new(|d| {
        testsvc(d, "tree", &["--grandchild", &gcs, "--say", "hello"], "");
        testsvc(
            d,
            "slow",
            &["--delay", "30"],
            "start_timeout = \"500ms\"\nrestart = \"no\"\n",
        );
    });
    a.ok(&["start", "tree"]);
    let helper = u64::from(read_pid_file(&gc));
    let j = a.json(&["status", "tree"], 0);
    let s = &j["services"][0];
    let main = s["main_pid"].as_u64().unwrap();
    // PIDs: complete (the helper the service forked) and current.
    let pids: Vec<u64> = s["pids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().unwrap())
        .collect();
    assert!(pids.contains(&main) && pids.contains(&helper), "{s}");
    let busctl = a.busctl(&[
        "get-property",
        "org.busvisor.Supervisor1",
        "/org/busvisor/Supervisor1/service/tree",
        "org.busvisor.Service1",
        "PIDs",
    ]);
    assert!(busctl.stdout.contains(&helper.to_string()), "{busctl:?}");
    let procs = s["processes"].as_array().unwrap();
    assert!(
        procs
            .iter()
            .all(|p| p["command"].as_str().unwrap().contains("testsvc.py")),
        "{s}"
    );
    let logs = s["logs"].as_array().unwrap();
    let streams: Vec<&str> = logs.iter().map(|l| l["stream"].as_str().unwrap()).collect();
    assert!(
        streams.contains(&"stdout") && streams.contains(&"stderr"),
        "{s}"
    );
    // The text: every process with its command line, the last lines.
    let text = a.ok(&["status", "tree", "-n", "2"]);
    assert!(text.contains(&format!("Main PID: {main} (")), "{text}");
    for p in &pids {
        assert!(
            text.lines()
                .any(|l| l.contains(&format!("─{p} ")) && l.contains("testsvc.py")),
            "{p}: {text}"
        );
    }
    let tail: Vec<&str> = text.lines().rev().take(2).collect();
    assert!(
        tail.iter().any(|l| l.ends_with("stderr    hello (stderr)")),
        "{text}"
    );
    // A start timeout stays a timeout, in the state and in the failure.
    let out = a.cli(&["start", "slow"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(wait_until(Duration::from_secs(10), || a.state("slow") == "failed"));
    let s = &a.json(&["status", "slow"], 3)["services"][0];
    assert!(s["reason"].as_str().unwrap().contains("timed out"), "{s}");
    assert!(
        s["last_failure"].as_str().unwrap().contains("timed out"),
        "{s}"
    );
    // Several names at once: 3 as one is not running; is-active, is-failed.
    let out = a.cli(&["status", "tree", "slow"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(
        out.stdout.contains("● tree - ") && out.stdout.contains("× slow - "),
        "{out:?}"
    );
    assert_eq!(a.cli(&["is-active", "tree"]).stdout, "running\n");
    assert!(a.cli(&["is-active", "-q", "tree"]).success());
    let out = a.cli(&["is-active", "tree", "slow"]);
    assert_eq!(
        (out.status.code(), out.stdout.as_str()),
        (Some(3), "running\nfailed\n")
    );
    assert_eq!(a.cli(&["is-failed", "slow"]).status.code(), Some(0));
    assert_eq!(a.cli(&["is-failed", "tree"]).status.code(), Some(1));
    let j = a.json(&["is-active", "tree", "nope"], 3);
    assert_eq!(j["services"][1]["state"], "unknown", "{j}");
    assert_eq!(a.cli(&["status", "nope"]).status.code(), Some(4));
    // reset-failed: inactive again, the failure forgotten.
    assert_eq!(a.ok(&["reset-failed"]), "reset slow: inactive\n");
    let s = &a.json(&["status", "slow"], 3)["services"][0];
    assert_eq!(
        (s["state"].as_str(), &s["last_failure"]),
        (Some("inactive"), &Json::Null)
    );
}

#[test]
fn logs_carry_time_pid_and_stream() {
    if skip() {
        return;
    }
    let a = Admin::new(|d| testsvc(d, "talk", &["--say", "hi"], "log_lines = 2\n"));
    let before = a.json(&["show", "talk", "-p", "StateChangeTime"], 0);
    a.ok(&["start", "talk"]);
    let pid = a.json(&["show", "talk", "-p", "MainPID"], 0)["main_pid"]
        .as_u64()
        .unwrap();
    assert!(wait_until(CLI_TIMEOUT, || a
        .ok(&["logs", "talk"])
        .lines()
        .count()
        == 2));
    // short: date, time, zone, id[pid], stream, line, in columns.
    let out = a.ok(&["logs", "talk"]);
    let lines: Vec<&str> = out.lines().collect();
    // Two pipes: which line busvisor read first is not fixed.
    for (stream, text) in [("stdout", "hi"), ("stderr", "hi (stderr)")] {
        let l = lines
            .iter()
            .find(|l| l.split_whitespace().nth(4) == Some(stream))
            .unwrap_or_else(|| panic!("no {stream} line in {out}"));
        let w: Vec<&str> = l.split_whitespace().collect();
        assert_eq!(w[0].len(), 10, "{l}");
        assert_eq!(w[3], format!("talk[{pid}]"), "{l}");
        assert_eq!(w[4], stream, "{l}");
        assert!(l.ends_with(&format!("  {text}")), "{l}");
    }
    assert_eq!(lines[0].find(" talk["), lines[1].find(" talk["));
    // short-iso and JSON: RFC 3339 times.
    let iso = a.ok(&["logs", "talk", "-o", "short-iso", "-n", "1"]);
    assert!(
        iso.split_whitespace().next().unwrap().contains('T'),
        "{iso}"
    );
    let out = a.ok(&["logs", "talk", "-o", "json"]);
    let j: Vec<Json> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(j.len(), 2);
    // Either pipe's line may have been read first.
    let mut streams: Vec<_> = j
        .iter()
        .map(|e| (e["pid"].as_u64(), e["stream"].as_str()))
        .collect();
    streams.sort();
    assert_eq!(
        streams,
        [(Some(pid), Some("stderr")), (Some(pid), Some("stdout"))]
    );
    assert!(j[0]["time"].as_str().unwrap().contains('T'));
    assert_eq!(j[0]["version"], 1);
    // --since: from a time on; a time after the lines gives none.
    let from = before["state_change_time"].as_str().unwrap();
    assert_eq!(a.ok(&["logs", "talk", "--since", from]).lines().count(), 2);
    assert_eq!(a.ok(&["logs", "talk", "--since", "-1h"]).lines().count(), 2);
    assert_eq!(a.ok(&["logs", "talk", "--since", "now"]), "");
    let out = a.cli(&["logs", "talk", "--since", "soonish"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    // The buffer holds `log_lines`: a restart's lines push the old out.
    a.ok(&["restart", "talk"]);
    assert!(wait_until(CLI_TIMEOUT, || {
        let out = a.ok(&["logs", "talk", "-o", "json"]);
        out.lines().all(|l| !l.contains(&format!("\"pid\":{pid},")))
    }));
    assert_eq!(a.ok(&["logs", "talk"]).lines().count(), 2);
}

#[test]
fn verbs_kill_disable_enable_cat_and_no_block() {
    if skip() {
        return;
    }
    let (_tmp, gc, gcs) = grandchild_file();
    let a = Admin::new(|d| testsvc(d, "k", &["--grandchild", &gcs], "restart = \"no\"\n"));
    // cat: the file, headed by its name.
    let out = a.ok(&["cat", "k"]);
    let file = a.dir.join("k.toml");
    assert!(
        out.starts_with(&format!("# {}\nname = ", file.display())),
        "{out}"
    );
    assert_eq!(a.json(&["cat", "k"], 0)["file"], file.to_str().unwrap());
    // kill --main: only the main process; kill: every process.
    a.ok(&["start", "k"]);
    let helper = read_pid_file(&gc) as i32;
    let main = a.json(&["show", "k", "-p", "MainPID"], 0)["main_pid"]
        .as_u64()
        .unwrap() as i32;
    let out = a.ok(&["kill", "k", "--main", "-s", "STOP"]);
    assert_eq!(out, "sent SIGSTOP to the main process of k\n");
    let stopped = |pid: i32| proc_stat(pid as u32).map(|s| s.1) == Some('T');
    assert!(wait_until(CLI_TIMEOUT, || stopped(main)));
    assert!(!stopped(helper));
    let j = a.json(&["kill", "k", "-s", "CONT"], 0);
    assert_eq!(
        (j["processes"].as_u64(), j["signal"].as_str()),
        (Some(2), Some("SIGCONT"))
    );
    assert!(wait_until(CLI_TIMEOUT, || !stopped(main)));
    let out = a.cli(&["kill", "k", "-s", "NOPE"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    // disable: no activation by messages, a marker beside the file, shown.
    let out = a.ok(&["disable", "k", "--now"]);
    let marker = a.dir.join("k.toml.disabled");
    assert_eq!(out, format!("disabled k (made {})\n", marker.display()));
    assert!(marker.exists());
    assert_eq!(a.state("k"), "inactive");
    assert!(pid_gone(helper as u32) || wait_until(CLI_TIMEOUT, || pid_gone(helper as u32)));
    let call = a.busctl(&[
        "call",
        "org.busvisor.Admin.k",
        "/org/busvisor/Test",
        "org.busvisor.Test",
        "Pid",
    ]);
    assert!(
        !call.success() && call.stderr.contains("disabled"),
        "{call:?}"
    );
    assert!(a.ok(&["list"]).contains("disabled; "));
    assert!(
        a.cli(&["status", "k"])
            .stdout
            .contains("(busvisor definition; disabled)")
    );
    // Persistent: a reload (and a new bus) reads the marker.
    a.ok(&["reload"]);
    assert_eq!(a.json(&["show", "k", "-p", "Enabled"], 0)["enabled"], false);
    let j = a.json(&["enable", "k"], 0);
    assert_eq!(j["services"][0]["persistent"], true);
    assert!(!marker.exists());
    // --no-block: returns before the service runs; it runs soon after.
    let out = a.ok(&["start", "--no-block", "k"]);
    assert_eq!(out, "start of k queued\n");
    assert!(wait_until(CLI_TIMEOUT, || a.state("k") == "running"));
    let j = a.json(&["stop", "--no-block", "k"], 0);
    assert_eq!(j["queued"], serde_json::json!(["k"]));
    assert!(wait_until(CLI_TIMEOUT, || a.state("k") == "inactive"));
}

#[test]
fn list_filters_and_counts() {
    if skip() {
        return;
    }
    let a = Admin::new(|d| {
        for id in ["alpha", "beta", "gamma"] {
            write_def(
                d,
                id,
                &format!("org.busvisor.Admin.{id}"),
                &["/bin/sleep", "60"],
                "",
            );
        }
    });
    a.ok(&["start", "--no-block", "beta"]);
    assert!(wait_until(CLI_TIMEOUT, || a.state("beta") == "activating"));
    let ids = |out: &str| -> Vec<String> {
        out.lines()
            .skip(1)
            .take_while(|l| !l.is_empty())
            .map(|l| l.split_whitespace().next().unwrap().to_owned())
            .collect()
    };
    // beta has no bus connection: it stays activating, which is not inactive.
    let out = a.ok(&["list", "--state=inactive"]);
    assert_eq!(ids(&out), ["alpha", "gamma"], "{out}");
    assert!(out.ends_with("\n2 services listed.\n"), "{out}");
    let out = a.ok(&["list", "*.gam*", "a*"]);
    assert_eq!(ids(&out), ["alpha", "gamma"], "{out}");
    let out = a.ok(&["list", "--no-legend", "b?ta"]);
    assert!(
        out.starts_with("beta ") && out.lines().count() == 1,
        "{out}"
    );
    let j = a.json(&["list", "--state", "inactive,activating"], 0);
    assert_eq!(j["services"].as_array().unwrap().len(), 3, "{j}");
    // Piped: never cut, whatever the width.
    let out = a.ok(&["list", "--all"]);
    assert!(!out.contains('…'), "{out}");
    a.ok(&["stop", "beta"]);
}

#[test]
fn json_errors_and_a_bus_without_the_api() {
    if skip() {
        return;
    }
    let a = Admin::new(|_| {});
    let out = a.cli(&["status", "nope", "--json"]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let out = a.cli(&["start", "nope", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let j: Json = serde_json::from_str(&out.stdout).expect(&out.stdout);
    assert_eq!(j["error"], "no such service: nope");
    assert_eq!(j["version"], 1);
    assert_eq!(out.stderr.trim(), "busvisor: no such service: nope");
    // dbus-daemon has no busvisor API: `events` says so at once.
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("bus");
    let child = std::process::Command::new("dbus-daemon")
        .args(["--session", "--nofork", "--print-address"])
        .arg(format!("--address=unix:path={}", sock.display()))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut guard = ChildGuard::new(child);
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(guard.child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let started = std::time::Instant::now();
    for cmd in [&["events"][..], &["events", "--json"], &["list"]] {
        let mut v = cmd.to_vec();
        let addr = format!("--address={}", line.trim());
        v.push(&addr);
        let out = run_tool(busvisor_bin(), &v, CLI_TIMEOUT);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert!(
            out.stderr
                .contains("does not provide busvisor's control API"),
            "{out:?}"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// The services of docs/SERVICES.md's "Write your own service", as they
/// ship in examples/services: the Gio greeter, the same daemon
/// double-forking, and the zbus greeter of examples/zbus_greeter.rs (when
/// `cargo test` built the examples, as the whole suite does).
#[test]
fn the_walkthrough_services_work() {
    if skip() {
        return;
    }
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");
    let rust = std::env::current_exe()
        .ok()
        .and_then(|t| Some(t.parent()?.parent()?.join("examples/zbus_greeter")))
        .filter(|p| p.exists());
    let a = Admin::new(|d| {
        for f in ["greeter.py", "greeter.toml", "forking-greeter.toml"] {
            std::fs::copy(format!("{examples}/services/{f}"), d.join(f)).unwrap();
        }
        if let Some(bin) = &rust {
            let exec = bin.to_str().unwrap();
            write_def(d, "rust-greeter", "org.example.RustGreeter", &[exec], "");
        }
    });
    let call = |name: &str, member: &str, args: &[&str]| {
        let mut v = vec![
            "call",
            name,
            "/org/example/Greeter",
            "org.example.Greeter",
            member,
        ];
        v.extend_from_slice(args);
        a.busctl(&v)
    };
    // Activated by the first call, which it answers.
    let out = call("org.example.Greeter", "Hello", &["s", "world"]);
    assert_eq!(out.stdout, "s \"Hello, world!\"\n", "{out:?}");
    assert!(wait_until(CLI_TIMEOUT, || a
        .ok(&["logs", "greeter", "-o", "cat"])
        .contains("greeting world for :1.")));
    // The double-forking one: its daemon is busvisor's child, supervised.
    let out = call("org.example.ForkingGreeter", "Ppid", &[]);
    assert_eq!(out.stdout, format!("u {}\n", a.bus.pid()), "{out:?}");
    let pid = call("org.example.ForkingGreeter", "Pid", &[]).stdout;
    let main = a.json(&["show", "forking-greeter", "-p", "MainPID"], 0)["main_pid"].clone();
    assert_eq!(pid, format!("u {main}\n"));
    // A crash is not hidden by the next launcher's exit 0 (it daemonized).
    let main = main.as_u64().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(main as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let props = [
        "MainPID",
        "State",
        "LastExitPID",
        "LastExitSignal",
        "LastFailure",
    ];
    let show = || a.json(&["show", "forking-greeter", "-p", &props.join(",")], 0);
    assert!(wait_until(CLI_TIMEOUT, || {
        let j = show();
        j["state"] == "running" && j["main_pid"] != main
    }));
    let j = show();
    assert_eq!(
        (j["last_exit_pid"].as_u64(), j["last_exit_signal"].as_u64()),
        (Some(main), Some(9)),
        "{j}"
    );
    let failure = format!("main process {main} killed by signal 9 (SIGKILL)");
    assert_eq!(j["last_failure"], failure.as_str(), "{j}");
    let second = j["main_pid"].as_u64().unwrap();
    a.ok(&["stop", "forking-greeter"]);
    assert!(pid_gone(second as u32));
    match rust {
        Some(_) => {
            let out = call("org.example.RustGreeter", "Hello", &["s", "crab"]);
            assert_eq!(out.stdout, "s \"Hello, crab!\"\n", "{out:?}");
            assert!(wait_until(CLI_TIMEOUT, || a
                .ok(&["logs", "rust-greeter", "-o", "cat"])
                .contains("greeting crab")));
        }
        None => eprintln!("examples/zbus_greeter not built (cargo test --examples builds it)"),
    }
}
