//! busvisor as `dbus-daemon --system`: Debian's system.conf (a copy whose
//! sockets, includes and service directory are temporary), real clients as
//! root and as `nobody`, and the errors of system bus activation. Needs
//! root (setpriv, root-owned service files) and Debian's system.conf;
//! skips otherwise.
//!
//! `BUSVISOR_TEST_REFERENCE=1` runs the same tests against dbus-daemon, to
//! show that the texts are dbus-daemon's. dbus-daemon starts system
//! services through its setuid launch helper, which accepts only the
//! system.conf `<user>` (messagebus) as its caller and reads only the
//! standard service directories: so the reference bus keeps `<user>` and
//! runs in a private mount namespace where the temporary service directory
//! is bind-mounted on /usr/share/dbus-1/system-services.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::*;

const DEBIAN_SYSTEM_CONF: &str = "/usr/share/dbus-1/system.conf";
const NOBODY: &str = "65534";

/// Root, and Debian's system.conf to copy; else the test is skipped.
fn can_run() -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return false;
    }
    if !Path::new(DEBIAN_SYSTEM_CONF).is_file() {
        eprintln!("skipped: no {DEBIAN_SYSTEM_CONF}");
        return false;
    }
    true
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The policy the tests add in system.d: root may own the two test names
/// and change the activation environment; anyone may call one of them, and
/// one service that activation will refuse.
const SYSTEM_D: &str = r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <policy user="root">
    <allow own="org.busvisor.Test.Allowed"/>
    <allow own="org.busvisor.Test.Undeclared"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus"
           send_member="UpdateActivationEnvironment"/>
  </policy>
  <policy context="default">
    <allow send_destination="org.busvisor.Test.Allowed"/>
    <allow send_destination="org.busvisor.Test.NoUser"/>
  </policy>
</busconfig>
"#;

/// The files of a test system bus: its system.d and its one service
/// directory, root's and readable by messagebus.
struct Files {
    root: tempfile::TempDir,
}

impl Files {
    fn new() -> Files {
        let root = tempfile::Builder::new()
            .prefix("busvisor-system")
            .tempdir()
            .unwrap();
        chmod(root.path(), 0o755);
        for d in ["system.d", "system-services"] {
            std::fs::create_dir(root.path().join(d)).unwrap();
            chmod(&root.path().join(d), 0o755);
        }
        let f = Files { root };
        f.write_conf("test.conf", SYSTEM_D);
        f
    }

    fn system_d(&self) -> PathBuf {
        self.root.path().join("system.d")
    }

    fn services(&self) -> PathBuf {
        self.root.path().join("system-services")
    }

    fn write_conf(&self, name: &str, text: &str) {
        let p = self.system_d().join(name);
        std::fs::write(&p, text).unwrap();
        chmod(&p, 0o644);
    }

    fn write_service(&self, file: &str, body: &str) {
        let p = self.services().join(file);
        std::fs::write(&p, format!("[D-BUS Service]\n{body}")).unwrap();
        chmod(&p, 0o644);
    }

    /// Debian's system.conf with this test's socket, system.d and service
    /// directory, without the machine's own includes or a pid file; with
    /// `<user>` only for dbus-daemon (see the module's comment).
    fn system_conf(&self, socket: &Path) -> String {
        let text = std::fs::read_to_string(DEBIAN_SYSTEM_CONF).unwrap();
        let user = if is_reference() {
            "<user>messagebus</user>"
        } else {
            ""
        };
        let replace = [
            ("<user>messagebus</user>", user.to_owned()),
            ("<pidfile>/run/dbus/pid</pidfile>", String::new()),
            (
                "<listen>unix:path=/run/dbus/system_bus_socket</listen>",
                format!("<listen>unix:path={}</listen>", socket.display()),
            ),
            (
                "<standard_system_servicedirs/>",
                format!("<servicedir>{}</servicedir>", self.services().display()),
            ),
            (
                "<includedir>system.d</includedir>",
                format!("<includedir>{}</includedir>", self.system_d().display()),
            ),
            (
                "<includedir>/etc/dbus-1/system.d</includedir>",
                String::new(),
            ),
            (
                r#"<include ignore_missing="yes">/etc/dbus-1/system.conf</include>"#,
                String::new(),
            ),
            (
                r#"<include ignore_missing="yes">/etc/dbus-1/system-local.conf</include>"#,
                String::new(),
            ),
        ];
        let mut out = text;
        for (from, to) in replace {
            assert!(out.contains(from), "{DEBIAN_SYSTEM_CONF} has no {from}");
            out = out.replace(from, &to);
        }
        assert!(out.contains("<type>system</type>"));
        out
    }
}

/// A system bus for one test, killed (by pid) when dropped.
struct SystemBus {
    bus: TestBus,
    /// The daemon's own pid (dbus-daemon runs under unshare).
    pid: u32,
}

impl Drop for SystemBus {
    fn drop(&mut self) {
        if self.pid != self.bus.pid() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

fn start_system_bus(files: &Files) -> SystemBus {
    let dir = tempfile::Builder::new()
        .prefix("busvisor-test")
        .tempdir()
        .unwrap();
    chmod(dir.path(), 0o755);
    let socket = dir.path().join("bus");
    let conf = dir.path().join("system.conf");
    std::fs::write(&conf, files.system_conf(&socket)).unwrap();
    chmod(&conf, 0o644);
    let stderr_path = dir.path().join("busvisor.log");
    let args = [
        format!("--config-file={}", conf.display()),
        "--nofork".into(),
        "--nopidfile".into(),
        // The machine's system log is not the tests'.
        "--nosyslog".into(),
        "--print-address=1".into(),
        "--print-pid=1".into(),
    ];
    let mut cmd = if is_reference() {
        // A private mount namespace: the launch helper finds the test's
        // service files where it looks for every system service.
        let mut c = Command::new("unshare");
        c.args(["-m", "sh", "-c"]).arg(
            "mount --bind \"$0\" /usr/share/dbus-1/system-services && exec dbus-daemon \"$@\"",
        );
        c.arg(files.services());
        c
    } else {
        Command::new(busvisor_bin())
    };
    cmd.args(&args)
        .env("RUST_LOG", "debug")
        .env_remove("DBUS_SESSION_BUS_ADDRESS")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr_path).unwrap());
    let mut child = cmd.spawn().expect("spawn the bus");
    let stdout = child.stdout.take().unwrap();
    let proc = ChildGuard::new(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let address = lines.next().and_then(Result::ok).unwrap_or_default();
        let pid = lines.next().and_then(Result::ok).unwrap_or_default();
        let _ = tx.send((address, pid));
    });
    let log = || std::fs::read_to_string(&stderr_path).unwrap_or_default();
    let (address, pid) = rx
        .recv_timeout(OP_TIMEOUT)
        .unwrap_or_else(|_| panic!("no address within {OP_TIMEOUT:?}; log:\n{}", log()));
    let pid: u32 = pid
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("no pid ({address:?}); log:\n{}", log()));
    let address = address.trim().to_owned();
    assert!(
        address.starts_with(&format!("unix:path={}", socket.display())),
        "{address:?}"
    );
    SystemBus {
        pid,
        bus: TestBus {
            address,
            socket,
            dir,
            stderr_path,
            proc,
        },
    }
}

/// `dbus-send --print-reply` as `nobody`: (exit status, stdout + stderr).
fn send_as_nobody(address: &str, args: &[&str]) -> (Option<i32>, String) {
    let bus = format!("--bus={address}");
    let mut all = vec![
        "--reuid",
        NOBODY,
        "--regid",
        "nogroup",
        "--clear-groups",
        "dbus-send",
        &bus,
        "--print-reply",
    ];
    all.extend_from_slice(args);
    let out = run_tool("setpriv", &all, Duration::from_secs(20));
    (out.status.code(), format!("{}{}", out.stdout, out.stderr))
}

/// A text with its processes' ids and command lines made the same in every
/// run: `pid=N` and `comm="..."`.
fn normalized(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    loop {
        let pid = rest.find("pid=");
        let comm = rest.find("comm=\"");
        match (pid, comm) {
            (Some(p), c) if c.is_none_or(|c| p < c) => {
                out.push_str(&rest[..p]);
                out.push_str("pid=N");
                rest = rest[p + 4..].trim_start_matches(|c: char| c.is_ascii_digit());
            }
            (_, Some(c)) => {
                out.push_str(&rest[..c]);
                out.push_str("comm=\"...\"");
                let after = &rest[c + 6..];
                rest = after.find('"').map_or("", |j| &after[j + 1..]);
            }
            (None, None) => break,
            (Some(_), None) => unreachable!("handled above"),
        }
    }
    out.push_str(rest);
    out
}

/// A connection of root's that owns `name` and answers every method call
/// with an empty reply.
async fn owner(address: &str, name: &str) -> zbus::Connection {
    use futures_util::StreamExt;
    let conn = connect(address).await;
    let mut calls = stream(&conn);
    let got: u32 = bus_ok(&conn, "RequestName", &(name, 0u32)).await;
    assert_eq!(got, 1, "RequestName {name}");
    let replier = conn.clone();
    tokio::spawn(async move {
        while let Some(Ok(m)) = calls.next().await {
            if m.message_type() == zbus::message::Type::MethodCall {
                let _ = replier.reply(&m.header(), &()).await;
            }
        }
    });
    conn
}

/// A D-Bus error's name and text.
fn error_parts(e: &zbus::Error) -> (String, String) {
    use zbus::DBusError;
    match e {
        zbus::Error::MethodError(name, text, _) => {
            (name.to_string(), text.clone().unwrap_or_default())
        }
        zbus::Error::FDO(f) => (
            f.name().to_string(),
            f.description().unwrap_or_default().to_owned(),
        ),
        other => panic!("not a D-Bus error: {other}"),
    }
}

/// StartServiceByName as root: the error's name and text.
async fn start_error(address: &str, name: &str) -> (String, String) {
    let conn = connect(address).await;
    match bus_call(&conn, "StartServiceByName", &(name, 0u32)).await {
        Ok(m) => panic!("{name} started: {m:?}"),
        Err(e) => error_parts(&e),
    }
}

#[tokio::test]
async fn nobody_calls_only_where_system_d_allows() {
    if !can_run() {
        return;
    }
    let files = Files::new();
    let sys = start_system_bus(&files);
    let address = sys.bus.address.clone();
    let _allowed = owner(&address, "org.busvisor.Test.Allowed").await;
    let _undeclared = owner(&address, "org.busvisor.Test.Undeclared").await;
    // Off the runtime: the owners answer on it meanwhile.
    let ping = |dest: &str| {
        let dest = format!("--dest={dest}");
        let (address, dest) = (address.clone(), dest.clone());
        tokio::task::spawn_blocking(move || {
            send_as_nobody(&address, &[&dest, "/", "org.freedesktop.DBus.Peer.Ping"])
        })
    };
    let (code, out) = ping("org.busvisor.Test.Allowed").await.unwrap();
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("method return"), "{out}");

    let (code, out) = ping("org.busvisor.Test.Undeclared").await.unwrap();
    assert_ne!(code, Some(0), "{out}");
    let want = "Error org.freedesktop.DBus.Error.AccessDenied: Rejected send message, 1 \
                matched rules; type=\"method_call\", sender=\":1.3\" (uid=65534 pid=N \
                comm=\"...\") interface=\"org.freedesktop.DBus.Peer\" member=\"Ping\" error \
                name=\"(unset)\" requested_reply=\"0\" destination=\"org.busvisor.Test.Undeclared\" \
                (uid=0 pid=N comm=\"...\")";
    assert_eq!(normalized(out.trim()), want, "{out}");
}

#[tokio::test]
async fn update_activation_environment_is_refused() {
    if !can_run() {
        return;
    }
    let files = Files::new();
    let sys = start_system_bus(&files);
    // root, whom test.conf lets through the policy: the system bus itself
    // refuses.
    let conn = connect(&sys.bus.address).await;
    let vars = std::collections::HashMap::from([("A", "1")]);
    let e = bus_call(&conn, "UpdateActivationEnvironment", &(vars,))
        .await
        .unwrap_err();
    assert_eq!(
        error_parts(&e),
        (
            "org.freedesktop.DBus.Error.AccessDenied".into(),
            "Cannot change activation environment on a system bus.".into()
        )
    );
    // nobody: system.conf's policy refuses first.
    let address = sys.bus.address.clone();
    let (code, out) = tokio::task::spawn_blocking(move || {
        send_as_nobody(
            &address,
            &[
                "--dest=org.freedesktop.DBus",
                "/org/freedesktop/DBus",
                "org.freedesktop.DBus.UpdateActivationEnvironment",
                "dict:string:string:A,1",
            ],
        )
    })
    .await
    .unwrap();
    assert_ne!(code, Some(0), "{out}");
    assert!(
        out.contains("org.freedesktop.DBus.Error.AccessDenied: Rejected send message")
            && out.contains("member=\"UpdateActivationEnvironment\""),
        "{out}"
    );
}

#[tokio::test]
async fn activation_errors_are_dbus_daemons() {
    if !can_run() {
        return;
    }
    let files = Files::new();
    files.write_service(
        "org.busvisor.Test.NoUser.service",
        "Name=org.busvisor.Test.NoUser\nExec=/bin/true\n",
    );
    files.write_service(
        "misnamed.service",
        "Name=org.busvisor.Test.Misnamed\nExec=/bin/true\nUser=root\n",
    );
    files.write_service(
        "org.busvisor.Test.Ghost.service",
        "Name=org.busvisor.Test.Ghost\nExec=/bin/true\nUser=busvisor-no-such-user\n",
    );
    let sys = start_system_bus(&files);
    let a = &sys.bus.address;
    assert_eq!(
        start_error(a, "org.busvisor.Test.NoUser").await,
        (
            "org.freedesktop.DBus.Error.Spawn.FileInvalid".into(),
            "Cannot do system-bus activation with no user\n".into()
        )
    );
    assert_eq!(
        start_error(a, "org.busvisor.Test.Misnamed").await,
        (
            "org.freedesktop.DBus.Error.Spawn.ServiceNotFound".into(),
            "Bus name not found in system service directory".into()
        )
    );
    assert_eq!(
        start_error(a, "org.busvisor.Test.Ghost").await,
        (
            "org.freedesktop.DBus.Error.Spawn.FailedToSetup".into(),
            "Failed to setup environment correctly".into()
        )
    );
    // A method call that activates gets the same error as
    // StartServiceByName.
    let conn = connect(a).await;
    let e = within(conn.call_method(
        Some("org.busvisor.Test.NoUser"),
        "/",
        Some("org.busvisor.Test"),
        "Call",
        &(),
    ))
    .await
    .unwrap_err();
    assert_eq!(
        err_name(&e),
        "org.freedesktop.DBus.Error.Spawn.FileInvalid",
        "{e}"
    );
    if !is_reference() {
        let log = sys.bus.log();
        assert!(
            log.contains(&format!(
                "Service file \"{}\" should have been named \
                 \"org.busvisor.Test.Misnamed.service\" and will not work with system bus \
                 activation",
                files.services().join("misnamed.service").display()
            )),
            "{log}"
        );
    }
}

#[tokio::test]
async fn a_service_that_only_systemd_starts_says_so() {
    if !can_run() {
        return;
    }
    let files = Files::new();
    files.write_service(
        "org.busvisor.Test.NeedsSystemd.service",
        "Name=org.busvisor.Test.NeedsSystemd\nExec=/bin/false\nUser=root\n\
         SystemdService=dbus-org.busvisor.Test.NeedsSystemd.service\n",
    );
    let sys = start_system_bus(&files);
    let (name, text) = start_error(&sys.bus.address, "org.busvisor.Test.NeedsSystemd").await;
    // dbus-daemon's name for it: its helper execs /bin/false, which exits 1.
    assert_eq!(name, "org.freedesktop.DBus.Error.Spawn.ChildExited");
    if is_reference() {
        assert_eq!(text, "Launch helper exited with unknown return code 1");
        return;
    }
    assert_eq!(
        text,
        "org.busvisor.Test.NeedsSystemd needs systemd (unit \
         dbus-org.busvisor.Test.NeedsSystemd.service) and busvisor was not started with \
         --systemd-activation"
    );
    let log = sys.bus.log();
    let file = files
        .services()
        .join("org.busvisor.Test.NeedsSystemd.service");
    let said: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(&format!("{}: ", file.display())) && l.contains("needs systemd"))
        .collect();
    assert_eq!(said.len(), 1, "one line at load:\n{log}");
    assert!(
        said[0].contains("(unit dbus-org.busvisor.Test.NeedsSystemd.service)"),
        "{}",
        said[0]
    );
}

#[test]
fn only_roots_definitions_are_read() {
    if !can_run() || is_reference() {
        // dbus-daemon reads any file there.
        return;
    }
    let files = Files::new();
    files.write_service(
        "org.busvisor.Test.Open.service",
        "Name=org.busvisor.Test.Open\nExec=/bin/true\nUser=root\n",
    );
    let open = files.services().join("org.busvisor.Test.Open.service");
    chmod(&open, 0o666);
    let sys = start_system_bus(&files);
    let out = run_tool(
        "dbus-send",
        &[
            &format!("--bus={}", sys.bus.address),
            "--print-reply",
            "--dest=org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus.ListActivatableNames",
        ],
        OP_TIMEOUT,
    );
    out.assert_ok();
    assert!(!out.stdout.contains("org.busvisor.Test.Open"), "{out:?}");
    let log = sys.bus.log();
    assert!(
        log.contains(&format!(
            "{}: not owned by root, or writable by group or others: not trusted on the system bus",
            open.display()
        )),
        "{log}"
    );
}

/// The control API on the system bus: built-in rules open it to root, out
/// of the box; nobody may not use it.
#[test]
fn the_control_api_is_roots_on_a_system_bus() {
    if !can_run() || is_reference() {
        return;
    }
    let files = Files::new();
    let sys = start_system_bus(&files);
    let list = |as_nobody: bool| {
        let address = format!("--address={}", sys.bus.address);
        let mut args = vec![busvisor_bin(), &address, "list"];
        if as_nobody {
            let nobody = ["--reuid", NOBODY, "--regid", "nogroup", "--clear-groups"];
            args.splice(0..0, nobody);
        }
        let program = if as_nobody { "setpriv" } else { args.remove(0) };
        run_tool(program, &args, OP_TIMEOUT)
    };
    list(false).assert_ok();
    let out = list(true);
    assert!(!out.success(), "{out:?}");
    assert!(out.stderr.contains("AccessDenied"), "{out:?}");
}

/// `busvisor --system` as a system bus is started, in a private mount
/// namespace whose /run/dbus is its own: Debian's system.conf, listening
/// on /run/dbus/system_bus_socket, where `dbus-send --system` finds it.
#[test]
fn system_flag_listens_on_the_system_socket() {
    if !can_run() || is_reference() {
        return;
    }
    // A new pid namespace too: killing its first process (unshare's child,
    // on the test's timeout) ends everything in it.
    let script = r#"
        set -e
        mount -t tmpfs tmpfs /run/dbus
        "$0" --system --nofork --nopidfile --nosyslog --print-address >/run/dbus/address 2>/run/dbus/log &
        bus=$!
        for i in $(seq 100); do [ -s /run/dbus/address ] && break; sleep 0.1; done
        cat /run/dbus/address
        stat -c 'socket %F' /run/dbus/system_bus_socket
        dbus-send --system --print-reply --dest=org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus.GetId
        kill $bus
        wait $bus || true
        cat /run/dbus/log >&2
    "#;
    let out = run_tool(
        "unshare",
        &[
            "-m",
            "-p",
            "-f",
            "--kill-child",
            "--mount-proc",
            "sh",
            "-c",
            script,
            busvisor_bin(),
        ],
        Duration::from_secs(30),
    );
    assert!(out.success(), "{out:?}");
    let mut lines = out.stdout.lines();
    let address = lines.next().unwrap_or_default();
    assert!(
        address.starts_with("unix:path=/run/dbus/system_bus_socket,guid="),
        "{out:?}"
    );
    assert_eq!(lines.next(), Some("socket socket"), "{out:?}");
    assert!(out.stdout.contains("method return"), "{out:?}");
}
