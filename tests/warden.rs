//! A system bus started as root with `<user>`: busvisor splits into a root
//! warden (the main process) and a router running as `<user>`; services run
//! as their `User=`, as the warden's children, in a clean environment, and
//! busvisor stops them across users. Driven as a distribution would: real
//! dbus-send calls as `nobody` through setpriv, the real CLI as root.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{ALLOW_ALL_RULES, TestBus, run_tool, wait_until};
use nix::sys::signal::Signal;

/// These tests need root, the users they switch to, and setpriv.
fn runnable() -> bool {
    let ok = !common::is_reference()
        && nix::unistd::geteuid().is_root()
        && nix::unistd::User::from_name("messagebus")
            .ok()
            .flatten()
            .is_some()
        && nix::unistd::User::from_name("nobody")
            .ok()
            .flatten()
            .is_some()
        && Path::new("/usr/bin/setpriv").exists()
        && Path::new("/usr/bin/dbus-send").exists();
    if !ok {
        eprintln!("SKIPPED: needs root, users messagebus and nobody, setpriv and dbus-send");
    }
    ok
}

/// The test service and its library, copied where any user can read them
/// (the checkout may be in a directory only root can enter).
struct Fixtures {
    dir: tempfile::TempDir,
}

impl Fixtures {
    fn new() -> Fixtures {
        let dir = tempfile::Builder::new()
            .prefix("busvisor-warden")
            .tempdir()
            .unwrap();
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        for (from, to) in [
            ("tests/fixtures/testsvc.py", "tests/fixtures/testsvc.py"),
            ("services.d/minibus.py", "services.d/minibus.py"),
            ("services.d/daemon.py", "services.d/daemon.py"),
        ] {
            let to = dir.path().join(to);
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::copy(root.join(from), &to).unwrap();
        }
        for sub in ["", "tests", "tests/fixtures", "services.d"] {
            chmod(&dir.path().join(sub), 0o755);
        }
        for sub in ["services", "scratch", "toml"] {
            std::fs::create_dir(dir.path().join(sub)).unwrap();
        }
        chmod(&dir.path().join("services"), 0o755);
        chmod(&dir.path().join("toml"), 0o755);
        // The service (as nobody) writes its grandchild's pid here.
        chmod(&dir.path().join("scratch"), 0o777);
        Fixtures { dir }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn add_service(&self, name: &str, user: &str) {
        let text = format!(
            "[D-BUS Service]\nName={name}\nExec=/usr/bin/python3 {} {name} --say hello-from-{user} --grandchild {}\nUser={user}\n",
            self.path("tests/fixtures/testsvc.py").display(),
            self.path("scratch/grandchild").display(),
        );
        std::fs::write(self.path(&format!("services/{name}.service")), text).unwrap();
    }

    /// A `[D-BUS Service]` file for the double-forking example daemon.
    fn add_daemon(&self, user: &str) {
        let name = "org.busvisor.Example.Daemon";
        let text = format!(
            "[D-BUS Service]\nName={name}\nExec=/usr/bin/python3 {}\nUser={user}\n",
            self.path("services.d/daemon.py").display(),
        );
        std::fs::write(self.path(&format!("services/{name}.service")), text).unwrap();
    }

    /// A busvisor TOML definition (a restart policy, which `[D-BUS
    /// Service]` files cannot have).
    fn add_toml(&self, id: &str, text: &str) {
        std::fs::write(self.path(&format!("toml/{id}.toml")), text).unwrap();
    }
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn start_system_bus(fx: &Fixtures) -> TestBus {
    start_system_bus_with(fx, &[])
}

fn start_system_bus_with(fx: &Fixtures, args: &[&str]) -> TestBus {
    let config = format!(
        r#"<busconfig>
  <type>system</type>
  <user>messagebus</user>
  <auth>EXTERNAL</auth>
  <servicedir>{}</servicedir>
  <pidfile>{}</pidfile>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
{ALLOW_ALL_RULES}
  </policy>
</busconfig>
"#,
        fx.path("services").display(),
        fx.path("pidfile").display(),
    );
    let bus = common::start_bus_with_args(Some(&config), args);
    // Clients and services of other users reach the socket through its
    // directory.
    chmod(bus.dir.path(), 0o755);
    bus
}

/// Uid, ppid and command name of a process, from /proc.
fn proc_info(pid: u32) -> Option<(u32, u32, String)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| v.split_whitespace().next().unwrap_or("").to_owned())
    };
    let uid = field("Uid:")?.parse().ok()?;
    let ppid = field("PPid:")?.parse().ok()?;
    Some((uid, ppid, field("Name:")?))
}

/// The live processes whose parent is `ppid`.
fn children(ppid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|&p| common::proc_stat(p).is_some_and(|(pp, st)| pp == ppid && st != 'Z'))
        .collect()
}

/// The router: the warden's child running busvisor.
fn router_of(warden: u32) -> u32 {
    let routers: Vec<u32> = children(warden)
        .into_iter()
        .filter(|&p| proc_info(p).is_some_and(|(_, _, n)| n == "busvisor"))
        .collect();
    assert_eq!(routers.len(), 1, "one router under the warden");
    routers[0]
}

fn uid_of(name: &str) -> u32 {
    nix::unistd::User::from_name(name)
        .unwrap()
        .unwrap()
        .uid
        .as_raw()
}

/// Call the test service as `nobody`; the reply's last line's value.
/// Call the test service as `nobody`; the reply's last value.
fn call_as_nobody(bus: &TestBus, member: &str, args: &[&str]) -> String {
    let method = format!("org.busvisor.Test.{member}");
    send_as_nobody(
        bus,
        "org.busvisor.Test",
        "/org/busvisor/Test",
        &method,
        args,
    )
}

/// `dbus-send --print-reply` as `nobody`; the reply's last value.
fn send_as_nobody(bus: &TestBus, dest: &str, path: &str, method: &str, args: &[&str]) -> String {
    let address = format!("--bus={}", bus.address);
    let dest = format!("--dest={dest}");
    let mut argv = vec![
        "--reuid=nobody",
        "--regid=nogroup",
        "--clear-groups",
        "dbus-send",
        &address,
        "--print-reply",
        &dest,
        path,
        method,
    ];
    argv.extend_from_slice(args);
    let out = run_tool("setpriv", &argv, common::OP_TIMEOUT);
    assert!(
        out.success(),
        "{method} as nobody failed: {}\nbus log:\n{}",
        out.stderr,
        bus.log()
    );
    let last = out.stdout.lines().last().unwrap_or("").trim().to_owned();
    last.split_once(' ')
        .map(|(_, v)| v.trim_matches('"').to_owned())
        .unwrap_or(last)
}

fn busvisor_cli(bus: &TestBus, args: &[&str]) -> common::ToolOutput {
    common::run_tool_env(
        common::busvisor_bin(),
        args,
        &[("DBUS_SESSION_BUS_ADDRESS", &bus.address)],
        Duration::from_secs(30),
    )
}

fn alive(pid: u32) -> bool {
    common::proc_stat(pid).is_some_and(|(_, st)| st != 'Z')
}

#[test]
fn the_router_runs_as_user_and_services_as_theirs_under_the_warden() {
    if !runnable() {
        return;
    }
    let fx = Fixtures::new();
    fx.add_service("org.busvisor.Test", "nobody");
    let mut bus = start_system_bus(&fx);
    let warden = bus.pid();

    // The warden is root, the keeper's child (the keeper is the bus's main
    // process, in the pidfile); the router is the warden's child, as
    // messagebus.
    assert_eq!(proc_info(warden).unwrap().0, 0);
    assert_eq!(proc_info(warden).unwrap().1, bus.keeper_pid());
    let pidfile = std::fs::read_to_string(fx.path("pidfile")).unwrap();
    assert_eq!(pidfile.trim(), bus.keeper_pid().to_string());
    let router = router_of(warden);
    assert_eq!(proc_info(router).unwrap().0, uid_of("messagebus"));

    // Activated by an unprivileged caller: runs as nobody, as the warden's
    // child, with only the launch helper's variables and busvisor's token.
    let pid: u32 = call_as_nobody(&bus, "Pid", &[]).parse().unwrap();
    let (uid, ppid, _) = proc_info(pid).unwrap();
    assert_eq!(uid, uid_of("nobody"));
    assert_eq!(ppid, warden, "the service is the warden's child");
    assert_eq!(call_as_nobody(&bus, "Ppid", &[]), warden.to_string());
    for (var, want) in [
        ("DBUS_STARTER_BUS_TYPE", "system"),
        ("PATH", "<unset>"),
        ("HOME", "<unset>"),
        ("RUST_LOG", "<unset>"),
    ] {
        assert_eq!(
            call_as_nobody(&bus, "Env", &[&format!("string:{var}")]),
            want
        );
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let blocked = status.lines().find(|l| l.starts_with("SigBlk:")).unwrap();
    assert!(
        blocked.ends_with("0000000000000000"),
        "no signal blocked: {blocked}"
    );

    // Its grandchild (setsid) is in the tree too; a stop by root ends both,
    // by their stop signal (well before the 10 s SIGKILL).
    let grandchild: u32 = std::fs::read_to_string(fx.path("scratch/grandchild"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(alive(grandchild));
    // Its output comes through the warden's pipes.
    let logs = busvisor_cli(&bus, &["logs", "org.busvisor.Test"]);
    logs.assert_ok();
    assert!(logs.stdout.contains("hello-from-nobody"), "{}", logs.stdout);
    let t = Instant::now();
    busvisor_cli(&bus, &["stop", "org.busvisor.Test"]).assert_ok();
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    assert!(wait_until(Duration::from_secs(2), || !alive(pid) && !alive(grandchild)));

    // Restart across users, then SIGTERM to the warden ends everything and
    // removes the pidfile and the socket.
    let again: u32 = call_as_nobody(&bus, "Pid", &[]).parse().unwrap();
    assert_ne!(again, pid);
    let out = busvisor_cli(&bus, &["restart", "org.busvisor.Test"]);
    out.assert_ok();
    assert!(wait_until(Duration::from_secs(2), || !alive(again)));
    let third: u32 = call_as_nobody(&bus, "Pid", &[]).parse().unwrap();
    assert_eq!(proc_info(third).unwrap().1, warden);
    bus.proc.signal(Signal::SIGTERM);
    let st = bus.proc.wait_timeout(Duration::from_secs(15));
    assert_eq!(st.and_then(|s| s.code()), Some(0), "log:\n{}", bus.log());
    assert!(!alive(third) && !alive(router));
    assert!(!fx.path("pidfile").exists(), "the pidfile is removed");
    assert!(!bus.socket.exists(), "the socket file is removed");
    let cgroups = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    if let Some(mount) = cgroups.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        right
            .starts_with("cgroup2 ")
            .then(|| left.split_whitespace().nth(4).map(str::to_owned))?
    }) {
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let rel = own.lines().find_map(|l| l.strip_prefix("0::")).unwrap();
        let dir = Path::new(&mount)
            .join(rel.trim_start_matches('/'))
            .join(format!("busvisor-{warden}"));
        assert!(!dir.exists(), "{} is removed", dir.display());
    }
}

#[test]
fn a_router_that_dies_takes_its_services_with_it() {
    if !runnable() {
        return;
    }
    let fx = Fixtures::new();
    fx.add_service("org.busvisor.Test", "nobody");
    let mut bus = start_system_bus(&fx);
    let warden = bus.pid();
    let pid: u32 = call_as_nobody(&bus, "Pid", &[]).parse().unwrap();
    let router = router_of(warden);
    // The router is the part exposed to clients: if it is killed, the
    // warden ends the services and exits, leaving nothing behind.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(router as i32), Signal::SIGKILL).unwrap();
    let st = bus.proc.wait_timeout(Duration::from_secs(15));
    assert!(
        st.is_some_and(|s| !s.success()),
        "the warden exits, failing"
    );
    assert!(!alive(pid));
}

/// A bus in a private mount namespace (tmpfs on /run/dbus), so that it can
/// listen where system clients and services look; ended by SIGTERM (its
/// services with it) even when the test fails.
struct NamespacedBus {
    proc: common::ChildGuard,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl NamespacedBus {
    fn start(args: &[&str]) -> NamespacedBus {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("bus.log");
        let out = dir.path().join("address");
        let script = r#"mount -t tmpfs tmpfs /run/dbus && exec "$@""#;
        let child = std::process::Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c", script, "sh"])
            .arg(common::busvisor_bin())
            .args(args)
            .args(["--nofork", "--print-address"])
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let bus = NamespacedBus {
            proc: common::ChildGuard::new(child),
            log,
            _dir: dir,
        };
        assert!(
            wait_until(common::OP_TIMEOUT, || std::fs::read_to_string(&out)
                .is_ok_and(|s| s.ends_with('\n'))),
            "no address; log:\n{}",
            bus.log()
        );
        bus
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Run a program in the bus's mount namespace, as root or through
    /// setpriv as `nobody`.
    fn run(&self, nobody: bool, argv: &[&str]) -> common::ToolOutput {
        let pid = self.proc.pid().to_string();
        let mut all = vec!["-t", &pid, "-m"];
        if nobody {
            all.extend([
                "setpriv",
                "--reuid=nobody",
                "--regid=nogroup",
                "--clear-groups",
            ]);
        }
        all.extend_from_slice(argv);
        run_tool("nsenter", &all, common::OP_TIMEOUT)
    }

    fn stop(&mut self) -> Option<std::process::ExitStatus> {
        self.proc.signal(Signal::SIGTERM);
        self.proc.wait_timeout(Duration::from_secs(20))
    }
}

impl Drop for NamespacedBus {
    fn drop(&mut self) {
        if self.proc.is_running() {
            self.stop();
        }
    }
}

/// The last word of `dbus-send --print-reply`'s output, a number.
fn last_u32(out: &str) -> u32 {
    out.split_whitespace().last().unwrap().parse().unwrap()
}

/// Debian's own polkitd, activated by an unprivileged caller through
/// Debian's own system.conf, system.d and service file: started as root by
/// the warden, it drops to its user and stays the warden's child; its
/// user-context `own` rule lets it take its name, and nobody else can.
#[test]
fn debians_polkitd_runs_supervised_under_the_warden() {
    if !runnable() {
        return;
    }
    let polkitd = "/usr/lib/polkit-1/polkitd";
    let conf = "/usr/share/dbus-1/system.conf";
    if !Path::new(polkitd).exists() || !Path::new(conf).exists() || !Path::new("/run/dbus").is_dir()
    {
        eprintln!("SKIPPED: needs polkitd, dbus's system.conf and /run/dbus");
        return;
    }
    let mut bus = NamespacedBus::start(&["--system", "--nosyslog"]);
    let warden = children(bus.proc.pid())[0];
    // The process that handles messages runs as messagebus.
    let router = router_of(warden);
    assert_eq!(proc_info(router).unwrap().0, uid_of("messagebus"));
    let enumerate = bus.run(
        true,
        &[
            "dbus-send",
            "--system",
            "--print-reply",
            "--dest=org.freedesktop.PolicyKit1",
            "/org/freedesktop/PolicyKit1/Authority",
            "org.freedesktop.DBus.Properties.Get",
            "string:org.freedesktop.PolicyKit1.Authority",
            "string:BackendName",
        ],
    );
    assert!(
        enumerate.success() && enumerate.stdout.contains("js"),
        "{}{}\nlog:\n{}",
        enumerate.stdout,
        enumerate.stderr,
        bus.log()
    );
    let get_pid = [
        "dbus-send",
        "--system",
        "--print-reply",
        "--dest=org.freedesktop.DBus",
        "/org/freedesktop/DBus",
        "org.freedesktop.DBus.GetConnectionUnixProcessID",
        "string:org.freedesktop.PolicyKit1",
    ];
    let pid_reply = bus.run(false, &get_pid);
    pid_reply.assert_ok();
    let pid = last_u32(&pid_reply.stdout);
    let (uid, ppid, _) = proc_info(pid).unwrap();
    assert_eq!(uid, uid_of("polkitd"), "polkitd dropped to its user");
    assert_eq!(ppid, warden, "polkitd is the warden's child");

    let squat = bus.run(
        true,
        &[
            "dbus-send",
            "--system",
            "--print-reply",
            "--dest=org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus.RequestName",
            "string:org.freedesktop.PolicyKit1",
            "uint32:0",
        ],
    );
    assert!(!squat.success());
    assert!(
        squat.stderr.contains("org.freedesktop.DBus.Error.AccessDenied")
            && squat.stderr.contains(
                "is not allowed to own the service \"org.freedesktop.PolicyKit1\" due to security policies in the configuration file"
            ),
        "{}",
        squat.stderr
    );

    // `busvisor --system status` shows it running, with its pid.
    let status = bus.run(
        false,
        &[
            common::busvisor_bin(),
            "--system",
            "show",
            "org.freedesktop.PolicyKit1",
        ],
    );
    status.assert_ok();
    assert!(
        status.stdout.lines().any(|l| l == "State=running")
            && status
                .stdout
                .lines()
                .any(|l| l.starts_with("PIDs=") && l.contains(&pid.to_string())),
        "{}",
        status.stdout
    );

    // What nobody may not do: become a monitor, change the activation
    // environment, use the control API.
    for argv in [
        &[
            "dbus-send",
            "--system",
            "--print-reply",
            "--dest=org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus.Monitoring.BecomeMonitor",
            "array:string:",
            "uint32:0",
        ][..],
        &[
            "dbus-send",
            "--system",
            "--print-reply",
            "--dest=org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus.UpdateActivationEnvironment",
            "dict:string:string:FOO,bar",
        ][..],
        &[
            common::busvisor_bin(),
            "--system",
            "stop",
            "org.freedesktop.PolicyKit1",
        ][..],
    ] {
        let out = bus.run(true, argv);
        assert!(
            !out.success() && out.stderr.contains("AccessDenied"),
            "{argv:?}: {}{}",
            out.stdout,
            out.stderr
        );
    }
    assert!(alive(pid));

    // Root restarts it through the control API (open to root on a system
    // bus): root's warden stops a polkitd-user process and starts another.
    let restart = bus.run(
        false,
        &[
            common::busvisor_bin(),
            "--system",
            "restart",
            "org.freedesktop.PolicyKit1",
        ],
    );
    restart.assert_ok();
    assert!(wait_until(Duration::from_secs(5), || !alive(pid)));
    let pid_reply = bus.run(false, &get_pid);
    pid_reply.assert_ok();
    let again = last_u32(&pid_reply.stdout);
    assert_ne!(again, pid);
    assert_eq!(proc_info(again).unwrap().1, warden);

    let st = bus.stop();
    assert_eq!(st.and_then(|s| s.code()), Some(0), "log:\n{}", bus.log());
    assert!(!alive(again), "polkitd ends with the bus");
}

/// A classic double-forking daemon started as nobody: its launcher exits 0,
/// the daemon is re-parented to the warden, busvisor knows it as the
/// service's main process (through its cgroup: the router cannot read a
/// nobody process's environment... it could here, but not a root one's),
/// and a stop ends it.
#[test]
fn a_double_forking_daemon_of_another_user_stays_supervised() {
    if !runnable() {
        return;
    }
    let fx = Fixtures::new();
    fx.add_daemon("nobody");
    let bus = start_system_bus(&fx);
    let warden = bus.pid();
    let (dest, path) = (
        "org.busvisor.Example.Daemon",
        "/org/busvisor/Example/Daemon",
    );
    let pid: u32 = send_as_nobody(&bus, dest, path, &format!("{dest}.Pid"), &[])
        .parse()
        .unwrap();
    let ppid: u32 = send_as_nobody(&bus, dest, path, &format!("{dest}.Ppid"), &[])
        .parse()
        .unwrap();
    assert_eq!(ppid, warden, "re-parented to the warden, not to init");
    assert_eq!(proc_info(pid).unwrap().0, uid_of("nobody"));
    let status = busvisor_cli(&bus, &["show", dest]);
    status.assert_ok();
    assert!(
        status.stdout.lines().any(|l| l == format!("MainPID={pid}")),
        "{}",
        status.stdout
    );
    let t = Instant::now();
    busvisor_cli(&bus, &["stop", dest]).assert_ok();
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    assert!(wait_until(Duration::from_secs(2), || !alive(pid)));
}

/// A restart policy across users: a nobody service that crashes is started
/// again by the warden, as nobody.
#[test]
fn a_crashed_service_of_another_user_is_restarted() {
    if !runnable() {
        return;
    }
    let fx = Fixtures::new();
    let script = fx.path("tests/fixtures/testsvc.py");
    fx.add_toml(
        "crashy",
        &format!(
            "name = \"org.busvisor.Test\"\nexec = [\"/usr/bin/python3\", \"{}\", \"org.busvisor.Test\"]\nuser = \"nobody\"\nrestart = \"on-failure\"\nrestart_delay = \"100ms\"\n",
            script.display()
        ),
    );
    let toml = fx.path("toml");
    let dir = format!("--services-dir={}", toml.display());
    let bus = start_system_bus_with(&fx, &[&dir]);
    let first: u32 = call_as_nobody(&bus, "Pid", &[]).parse().unwrap();
    // Exit(1) without a reply: the call fails, the service is restarted.
    let address = format!("--bus={}", bus.address);
    let _ = run_tool(
        "setpriv",
        &[
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "dbus-send",
            &address,
            "--print-reply",
            "--dest=org.busvisor.Test",
            "/org/busvisor/Test",
            "org.busvisor.Test.Exit",
            "int32:1",
        ],
        common::OP_TIMEOUT,
    );
    // Restarted by its policy, not by a call (none is made meanwhile).
    let main_pid = || {
        let out = busvisor_cli(&bus, &["show", "crashy", "-p", "State,MainPID"]);
        let running = out.stdout.lines().any(|l| l == "State=running");
        out.stdout
            .lines()
            .find_map(|l| l.strip_prefix("MainPID="))
            .and_then(|v| v.trim().parse::<u32>().ok())
            .filter(|_| running)
    };
    let restarted = wait_until(Duration::from_secs(10), || {
        main_pid().is_some_and(|p| p != first)
    });
    assert!(restarted, "not restarted; log:\n{}", bus.log());
    let second: u32 = call_as_nobody(&bus, "Pid", &[]).parse().unwrap();
    assert_eq!(Some(second), main_pid());
    let (uid, ppid, _) = proc_info(second).unwrap();
    assert_eq!((uid, ppid), (uid_of("nobody"), bus.pid()));
}

/// A service of another user whose helper ignores SIGTERM and keeps
/// replacing itself (each generation starts the next and exits: its pid is
/// never the same for long) is stopped within its stop timeout: the warden
/// kills the invocation's cgroup (which the router, running as messagebus,
/// may not write) as the router signals each process it knows.
#[test]
fn a_stop_under_the_warden_kills_the_whole_cgroup() {
    if !runnable() || busvisor_cgroups_off() {
        return;
    }
    let fx = Fixtures::new();
    let chain = fx.path("scratch/chain.sh");
    std::fs::write(&chain, "#!/bin/sh\ntrap '' TERM\n\"$0\" &\nexit 0\n").unwrap();
    chmod(&chain, 0o755);
    let script = fx.path("tests/fixtures/testsvc.py");
    fx.add_toml(
        "chain",
        &format!(
            "name = \"org.busvisor.Test\"\nexec = [\"/bin/sh\", \"-c\", \"{} & exec /usr/bin/python3 {} org.busvisor.Test\"]\nuser = \"nobody\"\nstop_timeout = \"500ms\"\n",
            chain.display(),
            script.display()
        ),
    );
    let toml = fx.path("toml");
    let dir = format!("--services-dir={}", toml.display());
    let bus = start_system_bus_with(&fx, &[&dir]);
    let _: u32 = call_as_nobody(&bus, "Pid", &[]).parse().unwrap();
    let t = Instant::now();
    busvisor_cli(&bus, &["stop", "chain"]).assert_ok();
    let took = t.elapsed();
    let chains = || {
        common::pids_with_env("BUSVISOR_INVOCATION", "chain-").len()
            + std::fs::read_dir("/proc")
                .unwrap()
                .flatten()
                .filter(|e| {
                    std::fs::read_to_string(e.path().join("cmdline"))
                        .is_ok_and(|c| c.contains("chain.sh"))
                })
                .count()
    };
    assert!(
        wait_until(Duration::from_secs(2), || chains() == 0),
        "the chain survived the stop ({took:?})"
    );
    assert!(took < Duration::from_secs(3), "the stop took {took:?}");
}

fn busvisor_cgroups_off() -> bool {
    std::env::var("BUSVISOR_CGROUPS").as_deref() == Ok("0")
}
