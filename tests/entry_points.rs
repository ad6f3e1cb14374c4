//! The entry points beside the daemon: `busvisor run` as dbus-run-session
//! (a pipe, a terminal, job control) and as a container's init (PID 1:
//! orphans reaped, signals forwarded); no bus started by a typo; the
//! control commands' fallback to `$XDG_RUNTIME_DIR/bus`; `busvisor launch`
//! as dbus-launch (eval in a real sh, a real terminal's hangup, a real X
//! server). Terminals are real pseudo-terminals (python3's pty module), and
//! the real dbus-run-session and dbus-launch run beside busvisor where
//! they do the same thing.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// Drives a command in a new pseudo-terminal, whose session it leads:
/// argv[1] is a JSON list of steps `[input, expected, seconds]` (write
/// `input`, then read until `expected` appears in what follows, or for
/// `seconds` when `expected` is empty; an integer input is a signal sent to
/// the command's process instead), argv[2] "hangup" or "wait" (close the
/// terminal, or wait for the command), then the command. Prints JSON: the
/// output, the exit status, and the first step that timed out. Whatever
/// is left in the terminal's session at the end is killed.
const PTY_DRIVER: &str = r#"
import json, os, pty, select, signal, sys, time
steps = json.loads(sys.argv[1]); end = sys.argv[2]; argv = sys.argv[3:]
pid, fd = pty.fork()
if pid == 0:
    # As a terminal starts a program, whatever this harness ignores (nohup,
    # python's own SIGPIPE): ignored signals stay ignored across exec.
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGPIPE,
                signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU):
        signal.signal(sig, signal.SIG_DFL)
    os.execvp(argv[0], argv)
out = b""
def pump(needle, seconds):
    global out
    start = len(out); deadline = time.time() + seconds
    while True:
        if needle and needle.encode() in out[start:]:
            return True
        left = deadline - time.time()
        if left <= 0:
            return not needle
        r, _, _ = select.select([fd], [], [], min(left, 0.1))
        if r:
            try:
                data = os.read(fd, 4096)
            except OSError:
                data = b""
            if not data:
                return not needle
            out += data
failed = None
for i, (send, expect, seconds) in enumerate(steps):
    if isinstance(send, int):
        os.kill(pid, send)
    elif send:
        os.write(fd, send.encode())
    if not pump(expect, seconds) and failed is None:
        failed = i
        break
status = None
if end == "hangup":
    os.close(fd)
deadline = time.time() + 15
while time.time() < deadline:
    if end != "hangup":
        try:
            r, _, _ = select.select([fd], [], [], 0.05)
            if r:
                data = os.read(fd, 4096)
                out += data
        except OSError:
            pass
    done, st = os.waitpid(pid, os.WNOHANG)
    if done:
        status = os.waitstatus_to_exitcode(st)
        break
    time.sleep(0.05)
def sid(p):
    try:
        return int(open("/proc/%s/stat" % p).read().rsplit(")", 1)[1].split()[3])
    except Exception:
        return None
def session():
    return [p for p in os.listdir("/proc") if p.isdigit() and p != str(pid) and sid(p) == pid]
lingered = []
if status is None:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
else:
    deadline = time.time() + 10
    while session() and time.time() < deadline:
        time.sleep(0.05)
for p in session():
    try:
        lingered.append(open("/proc/%s/cmdline" % p).read().replace("\0", " "))
        os.kill(int(p), signal.SIGKILL)
    except OSError:
        pass
print(json.dumps({"out": out.decode(errors="replace"), "status": status, "failed": failed,
                  "lingered": lingered}))
"#;

/// What happened in the terminal.
#[derive(Debug)]
struct PtyRun {
    out: String,
    /// The command's exit code (negative: killed by that signal); None if
    /// it had to be killed.
    status: Option<i64>,
    /// The first step whose expected output did not come.
    failed: Option<u64>,
    /// Processes of the terminal's session still there 10 s after the
    /// command ended (killed then).
    lingered: Vec<String>,
}

/// One step: write `input` (or send signal N: `Step::Signal`), then wait
/// for `expect`.
enum Step<'a> {
    Type(&'a str, &'a str),
    Signal(i32, &'a str),
    Pause(f64),
}

fn in_pty(argv: &[&str], env: &[(&str, &str)], steps: &[Step], hangup: bool) -> PtyRun {
    let steps: Vec<serde_json::Value> = steps
        .iter()
        .map(|s| match s {
            // Nothing to wait for: a moment for the input to be taken.
            Step::Type(input, "") => serde_json::json!([input, "", 0.3]),
            Step::Type(input, expect) => serde_json::json!([input, expect, 10.0]),
            Step::Signal(n, expect) => serde_json::json!([n, expect, 10.0]),
            Step::Pause(secs) => serde_json::json!(["", "", secs]),
        })
        .collect();
    let mut cmd = Command::new("python3");
    cmd.arg("-c")
        .arg(PTY_DRIVER)
        .arg(serde_json::Value::Array(steps).to_string())
        .arg(if hangup { "hangup" } else { "wait" })
        .args(argv)
        .env_remove("DBUS_SESSION_BUS_ADDRESS")
        .env_remove("DISPLAY")
        .env("PS1", "$ ")
        .env("ENV", "")
        .env("TERM", "dumb")
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("python3");
    assert!(
        out.status.success(),
        "pty driver failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("driver JSON");
    let run = PtyRun {
        out: plain(v["out"].as_str().unwrap_or_default()),
        status: v["status"].as_i64(),
        failed: v["failed"].as_u64(),
        lingered: v["lingered"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|p| p.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default(),
    };
    assert!(run.lingered.is_empty(), "{argv:?} left processes: {run:?}");
    run
}

/// Terminal output as text: no carriage returns, no colours (busvisor's
/// log colours a terminal).
fn plain(tty: &str) -> String {
    let mut out = String::with_capacity(tty.len());
    let mut chars = tty.chars();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {}
            '\x1b' => {
                // CSI: ESC [ parameters final-byte
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            c => out.push(c),
        }
    }
    out
}

/// The value after `key=` on the last line that has it (a terminal echoes
/// the command line first).
fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let tag = format!("{key}=");
    text.lines().rev().find_map(|l| {
        let at = l.find(&tag)?;
        l[at + tag.len()..].split_whitespace().next()
    })
}

fn busvisor_run(args: &[&str]) -> Vec<String> {
    let mut v = vec![busvisor_bin().to_owned(), "run".to_owned()];
    v.extend(args.iter().map(|s| s.to_string()));
    v
}

fn dbus_run_session(args: &[&str]) -> Vec<String> {
    let mut v = vec!["dbus-run-session".to_owned()];
    v.extend(args.iter().map(|s| s.to_string()));
    v
}

// ------------------------------------------------------------ run: stdio

/// `echo hi | busvisor run -- cat` prints hi, as dbus-run-session does; so
/// does a `read` from the pipe, and a descriptor the caller opened reaches
/// the command too.
#[test]
fn run_passes_a_pipe_and_the_callers_descriptors_through() {
    let dir = tempfile::tempdir().unwrap();
    let extra = dir.path().join("fd3.txt");
    std::fs::write(&extra, "from fd 3\n").unwrap();
    for wrapper in [busvisor_run(&["--"]), dbus_run_session(&["--"])] {
        let w = wrapper.join(" ");
        let script = format!(
            "printf 'hi\\nthere\\n' | {w} cat; \
             echo line | {w} sh -c 'read x; echo \"read=$x\"'; \
             {w} sh -c 'cat <&3' 3<'{}'",
            extra.display()
        );
        let out = run_tool("sh", &["-c", &script], Duration::from_secs(30));
        assert!(out.success(), "{w}: {out:?}");
        assert_eq!(
            out.stdout, "hi\nthere\nread=line\nfrom fd 3\n",
            "{w}: {out:?}"
        );
    }
}

/// `busvisor run -- sh` in a terminal is an interactive shell with job
/// control, as under dbus-run-session: the shell owns the terminal's
/// foreground group, Ctrl-Z stops its job, Ctrl-C interrupts it, and `exit
/// 5` ends the run with 5.
#[test]
fn run_gives_a_shell_the_terminal_and_job_control() {
    use Step::*;
    for wrapper in [busvisor_run(&["--", "sh"]), dbus_run_session(&["--", "sh"])] {
        let argv: Vec<&str> = wrapper.iter().map(String::as_str).collect();
        let run = in_pty(
            &argv,
            &[],
            &[
                Pause(0.5),
                Type(
                    // Fields 5 and 8 of /proc/PID/stat: the process group
                    // and the terminal's foreground group.
                    "set -- $(cat /proc/$$/stat); echo \"pgid=$5 fg=$8 in=$(tty)\"\n",
                    "in=/dev/",
                ),
                Type("echo \"go-$((2+2))\"; sleep 30\n", "go-4"),
                Pause(0.3),
                Type("\x1a", "Stopped"),
                Pause(0.5),
                Type("kill -9 %1; echo \"killed-$((1+1))\"\n", "killed-2"),
                Type(
                    "trap 'echo \"trapped-$((2+1))\"' INT; echo \"armed-$((3+4))\"; sleep 30\n",
                    "armed-7",
                ),
                Pause(0.3),
                Type("\x03", "trapped-3"),
                Type("exit 5\n", ""),
            ],
            false,
        );
        let who = &wrapper[0];
        assert_eq!(run.failed, None, "{who}: {run:?}");
        assert_eq!(run.status, Some(5), "{who}: {run:?}");
        let pgid = field(&run.out, "pgid").expect("pgid");
        assert_eq!(Some(pgid), field(&run.out, "fg"), "{who}: {run:?}");
        assert!(run.out.contains("in=/dev/pts/"), "{who}: {run:?}");
    }
}

/// A run is one job for the shell it was typed into: Ctrl-Z suspends it
/// (busvisor, its bus and CMD), `fg` resumes it, and CMD reads the
/// terminal; as with dbus-run-session.
#[test]
fn run_is_one_job_for_the_shell_that_started_it() {
    use Step::*;
    let cmd = ["--", "sh", "-c", "'echo \"in-$((1+1))\"; exec cat'"];
    for wrapper in [busvisor_run(&cmd), dbus_run_session(&cmd)] {
        let line = format!("{}\n", wrapper.join(" "));
        let run = in_pty(
            &["sh", "-i"],
            &[],
            &[
                Pause(0.5),
                Type(&line, "in-2"),
                Type("\x1a", "Stopped"),
                // The shell takes back the terminal (and drops what was
                // typed meanwhile) before its prompt.
                Pause(0.5),
                Type("fg\n", "exec cat"),
                Type("typed\n", "typed\r\ntyped"),
                Type("\x04", ""),
                Pause(0.5),
                Type("echo \"status-$((0+$?))\"\n", "status-0"),
                Type("exit\n", ""),
            ],
            false,
        );
        assert_eq!(run.failed, None, "{}: {run:?}", wrapper[0]);
        assert_eq!(run.status, Some(0), "{}: {run:?}", wrapper[0]);
    }
}

/// A command that does not take the terminal stays in busvisor's group,
/// so the terminal's Ctrl-C reaches both: it gets one SIGINT (from the
/// kernel, si_code SI_KERNEL), not a second one forwarded by busvisor. A
/// SIGTERM sent to busvisor alone is forwarded (si_code SI_USER, from
/// busvisor's pid), and the run ends with the command's status.
#[test]
fn run_forwards_kill_but_not_the_terminals_ctrl_c_a_second_time() {
    use Step::*;
    let script = r#"
import signal, sys
sigs = {signal.SIGINT, signal.SIGTERM}
signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
print("ready", flush=True)
while True:
    i = signal.sigwaitinfo(sigs)
    print("got sig=%d code=%d from=%d" % (i.si_signo, i.si_code, i.si_pid), flush=True)
    if i.si_signo == signal.SIGTERM:
        sys.exit(7)
"#;
    let argv = busvisor_run(&["--log-level=debug", "--", "python3", "-c", script]);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let run = in_pty(
        &argv,
        &[],
        &[
            Type("", "ready"),
            Type("\x03", "sig=2"),
            Pause(1.5),
            Signal(libc::SIGTERM, "sig=15"),
        ],
        false,
    );
    assert_eq!(run.failed, None, "{run:?}");
    assert_eq!(run.status, Some(7), "{run:?}");
    // (The terminal echoes ^C before the first.)
    let got: Vec<&str> = run
        .out
        .lines()
        .filter_map(|l| l.find("got sig=").map(|at| &l[at..]))
        .collect();
    assert_eq!(got.len(), 2, "one SIGINT, one SIGTERM: {run:?}");
    assert!(got[0].starts_with("got sig=2 code=128 "), "{run:?}");
    // busvisor is the pty's child here, and the one that sent SIGTERM on.
    let from = field(got[1], "from").unwrap();
    assert!(got[1].starts_with("got sig=15 code=0 "), "{run:?}");
    assert_ne!(from, "0", "{run:?}");
    // Two SIGINTs close together may merge into one pending signal, so
    // busvisor's own account says what it sent.
    assert!(
        run.out
            .contains("not forwarded: the command got it from the terminal too signal=SIGINT"),
        "{run:?}"
    );
    assert!(
        run.out.contains("forwarded to the command signal=SIGTERM"),
        "{run:?}"
    );
}

/// Closing the terminal of a session that busvisor leads: the hangup's
/// SIGHUP goes to busvisor alone, and is forwarded to the command.
#[test]
fn run_forwards_a_hangup_it_alone_got() {
    use Step::*;
    let dir = tempfile::tempdir().unwrap();
    let mark = dir.path().join("hup");
    let script = format!(
        "trap 'echo hup > {}; exit 9' HUP; echo ready; while :; do sleep 0.1; done",
        mark.display()
    );
    let argv = busvisor_run(&["--", "sh", "-c", &script]);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let run = in_pty(&argv, &[], &[Type("", "ready")], true);
    assert_eq!(run.failed, None, "{run:?}");
    assert_eq!(run.status, Some(9), "{run:?}");
    assert_eq!(std::fs::read_to_string(&mark).unwrap(), "hup\n");
}

// ------------------------------------------------------------ run: init

/// `unshare --pid --fork --mount-proc` (as root; `-r` maps root in a user
/// namespace otherwise): busvisor is PID 1 of a new PID namespace. With
/// `--kill-child`, a test that kills unshare (its guard) ends the whole
/// namespace.
fn as_pid1(args: &[&str]) -> Command {
    let mut cmd = Command::new("unshare");
    if !nix::unistd::geteuid().is_root() {
        cmd.arg("-r");
    }
    cmd.args([
        "--pid",
        "--fork",
        "--kill-child",
        "--mount-proc",
        busvisor_bin(),
        "run",
        "--",
    ])
    .args(args)
    .env_remove("DBUS_SESSION_BUS_ADDRESS")
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    cmd
}

/// The child of `pid` (unshare's: busvisor, PID 1 inside).
fn only_child(pid: u32) -> Option<u32> {
    let list = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    list.split_whitespace().next()?.parse().ok()
}

/// As a container's init, busvisor reaps the orphans of its command (no
/// zombie left), forwards SIGHUP, SIGUSR1, SIGUSR2, SIGINT and SIGTERM sent
/// to PID 1 to it (each sent on by the bus, the command's parent), and
/// exits with its status; as tini.
#[test]
fn run_as_pid1_reaps_orphans_and_forwards_signals() {
    let script = r#"
import os, signal, subprocess, sys, time
sigs = {signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT, signal.SIGTERM}
signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
print("init=%s" % open("/proc/1/comm").read().strip(), flush=True)
print("ppid=%d" % os.getppid(), flush=True)
# Two orphans: their parent exits at once, they a little later.
subprocess.run(["sh", "-c", "sleep 0.3 & sleep 0.3 & exit 0"])
time.sleep(1.5)
def state(p):
    try:
        return open("/proc/%s/stat" % p).read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "?"
def comm(p):
    try:
        return open("/proc/%s/comm" % p).read().strip()
    except OSError:
        return "?"
pids = [p for p in os.listdir("/proc") if p.isdigit()]
print("sleeps=%d zombies=%d" % (len([p for p in pids if comm(p) == "sleep"]),
                                len([p for p in pids if state(p) == "Z"])), flush=True)
print("ready", flush=True)
while True:
    i = signal.sigwaitinfo(sigs)
    print("got sig=%d from=%d" % (i.si_signo, i.si_pid), flush=True)
    if i.si_signo == signal.SIGTERM:
        sys.exit(7)
"#;
    let mut child = ChildGuard::new(as_pid1(&["python3", "-c", script]).spawn().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut seen = Vec::new();
    let mut expect = |want: &str| -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match rx.recv_timeout(left) {
                Ok(l) => {
                    seen.push(l.clone());
                    if l.contains(want) {
                        return l;
                    }
                }
                Err(_) => break,
            }
        }
        panic!("no {want:?} in {seen:?}");
    };
    assert_eq!(expect("init="), "init=busvisor", "busvisor is not PID 1");
    // The bus: PID 1, or the bus process below it (see keeper.rs).
    let bus = expect("ppid=")["ppid=".len()..].to_owned();
    // Both orphans are gone, and none is left a zombie.
    assert_eq!(expect("zombies="), "sleeps=0 zombies=0");
    expect("ready");
    let init = only_child(child.pid()).expect("busvisor under unshare");
    for sig in [
        libc::SIGHUP,
        libc::SIGUSR1,
        libc::SIGUSR2,
        libc::SIGINT,
        libc::SIGTERM,
    ] {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(init as i32),
            nix::sys::signal::Signal::try_from(sig).unwrap(),
        )
        .unwrap();
        assert_eq!(expect("got "), format!("got sig={sig} from={bus}"));
    }
    let status = child.wait_timeout(Duration::from_secs(10)).expect("exit");
    assert_eq!(status.code(), Some(7), "{seen:?}");
}

/// A command killed by a signal: PID 1 leaves with 128 + N, as tini (and
/// a shell) report it.
#[test]
fn run_as_pid1_exits_with_128_plus_the_commands_signal() {
    let mut child = ChildGuard::new(
        as_pid1(&["sh", "-c", "echo ready; while :; do sleep 0.1; done"])
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(child.child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "ready\n");
    let init = only_child(child.pid()).expect("busvisor under unshare");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(init as i32),
        nix::sys::signal::Signal::SIGUSR1,
    )
    .unwrap();
    let status = child.wait_timeout(Duration::from_secs(10)).expect("exit");
    assert_eq!(status.code(), Some(128 + libc::SIGUSR1), "{status:?}");
}

// ------------------------------------------------------------ no bus by accident

/// `busvisor` with no subcommand, or with a flag that a control command
/// also takes, prints usage and exits 2; no bus listens anywhere (not at
/// the `--address` given, not at `$XDG_RUNTIME_DIR/bus`).
#[test]
fn a_typo_starts_no_bus() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = dir.path().to_str().unwrap();
    let sock = dir.path().join("typo");
    let address = format!("--address=unix:path={}", sock.display());
    let services = format!("--services-dir={runtime}");
    for args in [
        vec![],
        vec![address.as_str()],
        vec![address.as_str(), &services],
        vec!["--log-level=debug"],
    ] {
        let out = run_tool_env(
            busvisor_bin(),
            &args,
            &[("XDG_RUNTIME_DIR", runtime)],
            Duration::from_secs(10),
        );
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        assert!(out.stderr.contains("Usage: busvisor"), "{out:?}");
        assert!(out.stderr.contains("busvisor daemon"), "{out:?}");
        assert!(out.stdout.is_empty(), "{out:?}");
        assert!(!sock.exists() && !dir.path().join("bus").exists());
    }
}

/// busctl gets an answer from the bus at `address`.
fn assert_bus_answers(address: &str) {
    run_tool(
        "busctl",
        &[
            &format!("--address={address}"),
            "call",
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "GetId",
        ],
        OP_TIMEOUT,
    )
    .assert_ok();
}

/// Started as `dbus-daemon` (a symlink), busvisor is the daemon whatever
/// the flags: `--address` alone serves there.
#[test]
fn under_the_name_dbus_daemon_it_is_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("dbus-daemon");
    std::os::unix::fs::symlink(busvisor_bin(), &link).unwrap();
    let sock = dir.path().join("bus");
    let mut bus = ChildGuard::new(
        Command::new(&link)
            .arg(format!("--address=unix:path={}", sock.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert!(wait_until(Duration::from_secs(10), || sock.exists()));
    assert_bus_answers(&format!("unix:path={}", sock.display()));
    assert!(bus.is_running());
}

// ------------------------------------------------------------ the client's default bus

/// A command with `DBUS_SESSION_BUS_ADDRESS` unset and `$XDG_RUNTIME_DIR`.
fn without_session_address(program: &str, args: &[&str], runtime: Option<&Path>) -> ToolOutput {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_remove("DBUS_SESSION_BUS_ADDRESS")
        .env_remove("XDG_RUNTIME_DIR")
        .stdin(Stdio::null());
    if let Some(r) = runtime {
        cmd.env("XDG_RUNTIME_DIR", r);
    }
    let out = cmd.output().unwrap();
    ToolOutput {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// With `DBUS_SESSION_BUS_ADDRESS` unset the control commands use
/// `$XDG_RUNTIME_DIR/bus`, where `busvisor daemon` listens by default and
/// where GLib (gdbus) looks too; without one there, a clear error.
#[test]
fn the_client_finds_the_user_bus_in_xdg_runtime_dir() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = dir.path();
    let no_bus = without_session_address(busvisor_bin(), &["list"], Some(runtime));
    assert_eq!(no_bus.status.code(), Some(1), "{no_bus:?}");
    let want = format!("{}/bus", runtime.display());
    assert!(
        no_bus.stderr.contains(&want) && no_bus.stderr.contains("DBUS_SESSION_BUS_ADDRESS"),
        "{no_bus:?}"
    );
    let unset = without_session_address(busvisor_bin(), &["list"], None);
    assert_eq!(unset.status.code(), Some(1), "{unset:?}");
    assert!(unset.stderr.contains("XDG_RUNTIME_DIR"), "{unset:?}");

    let _bus = ChildGuard::new(
        Command::new(busvisor_bin())
            .arg("daemon")
            .env("XDG_RUNTIME_DIR", runtime)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert!(wait_until(Duration::from_secs(10), || runtime
        .join("bus")
        .exists()));
    let list = without_session_address(busvisor_bin(), &["list", "--json"], Some(runtime));
    assert!(list.success(), "{list:?}");
    let glib = without_session_address(
        "gdbus",
        &[
            "call",
            "--session",
            "--dest",
            "org.freedesktop.DBus",
            "--object-path",
            "/org/freedesktop/DBus",
            "--method",
            "org.freedesktop.DBus.GetNameOwner",
            "org.busvisor.Supervisor1",
        ],
        Some(runtime),
    );
    assert!(glib.success(), "{glib:?}");
}

// ------------------------------------------------------------ launch

/// The launch's variables, from sh output lines.
fn launched_pid(text: &str) -> u32 {
    field(text, "PID")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no PID= in {text:?}"))
}

/// Kill a launched bus by pid when the test ends, however it ends.
struct Launched(Vec<u32>);

impl Drop for Launched {
    fn drop(&mut self) {
        for pid in &self.0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

fn gone_within(pid: u32, t: Duration) -> bool {
    wait_until(t, || !pid_alive(pid))
}

/// What the session script checks on the bus it launched: gdbus and
/// busctl reach it, and the bus's own pid is DBUS_SESSION_BUS_PID.
const USE_THE_BUS: &str = r#"
echo "PID=$DBUS_SESSION_BUS_PID"
gdbus call --session --dest org.freedesktop.DBus --object-path /org/freedesktop/DBus \
    --method org.freedesktop.DBus.GetConnectionUnixProcessID org.freedesktop.DBus
busctl --address="$DBUS_SESSION_BUS_ADDRESS" call org.freedesktop.DBus /org/freedesktop/DBus \
    org.freedesktop.DBus GetId >/dev/null && echo "busctl=$((40+2))"
"#;

/// `eval $(busvisor launch --sh-syntax --exit-with-session)` in a real sh
/// on a real terminal: the bus is up for gdbus and busctl, outlives the
/// launch, and is gone once the terminal closes; dbus-launch alike.
#[test]
fn launch_exit_with_session_ends_with_the_terminal() {
    use Step::*;
    let launch = format!("{} launch", busvisor_bin());
    for launcher in [launch.as_str(), "dbus-launch"] {
        let script = format!(
            "eval \"$({launcher} --sh-syntax --exit-with-session)\"; {USE_THE_BUS} sleep 60"
        );
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().to_str().unwrap();
        let run = in_pty(
            &["sh", "-c", &script],
            &[("HOME", home)],
            &[Type("", "busctl=42")],
            true,
        );
        assert_eq!(run.failed, None, "{launcher}: {run:?}");
        let pid = launched_pid(&run.out);
        let _cleanup = Launched(vec![pid]);
        assert!(
            run.out.contains(&format!("(uint32 {pid},)")),
            "{launcher}: {run:?}"
        );
        assert!(
            gone_within(pid, Duration::from_secs(10)),
            "{launcher}: the bus {pid} outlived its terminal"
        );
    }
}

/// The descriptors of `pid` and of its children, as the files they open.
fn open_files(pid: u32) -> Vec<PathBuf> {
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    let pids =
        std::iter::once(pid).chain(children.split_whitespace().filter_map(|p| p.parse().ok()));
    pids.flat_map(|p: u32| {
        std::fs::read_dir(format!("/proc/{p}/fd"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .collect::<Vec<_>>()
    })
    .collect()
}

/// Without `--exit-with-session` the bus outlives the shell that launched
/// it (and holds neither the shell's output nor any descriptor it had
/// opened, as dbus-launch's), until it is stopped by its pid.
#[test]
fn launch_daemonizes() {
    let dir = tempfile::tempdir().unwrap();
    let held = dir.path().join("held-by-the-shell");
    std::fs::write(&held, "").unwrap();
    let script = format!(
        "exec 7<'{}'; eval \"$({} launch --sh-syntax)\"; {USE_THE_BUS}",
        held.display(),
        busvisor_bin()
    );
    let out = run_tool("sh", &["-c", &script], Duration::from_secs(20));
    assert!(out.success(), "{out:?}");
    let pid = launched_pid(&out.stdout);
    let _cleanup = Launched(vec![pid]);
    assert!(out.stdout.contains("busctl=42"), "{out:?}");
    assert!(pid_alive(pid), "{out:?}");
    let files = open_files(pid);
    assert!(
        files
            .iter()
            .any(|f| f.to_string_lossy().contains("signalfd")),
        "{files:?}"
    );
    assert!(!files.contains(&held), "{files:?}");
    // Its own process group, in /, not the launcher's child any more.
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap();
    assert_eq!(cwd, PathBuf::from("/"));
    assert_eq!(
        nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(pid as i32)))
            .unwrap()
            .as_raw(),
        pid as i32
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(gone_within(pid, Duration::from_secs(10)));
}

/// The address and pid printed the way dbus-launch prints them, in each
/// syntax (the same text once the address and the pid are replaced).
#[test]
fn launch_prints_what_dbus_launch_prints() {
    let launch = [busvisor_bin(), "launch"];
    for syntax in [
        None,
        Some("--sh-syntax"),
        Some("--csh-syntax"),
        Some("-s"),
        Some("-c"),
    ] {
        let mut texts = Vec::new();
        let mut pids = Launched(Vec::new());
        for launcher in [&launch[..], &["dbus-launch"][..]] {
            let mut args: Vec<&str> = launcher[1..].to_vec();
            args.extend(syntax);
            let dir = tempfile::tempdir().unwrap();
            let out = run_tool_env(
                launcher[0],
                &args,
                &[("HOME", dir.path().to_str().unwrap())],
                Duration::from_secs(20),
            );
            assert!(out.success(), "{launcher:?} {syntax:?}: {out:?}");
            let pid = field(&out.stdout, "DBUS_SESSION_BUS_PID")
                .map(|p| p.trim_end_matches(';'))
                .and_then(|p| p.parse::<u32>().ok())
                .unwrap_or_else(|| panic!("no pid: {out:?}"));
            pids.0.push(pid);
            let address = out
                .stdout
                .lines()
                .find_map(|l| l.split_once("DBUS_SESSION_BUS_ADDRESS").map(|x| x.1))
                .map(|rest| rest.trim_start_matches(['=', ' ', '\'']))
                .map(|rest| rest.trim_end_matches([';', '\'']))
                .unwrap()
                .to_owned();
            assert!(
                address.starts_with("unix:") && address.contains(",guid="),
                "{out:?}"
            );
            texts.push(
                out.stdout
                    .replace(&address, "ADDRESS")
                    .replace(&pid.to_string(), "PID"),
            );
        }
        assert_eq!(texts[0], texts[1], "{syntax:?}");
    }
}

/// `--binary-syntax`: the address, a NUL, the pid, the window id (0).
#[test]
fn launch_binary_syntax() {
    let out = Command::new(busvisor_bin())
        .args(["launch", "--binary-syntax"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let bytes = out.stdout;
    let nul = bytes.iter().position(|b| *b == 0).expect("NUL");
    let address = String::from_utf8(bytes[..nul].to_vec()).unwrap();
    let pid = i32::from_ne_bytes(bytes[nul + 1..nul + 5].try_into().unwrap());
    let _cleanup = Launched(vec![pid as u32]);
    assert_eq!(bytes.len(), nul + 1 + 4 + 8, "{bytes:?}");
    assert_eq!(&bytes[nul + 5..], &[0u8; 8]);
    assert!(pid_alive(pid as u32));
    assert_bus_answers(&address);
}

/// `busvisor launch PROG ARGS`, as an Xsession's `dbus-launch
/// --exit-with-session PROG`: PROG runs with the address set.
#[test]
fn launch_runs_a_program_on_the_bus() {
    let out = run_tool(
        busvisor_bin(),
        &[
            "launch",
            "sh",
            "-c",
            "echo \"A=$DBUS_SESSION_BUS_ADDRESS\"; busctl --address=\"$DBUS_SESSION_BUS_ADDRESS\" \
             call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus \
             GetConnectionUnixProcessID s org.freedesktop.DBus",
        ],
        Duration::from_secs(20),
    );
    assert!(out.success(), "{out:?}");
    let pid: u32 = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("u "))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("{out:?}"));
    let _cleanup = Launched(vec![pid]);
    assert!(field(&out.stdout, "A").is_some_and(|a| a.starts_with("unix:")));
    assert!(pid_alive(pid));
}

/// Nothing to watch: no bus is started, and the reason is given, as
/// dbus-launch gives it (dbus-launch prints the variables and then kills
/// its bus: busvisor fails before printing).
#[test]
fn launch_with_nothing_to_watch_fails_clearly() {
    for (flag, says) in [
        (
            "--exit-with-session",
            "No terminal on standard input and no X display",
        ),
        ("--exit-with-x11", "X11 initialization failed"),
    ] {
        let out = Command::new(busvisor_bin())
            .args(["launch", "--sh-syntax", flag])
            .env_remove("DISPLAY")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{flag}: {stderr}");
        assert!(stderr.contains(says), "{flag}: {stderr}");
        assert!(out.stdout.is_empty(), "{flag}: {out:?}");
    }
}

/// An X server (Xvfb on a display it picks itself), killed with the test.
struct Xvfb {
    proc: ChildGuard,
    display: String,
    _dir: tempfile::TempDir,
}

fn xvfb() -> Xvfb {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("display");
    let proc = ChildGuard::new(
        Command::new("sh")
            .args([
                "-c",
                "exec Xvfb -displayfd 3 -nolisten tcp -screen 0 320x240x24 3>\"$0\"",
            ])
            .arg(&report)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("Xvfb (package xvfb)"),
    );
    let mut display = String::new();
    assert!(
        wait_until(Duration::from_secs(15), || {
            display = std::fs::read_to_string(&report).unwrap_or_default();
            display.ends_with('\n')
        }),
        "Xvfb did not start"
    );
    Xvfb {
        proc,
        display: format!(":{}", display.trim()),
        _dir: dir,
    }
}

/// `--exit-with-x11`, and `--exit-with-session` with an X display, watch
/// the display (stdin is not a terminal here): the buses, and dbus-launch's
/// alike, are gone once the X server is.
#[test]
fn launch_exit_with_x11_ends_with_the_display() {
    let mut x = xvfb();
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().to_str().unwrap();
    let launch = format!("{} launch", busvisor_bin());
    let mut pids = Launched(Vec::new());
    for (launcher, flag) in [
        (launch.as_str(), "--exit-with-x11"),
        (launch.as_str(), "--exit-with-session"),
        ("dbus-launch", "--exit-with-x11"),
    ] {
        let script = format!("eval \"$({launcher} --sh-syntax {flag})\"; {USE_THE_BUS}");
        let out = run_tool_env(
            "sh",
            &["-c", &script],
            &[("DISPLAY", &x.display), ("HOME", home)],
            Duration::from_secs(20),
        );
        assert!(
            out.success() && out.stdout.contains("busctl=42"),
            "{launcher} {flag}: {out:?}"
        );
        pids.0.push(launched_pid(&out.stdout));
    }
    for pid in &pids.0 {
        assert!(pid_alive(*pid), "{pid} ended before the display");
    }
    x.proc.signal(nix::sys::signal::Signal::SIGTERM);
    x.proc.wait_timeout(Duration::from_secs(10));
    for pid in &pids.0 {
        assert!(
            gone_within(*pid, Duration::from_secs(10)),
            "the bus {pid} outlived the X display"
        );
    }
}
