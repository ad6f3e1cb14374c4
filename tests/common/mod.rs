//! Shared helpers for busvisor's integration tests: start the real binary on
//! a private socket, run real D-Bus tools against it, connect zbus clients,
//! and speak raw D-Bus for misbehaving clients.
#![allow(dead_code)]

use std::future::Future;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use zbus::message::Message;

pub const BUS: &str = "org.freedesktop.DBus";
pub const BUS_PATH: &str = "/org/freedesktop/DBus";

/// Default per-operation timeout: a hang fails the test instead of blocking it.
pub const OP_TIMEOUT: Duration = Duration::from_secs(10);

/// True when the suite runs against dbus-daemon (BUSVISOR_TEST_REFERENCE=1)
/// to check its expectations; busvisor-only features are then skipped.
pub fn is_reference() -> bool {
    std::env::var_os("BUSVISOR_TEST_REFERENCE").is_some()
}

pub fn busvisor_bin() -> &'static str {
    env!("CARGO_BIN_EXE_busvisor")
}

/// A child process that is killed (by pid) and reaped when dropped.
pub struct ChildGuard {
    pub child: Child,
}

impl ChildGuard {
    pub fn new(child: Child) -> Self {
        ChildGuard { child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Wait for the process to exit, at most `timeout`.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig);
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// A running busvisor on a socket in its own temporary directory.
pub struct TestBus {
    /// Client address as printed by the bus (`unix:path=...,guid=...`).
    pub address: String,
    pub socket: PathBuf,
    pub dir: tempfile::TempDir,
    pub stderr_path: PathBuf,
    pub proc: ChildGuard,
}

impl TestBus {
    /// The bus's log so far (stderr), for assertions and diagnostics.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// The bus process: busvisor's process started by the test is the
    /// keeper above it (see src/keeper.rs); the bus is its one child (on
    /// a system bus, the warden). dbus-daemon is its own bus.
    pub fn pid(&self) -> u32 {
        let keeper = self.proc.pid();
        if is_reference() {
            return keeper;
        }
        children_of(keeper).into_iter().next().unwrap_or(keeper)
    }

    /// The process the test started: the keeper, whose pid busvisor
    /// prints with --print-pid and writes to its pidfile.
    pub fn keeper_pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Assert the bus process is still alive.
    pub fn assert_alive(&mut self) {
        assert!(
            self.proc.is_running(),
            "busvisor died; log:\n{}",
            self.log()
        );
    }
}

impl Drop for TestBus {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            eprintln!(
                "--- last lines of the bus log ({}):\n{}",
                self.stderr_path.display(),
                tail.join("\n")
            );
        }
    }
}

/// The default policy of session.conf: everything allowed.
pub const ALLOW_ALL_RULES: &str = r#"    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>"#;

/// A dbus-daemon style configuration whose default policy is `rules`, with
/// `extra` elements after it.
pub fn config_with(rules: &str, extra: &str) -> String {
    format!(
        r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:tmpdir=/tmp</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
{rules}
  </policy>
{extra}</busconfig>
"#
    )
}

/// The dbus-daemon style configuration the tests use, with extra `<limit>`s.
pub fn config_xml(limits: &[(&str, u64)]) -> String {
    let limits: String = limits
        .iter()
        .map(|(name, v)| format!("  <limit name=\"{name}\">{v}</limit>\n"))
        .collect();
    config_with(ALLOW_ALL_RULES, &limits)
}

/// Start busvisor on `<tmpdir>/bus`, optionally with a config file holding `config`.
pub fn start_bus(config: Option<&str>) -> TestBus {
    start_bus_with_args(config, &[])
}

pub fn start_bus_with_args(config: Option<&str>, extra: &[&str]) -> TestBus {
    start_bus_with_env(config, extra, &[])
}

/// Start the bus with a config file, extra arguments, and extra environment
/// variables for the bus process (which its services inherit).
pub fn start_bus_with_env(config: Option<&str>, extra: &[&str], env: &[(&str, &str)]) -> TestBus {
    start_bus_inner(config, extra, env, None)
}

/// Start the bus with its stderr on a pipe that the test holds, in
/// `bus.proc.child.stderr`, and reads only when it wants to.
pub fn start_bus_with_stderr_pipe() -> TestBus {
    start_bus_inner(None, &[], &[], Some(Stdio::piped()))
}

fn start_bus_inner(
    config: Option<&str>,
    extra: &[&str],
    env: &[(&str, &str)],
    stderr: Option<Stdio>,
) -> TestBus {
    let dir = tempfile::Builder::new()
        .prefix("busvisor-test")
        .tempdir()
        .expect("tempdir");
    let socket = dir.path().join("bus");
    let stderr_path = dir.path().join("busvisor.log");
    // BUSVISOR_TEST_REFERENCE=1 runs the same test against dbus-daemon, to
    // check the tests' expectations against the reference implementation.
    let reference = is_reference();
    let mut cmd = Command::new(if reference {
        "dbus-daemon"
    } else {
        busvisor_bin()
    });
    if reference && config.is_none() {
        cmd.arg("--session");
    }
    cmd.arg("--nofork")
        .arg(format!("--address=unix:path={}", socket.display()))
        .arg("--print-address");
    if let Some(text) = config {
        let cfg = dir.path().join("bus.conf");
        std::fs::write(&cfg, text).expect("write config");
        cmd.arg(format!("--config-file={}", cfg.display()));
    }
    cmd.args(extra)
        .env("RUST_LOG", "debug")
        .env_remove("DBUS_SESSION_BUS_ADDRESS")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr.unwrap_or_else(|| {
            std::fs::File::create(&stderr_path)
                .expect("log file")
                .into()
        }));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn busvisor");
    let stdout = child.stdout.take().expect("stdout");
    let mut proc = ChildGuard::new(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = match rx.recv_timeout(OP_TIMEOUT) {
        Ok(l) => l,
        Err(_) => panic!(
            "busvisor printed no address within {OP_TIMEOUT:?}; log:\n{}",
            std::fs::read_to_string(&stderr_path).unwrap_or_default()
        ),
    };
    let address = line.trim().to_owned();
    if address.is_empty() {
        let st = proc.wait_timeout(Duration::from_secs(2));
        panic!(
            "busvisor printed no address (exit {st:?}); log:\n{}",
            std::fs::read_to_string(&stderr_path).unwrap_or_default()
        );
    }
    assert!(
        address.starts_with(&format!("unix:path={}", socket.display()))
            && address.contains(",guid="),
        "unexpected address line {address:?}"
    );
    TestBus {
        address,
        socket,
        dir,
        stderr_path,
        proc,
    }
}

/// Captured result of a CLI tool run.
#[derive(Debug)]
pub struct ToolOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl ToolOutput {
    pub fn success(&self) -> bool {
        self.status.success()
    }
    #[track_caller]
    pub fn assert_ok(&self) -> &Self {
        assert!(self.success(), "tool failed: {self:?}");
        self
    }
}

/// Run a tool with a timeout (killed and the test failed on timeout); the
/// machine's session bus is never inherited.
pub fn run_tool(program: &str, args: &[&str], timeout: Duration) -> ToolOutput {
    run_tool_env(program, args, &[], timeout)
}

pub fn run_tool_env(
    program: &str,
    args: &[&str],
    env: &[(&str, &str)],
    timeout: Duration,
) -> ToolOutput {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_remove("DBUS_SESSION_BUS_ADDRESS")
        .env_remove("DBUS_STARTER_ADDRESS")
        .env(
            "DBUS_SESSION_BUS_ADDRESS",
            "unix:path=/nonexistent/no-session-bus",
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let mut guard = ChildGuard::new(child);
    let status = match guard.wait_timeout(timeout) {
        Some(st) => st,
        None => {
            drop(guard);
            panic!("{program} {args:?} did not finish within {timeout:?}");
        }
    };
    ToolOutput {
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    }
}

/// Spawn a long-running tool (e.g. dbus-monitor) with stdout going to a file.
pub fn spawn_tool(program: &str, args: &[&str], stdout_file: &Path) -> ChildGuard {
    let child = Command::new(program)
        .args(args)
        .env(
            "DBUS_SESSION_BUS_ADDRESS",
            "unix:path=/nonexistent/no-session-bus",
        )
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(stdout_file).expect("out file"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    ChildGuard::new(child)
}

/// The absolute path of `program`, looked up in PATH.
pub fn which(program: &str) -> String {
    let path = std::env::var("PATH").unwrap_or_default();
    for d in path.split(':') {
        let p = Path::new(d).join(program);
        if p.is_file() {
            return p.to_string_lossy().into_owned();
        }
    }
    panic!("{program} not in PATH");
}

/// Pids appended one per line by `testsvc.py --record`.
pub fn read_pids(path: &Path) -> Vec<u32> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// The pid a service writes to `path`, once it is there.
pub fn read_pid_file(path: &Path) -> u32 {
    assert!(
        wait_until(OP_TIMEOUT, || std::fs::read_to_string(path)
            .is_ok_and(|s| s.trim().parse::<u32>().is_ok())),
        "no pid in {}",
        path.display()
    );
    std::fs::read_to_string(path)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Poll `cond` until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------- zbus clients

/// Await `f`, failing the test if it takes longer than [`OP_TIMEOUT`].
#[track_caller]
pub fn within<F: Future>(f: F) -> impl Future<Output = F::Output> {
    within_t(OP_TIMEOUT, f)
}

#[track_caller]
pub fn within_t<F: Future>(t: Duration, f: F) -> impl Future<Output = F::Output> {
    let loc = std::panic::Location::caller();
    async move {
        match tokio::time::timeout(t, f).await {
            Ok(v) => v,
            Err(_) => panic!("operation timed out after {t:?} at {loc}"),
        }
    }
}

/// A zbus bus connection (Hello done) to `address`.
pub async fn connect(address: &str) -> zbus::Connection {
    within(async {
        zbus::connection::Builder::address(address)
            .build()
            .await
            .expect("connect to busvisor")
    })
    .await
}

pub fn unique(conn: &zbus::Connection) -> String {
    conn.unique_name().expect("unique name").to_string()
}

/// Call a method on the bus driver.
pub async fn bus_call<B>(conn: &zbus::Connection, member: &str, body: &B) -> zbus::Result<Message>
where
    B: serde::Serialize + zbus::wire::DynamicType,
{
    within(conn.call_method(Some(BUS), BUS_PATH, Some(BUS), member, body)).await
}

/// Call a driver method expecting success; deserialize its reply.
pub async fn bus_ok<B, R>(conn: &zbus::Connection, member: &str, body: &B) -> R
where
    B: serde::Serialize + zbus::wire::DynamicType,
    R: for<'d> serde::Deserialize<'d> + zbus::wire::Type,
{
    let m = bus_call(conn, member, body)
        .await
        .unwrap_or_else(|e| panic!("{member} failed: {e}"));
    m.body()
        .deserialize::<R>()
        .unwrap_or_else(|e| panic!("{member} reply: {e}"))
}

/// The D-Bus error name of a failed call.
pub fn err_name(e: &zbus::Error) -> String {
    use zbus::DBusError;
    match e {
        zbus::Error::MethodError(name, _, _) => name.to_string(),
        zbus::Error::FDO(f) => f.name().to_string(),
        other => format!("(not a D-Bus error: {other})"),
    }
}

/// Call a driver method expecting the error `want`.
#[track_caller]
pub fn bus_err<'a, B>(
    conn: &'a zbus::Connection,
    member: &'a str,
    body: &'a B,
    want: &'a str,
) -> impl Future<Output = ()> + 'a
where
    B: serde::Serialize + zbus::wire::DynamicType + Sync,
{
    let loc = std::panic::Location::caller();
    async move {
        match bus_call(conn, member, body).await {
            Ok(m) => panic!("{member} succeeded ({m:?}), expected {want} at {loc}"),
            Err(e) => assert_eq!(err_name(&e), want, "{member}: {e} at {loc}"),
        }
    }
}

pub async fn add_match(conn: &zbus::Connection, rule: &str) {
    bus_call(conn, "AddMatch", &(rule,))
        .await
        .unwrap_or_else(|e| panic!("AddMatch {rule}: {e}"));
}

/// A stream of every message a connection receives; create it before the
/// messages are sent.
pub fn stream(conn: &zbus::Connection) -> zbus::MessageStream {
    zbus::MessageStream::from(conn)
}

/// Next message on `s` satisfying `pred`, within `t`.
pub async fn next_matching(
    s: &mut zbus::MessageStream,
    t: Duration,
    mut pred: impl FnMut(&Message) -> bool,
) -> Option<Message> {
    use futures_util::StreamExt;
    let fut = async {
        while let Some(m) = s.next().await {
            let m = m.expect("stream error");
            if pred(&m) {
                return Some(m);
            }
        }
        None
    };
    tokio::time::timeout(t, fut).await.ok().flatten()
}

/// Every message arriving on `s` during `t` that satisfies `pred`.
pub async fn collect_for(
    s: &mut zbus::MessageStream,
    t: Duration,
    mut pred: impl FnMut(&Message) -> bool,
) -> Vec<Message> {
    use futures_util::StreamExt;
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + t;
    while let Ok(Some(m)) = tokio::time::timeout_at(deadline, s.next()).await {
        let m = m.expect("stream error");
        if pred(&m) {
            out.push(m);
        }
    }
    out
}

pub fn is_signal(m: &Message, member: &str) -> bool {
    m.message_type() == zbus::message::Type::Signal
        && m.header().member().map(|x| x.as_str()) == Some(member)
}

pub fn member(m: &Message) -> String {
    m.header()
        .member()
        .map(|x| x.to_string())
        .unwrap_or_default()
}

pub fn sender(m: &Message) -> String {
    m.header()
        .sender()
        .map(|x| x.to_string())
        .unwrap_or_default()
}

/// Round trip with the bus: every message the bus queued for `conn` before
/// this returns has been sent before the Ping reply.
pub async fn sync(conn: &zbus::Connection) {
    within(conn.call_method(
        Some(BUS),
        "/",
        Some("org.freedesktop.DBus.Peer"),
        "Ping",
        &(),
    ))
    .await
    .expect("Ping");
}

// ------------------------------------------------ tests/fixtures/testsvc.py

/// The object and interface of the test service, tests/fixtures/testsvc.py.
pub const TEST_PATH: &str = "/org/busvisor/Test";
pub const TEST_IFACE: &str = "org.busvisor.Test";

/// Call `member` (no arguments) on the test service that owns `dest`.
pub async fn call(conn: &zbus::Connection, dest: &str, member: &str) -> zbus::Result<Message> {
    within(conn.call_method(Some(dest), TEST_PATH, Some(TEST_IFACE), member, &())).await
}

/// The pid of the test service that owns `dest` (started by this call if
/// need be).
pub async fn call_pid(conn: &zbus::Connection, dest: &str) -> u32 {
    let m = call(conn, dest, "Pid")
        .await
        .unwrap_or_else(|e| panic!("Pid of {dest}: {e}"));
    m.body().deserialize().unwrap()
}

// ---------------------------------------------------------------- raw clients

/// A client speaking D-Bus by hand over a blocking Unix socket.
pub struct RawClient {
    pub stream: UnixStream,
    buf: Vec<u8>,
}

impl RawClient {
    /// Connect without authenticating.
    pub fn connect(socket: &Path) -> RawClient {
        let stream = UnixStream::connect(socket).expect("raw connect");
        stream
            .set_read_timeout(Some(OP_TIMEOUT))
            .expect("read timeout");
        stream
            .set_write_timeout(Some(OP_TIMEOUT))
            .expect("write timeout");
        RawClient {
            stream,
            buf: Vec::new(),
        }
    }

    /// SASL EXTERNAL by hand, then BEGIN.
    pub fn authenticate(&mut self) {
        let uid = nix::unistd::getuid().as_raw().to_string();
        let hex: String = uid.bytes().map(|b| format!("{b:02x}")).collect();
        self.stream
            .write_all(format!("\0AUTH EXTERNAL {hex}\r\n").as_bytes())
            .expect("write AUTH");
        let line = self.read_line();
        assert!(line.starts_with("OK "), "AUTH answered {line:?}");
        self.stream.write_all(b"BEGIN\r\n").expect("write BEGIN");
    }

    fn read_line(&mut self) -> String {
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        loop {
            let n = self.stream.read(&mut b).expect("read SASL line");
            assert!(n == 1, "EOF during SASL");
            line.push(b[0]);
            if line.ends_with(b"\r\n") {
                return String::from_utf8_lossy(&line).into_owned();
            }
        }
    }

    /// A client over a stream already connected (say, a clone of another
    /// client's, to read in another thread).
    pub fn from_stream(stream: UnixStream) -> RawClient {
        RawClient {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn connect_authenticated(socket: &Path) -> RawClient {
        let mut c = RawClient::connect(socket);
        c.authenticate();
        c
    }

    pub fn send(&mut self, msg: &Message) -> std::io::Result<()> {
        self.stream.write_all(msg.data().bytes())
    }

    /// Read one whole message, or None at EOF / error.
    pub fn recv(&mut self) -> Option<Message> {
        loop {
            if let Some(len) = frame_len(&self.buf)
                && self.buf.len() >= len
            {
                let rest = self.buf.split_off(len);
                let bytes = std::mem::replace(&mut self.buf, rest);
                let endian = if bytes[0] == b'l' {
                    zbus::wire::Endian::Little
                } else {
                    zbus::wire::Endian::Big
                };
                let ctxt = zbus::wire::serialized::Context::new(endian, 0);
                let data = zbus::wire::serialized::Data::new(bytes, ctxt);
                // SAFETY: the bytes come from the bus under test; a bad
                // encoding yields an error, which fails the test.
                return Some(unsafe { Message::from_bytes(data) }.expect("parse message"));
            }
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.stream.set_read_timeout(t)
    }

    /// Send Hello and return the unique name from its reply.
    pub fn hello(&mut self) -> String {
        let hello = hello_msg();
        self.send(&hello).expect("send Hello");
        loop {
            let m = self.recv().expect("Hello reply");
            if m.message_type() == zbus::message::Type::MethodReturn {
                return m.body().deserialize::<String>().expect("Hello body");
            }
        }
    }

    /// True once the bus has closed the socket (EOF or reset), within `t`.
    pub fn closed_within(&mut self, t: Duration) -> bool {
        let deadline = Instant::now() + t;
        let _ = self
            .stream
            .set_read_timeout(Some(Duration::from_millis(100)));
        let mut chunk = [0u8; 65536];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => return true,
            }
            if Instant::now() >= deadline {
                return false;
            }
        }
    }
}

/// Total length of the message at the start of `buf`, once its fixed header is there.
fn frame_len(buf: &[u8]) -> Option<usize> {
    if buf.len() < 16 {
        return None;
    }
    let rd = |b: &[u8]| -> usize {
        let a: [u8; 4] = b.try_into().unwrap();
        (if buf[0] == b'l' {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        }) as usize
    };
    let body = rd(&buf[4..8]);
    let fields = rd(&buf[12..16]);
    let header = 16 + fields;
    let header = (header + 7) & !7;
    Some(header + body)
}

pub fn hello_msg() -> Message {
    Message::method_call(BUS_PATH, "Hello")
        .destination(BUS)
        .interface(BUS)
        .build(&())
        .expect("Hello")
}

pub fn bus_method_msg<B>(member: &str, body: &B) -> Message
where
    B: serde::Serialize + zbus::wire::DynamicType,
{
    Message::method_call(BUS_PATH, member)
        .destination(BUS)
        .interface(BUS)
        .build(body)
        .expect("method call")
}

// ---------------------------------------------------------------- processes

/// The fields of /proc/PID/stat from field 3 (the state) on: those after
/// the last ')', so a command name with spaces or parens is fine. Field N of
/// proc(5) is `stat_fields(pid)[N - 3]`.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// Parent pid and state letter of a process, from /proc/PID/stat.
pub fn proc_stat(pid: u32) -> Option<(u32, char)> {
    let f = stat_fields(pid)?;
    let state = f.first()?.chars().next()?;
    let ppid = f.get(1)?.parse().ok()?;
    Some((ppid, state))
}

/// Clock ticks per second, the unit of the CPU times in /proc/PID/stat.
pub fn clk_tck() -> u64 {
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    assert!(hz > 0, "sysconf(_SC_CLK_TCK) = {hz}");
    hz as u64
}

/// CPU time a process has used, all its threads: utime + stime (fields 14
/// and 15 of /proc/PID/stat), in clock ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let f = stat_fields(pid)?;
    let field = |n: usize| f.get(n - 3)?.parse::<u64>().ok();
    Some(field(14)? + field(15)?)
}

/// True while the process exists and is not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    proc_stat(pid).is_some_and(|(_, s)| s != 'Z')
}

/// True once /proc/PID is gone: the process exited *and* was reaped.
pub fn pid_gone(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

/// Every process whose environment has `var` with a value containing `needle`.
pub fn pids_with_env(var: &str, needle: &str) -> Vec<u32> {
    let prefix = format!("{var}=");
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        let hit = env.split(|b| *b == 0).any(|kv| {
            kv.strip_prefix(prefix.as_bytes())
                .is_some_and(|v| String::from_utf8_lossy(v).contains(needle))
        });
        if hit {
            out.push(pid);
        }
    }
    out
}

/// The processes busvisor `bus_pid` started as services (and their
/// descendants): they carry `BUSVISOR_INVOCATION=<id>-<bus pid>-<n>`.
pub fn service_pids_of(bus_pid: u32) -> Vec<u32> {
    pids_with_env("BUSVISOR_INVOCATION", &format!("-{bus_pid}-"))
}

/// Live direct children of `pid`.
pub fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            if let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok())
                && proc_stat(p).is_some_and(|(pp, s)| pp == pid && s != 'Z')
            {
                out.push(p);
            }
        }
    }
    out
}

/// Direct children of `pid` that are zombies (exited, not reaped).
pub fn zombie_children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            if let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok())
                && proc_stat(p).is_some_and(|(pp, s)| pp == pid && s == 'Z')
            {
                out.push(p);
            }
        }
    }
    out
}

/// SIGKILL the bus (by pid), then every process it started as a service
/// that is still there: for a test's drop, so that nothing outlives it.
pub fn kill_bus_and_services(bus: &mut TestBus) {
    let bus_pid = bus.pid();
    if bus.proc.is_running() {
        bus.proc.signal(nix::sys::signal::Signal::SIGKILL);
        bus.proc.wait_timeout(Duration::from_secs(5));
    }
    let _guard = PidGuard {
        pids: service_pids_of(bus_pid),
    };
}

/// Pids SIGKILLed when dropped: for processes a test made but does not own
/// as a `Child` (services, daemons, grandchildren).
#[derive(Default)]
pub struct PidGuard {
    pub pids: Vec<u32>,
}

impl PidGuard {
    pub fn add(&mut self, pid: u32) {
        self.pids.push(pid);
    }
}

impl Drop for PidGuard {
    fn drop(&mut self) {
        for p in &self.pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*p as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// The variable a test sets, to a value of its own, in the environment of a
/// program that starts buses (and their services) which may outlive it: the
/// buses inherit it whatever they do with sessions and process groups.
pub const TEST_MARK_VAR: &str = "BUSVISOR_TEST_MARK";

/// SIGKILL, by pid, every live process whose environment has
/// `BUSVISOR_TEST_MARK=mark`, until none is left (one may fork meanwhile).
pub fn kill_marked(mark: &str) {
    for _ in 0..50 {
        let pids = busvisor::supervision::procs::with_env_var(TEST_MARK_VAR, mark);
        if pids.is_empty() {
            return;
        }
        for pid in pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Run `busvisor ARGS --address=ADDRESS` (a control command) to completion.
pub fn busvisor_at(address: &str, args: &[&str]) -> ToolOutput {
    let addr = format!("--address={address}");
    let mut v = args.to_vec();
    v.push(&addr);
    run_tool(busvisor_bin(), &v, Duration::from_secs(30))
}

/// Where the test services live.
pub const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

/// A TOML array of strings (Rust's Debug quoting suits plain paths and words).
pub fn toml_list(items: &[&str]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| format!("{s:?}")).collect();
    format!("[{}]", quoted.join(", "))
}

/// Write `<dir>/<id>.toml` for bus name `name`, running `exec`, plus `extra` lines.
pub fn write_def(dir: &Path, id: &str, name: &str, exec: &[&str], extra: &str) {
    let text = format!("name = {name:?}\nexec = {}\n{extra}\n", toml_list(exec));
    std::fs::write(dir.join(format!("{id}.toml")), text).unwrap();
}

/// A testsvc.py definition: `python3 testsvc.py NAME OPTS...`.
pub fn write_testsvc(dir: &Path, id: &str, name: &str, opts: &[&str], extra: &str) {
    let script = format!("{FIXTURES}/testsvc.py");
    let mut exec = vec!["python3", script.as_str(), name];
    exec.extend_from_slice(opts);
    write_def(dir, id, name, &exec, extra);
}

/// A bus with a fresh `--services-dir` filled by `defs`: the bus, that
/// directory, and the temporary directory holding it (kept alive by the
/// caller).
pub fn start_bus_with_services(
    prefix: &str,
    defs: impl FnOnce(&Path),
    config: Option<&str>,
    env: &[(&str, &str)],
) -> (TestBus, PathBuf, tempfile::TempDir) {
    let tmp = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("tempdir");
    let dir = tmp.path().join("services");
    std::fs::create_dir(&dir).unwrap();
    defs(&dir);
    let bus = start_bus_with_env(config, &["--services-dir", dir.to_str().unwrap()], env);
    (bus, dir, tmp)
}
