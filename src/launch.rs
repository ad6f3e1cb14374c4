//! `busvisor launch`: a session bus for a desktop session without systemd,
//! compatible with the parts of dbus-launch such sessions use
//! (`eval $(busvisor launch --sh-syntax --exit-with-session)` in .xinitrc,
//! `busvisor launch --exit-with-session PROG` in an Xsession script).
//!
//! The launcher starts busvisor again as the bus (`--bus-fd`, hidden), in
//! a session of its own in `/`, reads its address and pid from a
//! pipe, prints them (or execs PROG) and leaves; the bus lives on. With
//! `--exit-with-session` or `--exit-with-x11` the bus itself watches the
//! session, where dbus-launch keeps a separate babysitter process: the X
//! display's connection (x11rb), else the terminal on its stdin, which it
//! never reads (dbus-launch reads it, and so takes keystrokes from the
//! shell it was started in): an edge-triggered wait that only looks for the
//! hangup.

use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};

use clap::Args;

use crate::daemon::{self, Options, Output};

#[derive(Debug, Args, Clone, Default)]
pub struct LaunchArgs {
    /// Print Bourne shell commands, for `eval $(busvisor launch --sh-syntax)`.
    #[arg(short = 's', long = "sh-syntax")]
    pub sh_syntax: bool,
    /// Print C shell commands.
    #[arg(short = 'c', long = "csh-syntax")]
    pub csh_syntax: bool,
    /// C shell commands if $SHELL ends in csh, else Bourne shell ones.
    #[arg(long = "auto-syntax")]
    pub auto_syntax: bool,
    /// Print the address (ending in a NUL byte), the pid (a pid_t) and the
    /// X window id (a long, always 0), in this machine's byte order.
    #[arg(long = "binary-syntax")]
    pub binary_syntax: bool,
    /// Stop the bus when the session ends: when the X display ($DISPLAY)
    /// closes if it can be reached, else when the terminal on stdin hangs
    /// up (or a pipe on stdin is closed).
    #[arg(long = "exit-with-session")]
    pub exit_with_session: bool,
    /// Stop the bus when the X display ($DISPLAY) closes; fail if it cannot
    /// be reached.
    #[arg(long = "exit-with-x11")]
    pub exit_with_x11: bool,
    /// dbus-daemon XML configuration file (default: the session bus's).
    #[arg(long = "config-file", value_name = "FILE")]
    pub config_file: Option<PathBuf>,
    /// Directory of busvisor service definitions (*.toml); repeatable.
    #[arg(long = "services-dir", value_name = "DIR")]
    pub services_dir: Vec<PathBuf>,
    /// The bus's log level (default warn); it logs to the system log.
    #[arg(long = "log-level", value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// Internal: serve as the launched bus, reporting on descriptor FD.
    #[arg(long = "bus-fd", value_name = "FD", hide = true)]
    pub bus_fd: Option<i32>,
    /// Run PROG with DBUS_SESSION_BUS_ADDRESS set instead of printing it
    /// (`busvisor launch --exit-with-session startxfce4`).
    #[arg(value_name = "PROG", trailing_var_arg = true)]
    pub program: Vec<OsString>,
}

/// What ends a launched bus, besides SIGTERM and SIGINT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifetime {
    /// Nothing: it runs until stopped.
    Unbounded,
    /// The X display closing, else the terminal (or pipe) on stdin.
    Session,
    /// The X display closing; the bus fails to start without it.
    X11,
}

impl LaunchArgs {
    fn lifetime(&self) -> Lifetime {
        if self.exit_with_x11 {
            Lifetime::X11
        } else if self.exit_with_session {
            Lifetime::Session
        } else {
            Lifetime::Unbounded
        }
    }

    fn syntax(&self) -> Syntax {
        // dbus-launch's precedence when several are given.
        if self.binary_syntax {
            Syntax::Binary
        } else if self.csh_syntax {
            Syntax::Csh
        } else if self.sh_syntax {
            Syntax::Sh
        } else if self.auto_syntax {
            match std::env::var("SHELL") {
                Ok(sh) if sh.ends_with("csh") => Syntax::Csh,
                _ => Syntax::Sh,
            }
        } else {
            Syntax::Plain
        }
    }
}

/// `busvisor launch`.
pub fn main(a: LaunchArgs) -> ExitCode {
    if let Some(fd) = a.bus_fd {
        return serve(&a, fd);
    }
    let bus = match start_bus(&a) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("busvisor launch: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some((program, args)) = a.program.split_first() {
        // As `dbus-launch PROG`: only the address is set.
        let e = Command::new(program)
            .args(args)
            .env("DBUS_SESSION_BUS_ADDRESS", &bus.address)
            .exec();
        eprintln!(
            "busvisor launch: cannot run {}: {e}",
            program.to_string_lossy()
        );
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(bus.pid),
            nix::sys::signal::Signal::SIGTERM,
        );
        return ExitCode::FAILURE;
    }
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out
        .write_all(&variables(&bus, a.syntax()))
        .and_then(|()| out.flush())
    {
        eprintln!("busvisor launch: cannot print the address: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// A started bus.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Launched {
    address: String,
    pid: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Syntax {
    Plain,
    Sh,
    Csh,
    Binary,
}

/// What dbus-launch prints, byte for byte (it prints no window id unless it
/// made an X window, which only its X11 autolaunch does).
fn variables(bus: &Launched, syntax: Syntax) -> Vec<u8> {
    // In single quotes, a quote is '\'' for both shells (addresses that
    // busvisor makes never hold one; an escaped one would be %27).
    let quoted = bus.address.replace('\'', r"'\''");
    match syntax {
        Syntax::Binary => {
            let mut out = bus.address.as_bytes().to_vec();
            out.push(0);
            out.extend_from_slice(&(bus.pid as libc::pid_t).to_ne_bytes());
            out.extend_from_slice(&(0 as libc::c_long).to_ne_bytes());
            out
        }
        Syntax::Csh => format!(
            "setenv DBUS_SESSION_BUS_ADDRESS '{quoted}';\nset DBUS_SESSION_BUS_PID={};\n",
            bus.pid
        )
        .into_bytes(),
        Syntax::Sh => format!(
            "DBUS_SESSION_BUS_ADDRESS='{quoted}';\nexport DBUS_SESSION_BUS_ADDRESS;\nDBUS_SESSION_BUS_PID={};\n",
            bus.pid
        )
        .into_bytes(),
        Syntax::Plain => format!(
            "DBUS_SESSION_BUS_ADDRESS={}\nDBUS_SESSION_BUS_PID={}\n",
            bus.address, bus.pid
        )
        .into_bytes(),
    }
}

/// Start busvisor as the bus, in the background; its address and pid once
/// it listens.
fn start_bus(a: &LaunchArgs) -> Result<Launched, String> {
    use nix::fcntl::OFlag;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find my own executable: {e}"))?;
    let pipe =
        || nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("cannot make a pipe: {e}"));
    // The bus writes on the report pipe (dbus-daemon's --print-address=FD
    // protocol); it is kept open across the exec below.
    let (report_rd, report_wr) = pipe()?;
    let mut cmd = Command::new(exe);
    cmd.arg("launch")
        .arg(format!("--bus-fd={}", report_wr.as_raw_fd()));
    if a.exit_with_x11 {
        cmd.arg("--exit-with-x11");
    } else if a.exit_with_session {
        cmd.arg("--exit-with-session");
    }
    // Absolute: the bus runs in `/`, as a daemon does.
    if let Some(f) = &a.config_file {
        cmd.arg("--config-file").arg(absolute(f));
    }
    for d in &a.services_dir {
        cmd.arg("--services-dir").arg(absolute(d));
    }
    if let Some(l) = &a.log_level {
        cmd.arg("--log-level").arg(l);
    }
    // What the bus says before it is ready (its errors) is passed on from
    // a pipe, and after that goes nowhere (it logs to the system log):
    // nothing of the bus holds the launcher's stderr, which may be the
    // pipe of an `eval $(...)` or a terminal that closes. With
    // $DBUS_DEBUG_OUTPUT set, as dbus-daemon, it keeps the launcher's.
    let debug = std::env::var_os("DBUS_DEBUG_OUTPUT").is_some_and(|v| !v.is_empty());
    let (err_rd, err_wr) = pipe()?;
    cmd.stdin(if a.lifetime() == Lifetime::Session {
        // The terminal it may watch.
        Stdio::inherit()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::null())
    .stderr(if debug {
        Stdio::inherit()
    } else {
        Stdio::from(err_wr)
    })
    .current_dir("/");
    let keep = report_wr.as_raw_fd();
    // SAFETY: the closure runs in the forked child before exec and makes
    // only async-signal-safe syscalls on integers (close_range or fcntl),
    // allocating nothing. As dbus-launch: the bus, a daemon, inherits none
    // of the caller's descriptors (a harness's pipe would never reach EOF)
    // but the one it reports on.
    unsafe {
        cmd.pre_exec(move || {
            crate::supervision::spawner::cloexec_above_stdio();
            if libc::fcntl(keep, libc::F_SETFD, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let spawned = cmd.spawn();
    // Our copies of the write ends: each pipe ends when the bus lets go.
    drop(cmd);
    drop(report_wr);
    let mut child = spawned.map_err(|e| format!("cannot start the bus: {e}"))?;
    let read = read_report(report_rd, err_rd);
    if let Ok(text) = &read
        && let Some(bus) = parse_report(text)
    {
        return Ok(bus);
    }
    // It said why on stderr; wait for it, it is ending.
    let status = child
        .wait()
        .map_or_else(|e| e.to_string(), |s| s.to_string());
    Err(match read {
        Err(e) => format!("cannot read the bus's address: {e} (the bus {status})"),
        Ok(_) => format!("the bus did not start ({status})"),
    })
}

/// Read the bus's report to its end, passing on what it writes to stderr
/// meanwhile (and what it wrote before the end).
fn read_report(report: OwnedFd, err: OwnedFd) -> std::io::Result<String> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::io::Write;
    let mut text = Vec::new();
    let mut buf = [0u8; 4096];
    let mut err_open = true;
    let pass_on = |n: usize, buf: &[u8]| {
        let _ = std::io::stderr().write_all(&buf[..n]);
    };
    loop {
        let mut fds = vec![PollFd::new(report.as_fd(), PollFlags::POLLIN)];
        if err_open {
            fds.push(PollFd::new(err.as_fd(), PollFlags::POLLIN));
        }
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
        let report_ready = fds[0].any().unwrap_or(true);
        let err_ready = err_open && fds[1].any().unwrap_or(true);
        drop(fds);
        if err_ready {
            match nix::unistd::read(&err, &mut buf) {
                Ok(0) | Err(_) => err_open = false,
                Ok(n) => pass_on(n, &buf),
            }
        }
        if report_ready {
            match nix::unistd::read(&report, &mut buf) {
                Ok(0) => break,
                Ok(n) => text.extend_from_slice(&buf[..n]),
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    // What it wrote before reporting is all there.
    if err_open {
        let _ = nix::fcntl::fcntl(
            &err,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        );
        while let Ok(n @ 1..) = nix::unistd::read(&err, &mut buf) {
            pass_on(n, &buf);
        }
    }
    Ok(String::from_utf8_lossy(&text).into_owned())
}

fn absolute(p: &std::path::Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// The bus's report: its address, then its pid, a line each.
fn parse_report(text: &str) -> Option<Launched> {
    let mut lines = text.lines();
    let address = lines.next().filter(|a| !a.is_empty())?.to_owned();
    let pid = lines.next()?.trim().parse().ok()?;
    Some(Launched { address, pid })
}

/// The launched bus (`--bus-fd`): the session configuration (or the
/// given one), logging to the system log as dbus-launch's bus does.
fn serve(a: &LaunchArgs, fd: i32) -> ExitCode {
    // A session of its own, as dbus-daemon's --fork: no controlling
    // terminal, so none of the launcher's job control signals reach it
    // (stdin's hangup is still seen: it is the open file that hangs up).
    let _ = nix::unistd::setsid();
    crate::logging::init(Some(a.log_level.as_deref().unwrap_or("warn")));
    let report = Output::Fd(fd.to_string());
    let opts = Options {
        config_file: a.config_file.clone(),
        services_dirs: a.services_dir.clone(),
        print_address: Some(report.clone()),
        print_pid: Some(report),
        syslog: Some(crate::logging::SyslogFlag::Syslog),
        launched: Some(a.lifetime()),
        ..Default::default()
    };
    match daemon::serve(opts) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("busvisor launch: {e}");
            ExitCode::FAILURE
        }
    }
}

/// What the launched bus watches for the session's end: a thread that
/// says, once, what ended.
pub(crate) enum SessionEnd {
    Never,
    Watched(tokio::sync::oneshot::Receiver<&'static str>),
}

/// dbus-launch's message when there is nothing to watch.
const NOTHING_TO_WATCH: &str = "No terminal on standard input and no X display; \
                                cannot attach message bus to session lifetime";

impl SessionEnd {
    /// Connect to the X display, or take stdin, before the bus reports its
    /// address: a bus that cannot watch its session does not start.
    pub(crate) fn open(lifetime: Lifetime) -> Result<SessionEnd, String> {
        match lifetime {
            Lifetime::Unbounded => Ok(SessionEnd::Never),
            Lifetime::X11 => x11().map_err(|e| {
                format!(
                    "Session lifetime based on X11 requested, but X11 initialization failed: {e}"
                )
            }),
            // As dbus-launch: the display when there is one, else stdin.
            Lifetime::Session => x11().or_else(|e| {
                if std::env::var_os("DISPLAY").is_some() {
                    tracing::debug!("not watching the X display: {e}");
                }
                stdin().ok_or_else(|| NOTHING_TO_WATCH.to_owned())
            }),
        }
    }

    /// Resolves when the session has ended.
    pub(crate) async fn ended(self) {
        match self {
            SessionEnd::Never => std::future::pending().await,
            SessionEnd::Watched(rx) => {
                let what = rx.await.unwrap_or("the session watch");
                tracing::info!("{what} closed: shutting down");
            }
        }
    }
}

/// Run `watch` on a thread of its own; the session ends when it returns.
fn watched(
    what: &'static str,
    watch: impl FnOnce() + Send + 'static,
) -> Result<SessionEnd, String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("busvisor-session".into())
        .spawn(move || {
            watch();
            let _ = tx.send(what);
        })
        .map_err(|e| format!("cannot start a thread: {e}"))?;
    Ok(SessionEnd::Watched(rx))
}

/// A connection to $DISPLAY, held until the server closes it (X sends a
/// client nothing it did not ask for but the odd MappingNotify, which is
/// discarded).
fn x11() -> Result<SessionEnd, String> {
    use x11rb::connection::Connection;
    if std::env::var_os("DISPLAY").is_none_or(|d| d.is_empty()) {
        return Err("DISPLAY is not set".into());
    }
    let (conn, _screen) =
        x11rb::rust_connection::RustConnection::connect(None).map_err(|e| e.to_string())?;
    watched(
        "the X display",
        move || {
            while conn.wait_for_event().is_ok() {}
        },
    )
}

/// Stdin, if it is something that can hang up: a terminal, a pipe or a
/// socket (not a file, nor /dev/null). It is never read: an edge-triggered
/// epoll wakes once per arrival of input that others read, and a hangup (or
/// the other end of a pipe closing) shows as EPOLLHUP.
fn stdin() -> Option<SessionEnd> {
    use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
    use nix::sys::stat::{SFlag, fstat};
    let fd = std::io::stdin().as_fd().try_clone_to_owned().ok()?;
    let kind = SFlag::from_bits_truncate(fstat(&fd).ok()?.st_mode) & SFlag::S_IFMT;
    let watchable = nix::unistd::isatty(&fd).unwrap_or(false)
        || kind == SFlag::S_IFIFO
        || kind == SFlag::S_IFSOCK;
    if !watchable {
        return None;
    }
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).ok()?;
    let gone = EpollFlags::EPOLLHUP | EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLERR;
    epoll
        .add(
            &fd,
            EpollEvent::new(
                EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLET,
                0,
            ),
        )
        .ok()?;
    watched("the terminal on stdin", move || {
        let mut events = [EpollEvent::empty()];
        loop {
            match epoll.wait(&mut events, EpollTimeout::NONE) {
                Ok(n) if n > 0 && events[0].events().intersects(gone) => break,
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(_) => break,
            }
        }
        drop(fd);
    })
    .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bus() -> Launched {
        Launched {
            address: "unix:path=/tmp/dbus-x,guid=0123".into(),
            pid: 4242,
        }
    }

    #[test]
    fn variables_as_dbus_launch_prints_them() {
        let text = |s| String::from_utf8(variables(&bus(), s)).unwrap();
        assert_eq!(
            text(Syntax::Sh),
            "DBUS_SESSION_BUS_ADDRESS='unix:path=/tmp/dbus-x,guid=0123';\n\
             export DBUS_SESSION_BUS_ADDRESS;\nDBUS_SESSION_BUS_PID=4242;\n"
        );
        assert_eq!(
            text(Syntax::Csh),
            "setenv DBUS_SESSION_BUS_ADDRESS 'unix:path=/tmp/dbus-x,guid=0123';\n\
             set DBUS_SESSION_BUS_PID=4242;\n"
        );
        assert_eq!(
            text(Syntax::Plain),
            "DBUS_SESSION_BUS_ADDRESS=unix:path=/tmp/dbus-x,guid=0123\nDBUS_SESSION_BUS_PID=4242\n"
        );
        let bin = variables(&bus(), Syntax::Binary);
        let n = bus().address.len();
        assert_eq!(&bin[..n], bus().address.as_bytes());
        assert_eq!(bin[n], 0);
        assert_eq!(bin[n + 1..n + 5], 4242i32.to_ne_bytes());
        assert_eq!(bin[n + 5..], 0i64.to_ne_bytes());
        let odd = Launched {
            address: "unix:path=/tmp/it's".into(),
            pid: 1,
        };
        let sh = String::from_utf8(variables(&odd, Syntax::Sh)).unwrap();
        assert!(sh.starts_with(r"DBUS_SESSION_BUS_ADDRESS='unix:path=/tmp/it'\''s';"));
    }

    #[test]
    fn the_bus_report_is_address_then_pid() {
        assert_eq!(
            parse_report("unix:path=/x,guid=1\n77\n"),
            Some(Launched {
                address: "unix:path=/x,guid=1".into(),
                pid: 77
            })
        );
        assert_eq!(parse_report(""), None);
        assert_eq!(parse_report("unix:path=/x\n"), None);
        assert_eq!(parse_report("unix:path=/x\nnot-a-pid\n"), None);
    }

    #[test]
    fn syntax_precedence_is_dbus_launchs() {
        let a = LaunchArgs {
            sh_syntax: true,
            csh_syntax: true,
            ..Default::default()
        };
        assert_eq!(a.syntax(), Syntax::Csh);
        let a = LaunchArgs {
            sh_syntax: true,
            binary_syntax: true,
            ..Default::default()
        };
        assert_eq!(a.syntax(), Syntax::Binary);
        assert_eq!(LaunchArgs::default().syntax(), Syntax::Plain);
        let a = LaunchArgs {
            exit_with_session: true,
            exit_with_x11: true,
            ..Default::default()
        };
        assert_eq!(a.lifetime(), Lifetime::X11);
    }
}
