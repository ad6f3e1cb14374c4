//! The warden: privilege separation for a bus started as root with a
//! `<user>` (the system bus).
//!
//! After the sockets are bound, the pidfile written and the fd limit raised,
//! busvisor forks. The child, the **router**, drops to `<user>` and is the
//! whole bus: every message, the policy, the supervisor's decisions. The
//! parent, the **warden**, stays root and does only what needs root, on a
//! single thread, without D-Bus or XML:
//! - it starts a service by its definition's id, reading the root-owned
//!   definition itself and deriving the command line, user and environment
//!   from it (the router never sends those);
//! - it signals processes, only its own descendants other than the router,
//!   and kills an invocation's cgroup (`cgroup.kill`) by its token;
//! - it reaps every process (it is the child subreaper, so services and
//!   what they double-fork stay in its tree) and reports the exits.
//!
//! The warden is the keeper's child (see `keeper`: the keeper's pid is the
//! pidfile's); SIGTERM and SIGHUP sent to it are passed to the router. When
//! the router ends, for whatever reason, the warden ends every process left
//! and exits.

pub(crate) mod protocol;

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{AddressFamily, MsgFlags, SockFlag, SockType, socketpair};
use nix::unistd::{ForkResult, Pid};
use tracing::{error, info, warn};

use crate::activation::catalog::{self, Dirs};
use crate::supervision::launch::Launch;
use crate::supervision::procs;
use crate::supervision::reaper::{self, ExitKind};
use crate::supervision::spawner::{self, Credentials};
use protocol::{Event, Request};

/// What the warden needs to start services on its own.
pub(crate) struct Setup {
    /// Where definitions are read from (the configuration read as root).
    pub(crate) dirs: Dirs,
    /// The bus's address, for `DBUS_STARTER_ADDRESS`.
    pub(crate) address: String,
    /// Removed when the bus ends.
    pub(crate) pidfile: Option<PathBuf>,
}

/// Which side of the split this process is.
pub(crate) enum Role {
    Warden(Warden),
    /// The router, already running as `<user>`, and its end of the link.
    Router(OwnedFd),
}

/// The signals the warden takes through its signalfd.
fn signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
    ] {
        set.add(s);
    }
    set
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum SplitError {
    #[error("cannot create the warden's socket pair: {0}")]
    Socket(nix::Error),
    #[error("cannot fork the router: {0}")]
    Fork(nix::Error),
    #[error("cannot become a child subreaper: {0}")]
    Subreaper(nix::Error),
    #[error("cannot block signals: {0}")]
    Signals(nix::Error),
}

/// Fork into the warden (this process, root) and the router (the child,
/// running as `user` on return). Call before any thread exists.
pub(crate) fn split(user: &Credentials, setup: Setup) -> Result<Role, SplitError> {
    reaper::become_subreaper().map_err(SplitError::Subreaper)?;
    // Made while root, named by the warden's pid: the router finds them.
    procs::setup_cgroups(true);
    let (warden_end, router_end) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(SplitError::Socket)?;
    // Blocked before the fork, so that none is lost or fatal in between;
    // the router unblocks them for its own handlers.
    signals().thread_block().map_err(SplitError::Signals)?;
    let me = Pid::this();
    // SAFETY: no other thread exists yet (the runtime is built after the
    // split), so the child may run arbitrary code after fork.
    match unsafe { nix::unistd::fork() }.map_err(SplitError::Fork)? {
        ForkResult::Child => {
            drop(warden_end);
            if let Err(e) = become_router(user, me) {
                error!("cannot drop privileges to {}: {e}", user.name);
                std::process::exit(1);
            }
            Ok(Role::Router(router_end))
        }
        ForkResult::Parent { child } => {
            drop(router_end);
            Ok(Role::Warden(Warden {
                sock: warden_end,
                router: child,
                me,
                setup,
                router_exit: None,
            }))
        }
    }
}

/// In the router: drop to `user` for good, and die with the warden.
fn become_router(user: &Credentials, warden: Pid) -> nix::Result<()> {
    nix::unistd::setgroups(&user.groups)?;
    nix::unistd::setresgid(user.gid, user.gid, user.gid)?;
    nix::unistd::setresuid(user.uid, user.uid, user.uid)?;
    if nix::unistd::geteuid() != user.uid
        || nix::unistd::setuid(nix::unistd::Uid::from_raw(0)).is_ok()
    {
        return Err(nix::errno::Errno::EPERM);
    }
    // Set after the uid change, which clears it.
    nix::sys::prctl::set_pdeathsig(Signal::SIGTERM)?;
    if nix::unistd::getppid() != warden {
        // The warden died before the death signal was armed.
        return Err(nix::errno::Errno::ESRCH);
    }
    signals().thread_unblock()
}

/// The warden process.
pub(crate) struct Warden {
    sock: OwnedFd,
    router: Pid,
    me: Pid,
    setup: Setup,
    router_exit: Option<ExitKind>,
}

/// Attempts to reap what is left, once the router is gone.
const FINAL_REAP: Duration = Duration::from_secs(5);

impl Warden {
    /// Serve the router until it ends; then end what is left. Returns the
    /// exit code for the bus.
    pub(crate) fn run(mut self) -> u8 {
        // The warden ran the start-up and from now on only waits.
        crate::resident::settle();
        let sfd = match SignalFd::with_flags(
            &signals(),
            SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK,
        ) {
            Ok(s) => s,
            Err(e) => {
                error!("warden: cannot watch signals: {e}");
                let _ = nix::sys::signal::kill(self.router, Signal::SIGKILL);
                return 1;
            }
        };
        info!(router = self.router.as_raw(), "warden running");
        // A SIGCHLD may have come before the signalfd existed.
        self.reap();
        while self.router_exit.is_none() {
            let mut fds = [
                PollFd::new(self.sock.as_fd(), PollFlags::POLLIN),
                PollFd::new(sfd.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    error!("warden: poll: {e}");
                    break;
                }
            }
            let sock_ready = fds[0].any().unwrap_or(false);
            let sig_ready = fds[1].any().unwrap_or(false);
            if sig_ready {
                while let Ok(Some(info)) = sfd.read_signal() {
                    self.signal(info.ssi_signo as i32);
                }
            }
            if sock_ready && !self.request() {
                // The router closed its end: it is ending.
                break;
            }
        }
        self.finish()
    }

    fn signal(&mut self, signo: i32) {
        match Signal::try_from(signo) {
            Ok(Signal::SIGCHLD) => self.reap(),
            // The router shuts the bus down (its services first) or reloads.
            Ok(s @ (Signal::SIGTERM | Signal::SIGINT | Signal::SIGHUP)) => {
                let _ = nix::sys::signal::kill(self.router, s);
            }
            _ => {}
        }
    }

    fn reap(&mut self) {
        for (pid, kind) in reaper::reap_all() {
            if pid == self.router.as_raw() {
                self.router_exit = Some(kind);
            } else {
                self.send(&Event::Exited { pid, kind }, &[]);
            }
        }
        procs::prune_cgroups(false);
    }

    /// Handle one message; false when the router has closed the link.
    fn request(&mut self) -> bool {
        let (data, fds) = match protocol::recv(&self.sock, MsgFlags::MSG_DONTWAIT) {
            Ok(m) => m,
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => return true,
            Err(e) => {
                error!("warden: reading from the router: {e}");
                return false;
            }
        };
        drop(fds); // the router has nothing to pass
        if data.is_empty() {
            return false;
        }
        match Request::decode(&data) {
            Ok(Request::Spawn { seq, id, token }) => {
                let reply = self.spawn(seq, &id, &token);
                let fds: Vec<i32> = reply.1.iter().map(|f| f.as_raw_fd()).collect();
                self.send(&reply.0, &fds);
            }
            Ok(Request::Kill { pid, signal }) => self.kill(pid, signal),
            Ok(Request::KillCgroup { token }) if valid_token(&token) => {
                if !procs::kill_cgroup(&token) {
                    warn!("warden: cannot kill the cgroup of {token}");
                }
            }
            Ok(Request::KillCgroup { token }) => {
                warn!("warden: refusing to kill the cgroup of {token:?}")
            }
            Err(e) => warn!("warden: {e}"),
        }
        true
    }

    fn send(&self, event: &Event, fds: &[i32]) {
        if let Err(e) = protocol::send(self.sock.as_raw_fd(), &event.encode(), fds) {
            warn!("warden: cannot tell the router {event:?}: {e}");
        }
    }

    /// Start the definition `id` as the definition (re-read here, from the
    /// configured directories) says.
    fn spawn(&self, seq: u64, id: &str, token: &str) -> (Event, Vec<OwnedFd>) {
        let failed = |error: &str, text: String| {
            warn!(service = id, "{text}");
            (
                Event::Failed {
                    seq,
                    error: error.to_owned(),
                    text,
                },
                Vec::new(),
            )
        };
        if !valid_token(token) {
            return failed(
                "org.freedesktop.DBus.Error.InvalidArgs",
                format!("invalid invocation token {token:?}"),
            );
        }
        let catalog = catalog::scan(&self.setup.dirs).catalog;
        let Some(def) = catalog.get(id) else {
            return failed(
                "org.freedesktop.DBus.Error.Spawn.ServiceNotFound",
                format!("no definition of {id} in the service directories"),
            );
        };
        let launch = Launch {
            def,
            token,
            address: &self.setup.address,
            activation_env: &std::collections::BTreeMap::new(),
            system: true,
        };
        let req = match launch.request() {
            Ok(r) => r,
            Err(e) => return failed(e.name.as_str(), e.text.clone()),
        };
        let program = req.argv[0].clone();
        match spawner::spawn_now(&req) {
            Ok(s) => {
                info!(service = id, pid = s.pid, user = ?def.user, "started");
                let fds = [s.stdout, s.stderr].into_iter().flatten().collect();
                (
                    Event::Spawned {
                        seq,
                        pid: s.pid,
                        program: s.program.to_string_lossy().into_owned(),
                    },
                    fds,
                )
            }
            Err(e) => failed(
                "org.freedesktop.DBus.Error.Spawn.ExecFailed",
                format!("Failed to execute program {program}: {e}"),
            ),
        }
    }

    /// Signal `pid` if it is one of the services' processes: a descendant
    /// of the warden's other than the router (and its children). Through a
    /// pidfd, so that the pid checked is the pid signalled.
    fn kill(&self, pid: i32, signo: i32) {
        let Ok(sig) = Signal::try_from(signo) else {
            return warn!("warden: refusing unknown signal {signo}");
        };
        let pidfd = match procs::pidfd_open(pid) {
            Ok(fd) => Some(fd),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return,
            // Kernels before 5.3: the plain pid (a tiny reuse window).
            Err(_) => None,
        };
        if !self.is_service_process(pid) {
            return warn!("warden: refusing to signal pid {pid}: not a service process");
        }
        let r = match &pidfd {
            Some(fd) => procs::pidfd_send_signal(fd, Some(sig)),
            None => nix::sys::signal::kill(Pid::from_raw(pid), sig).map_err(Into::into),
        };
        if let Err(e) = r
            && e.raw_os_error() != Some(libc::ESRCH)
        {
            warn!("warden: cannot signal pid {pid}: {e}");
        }
    }

    fn is_service_process(&self, pid: i32) -> bool {
        let mut cur = pid;
        for _ in 0..256 {
            if cur <= 1 || cur == self.router.as_raw() || cur == self.me.as_raw() {
                return false;
            }
            match procs::stat_of(cur) {
                Some((ppid, _)) if ppid == self.me.as_raw() => return true,
                Some((ppid, _)) => cur = ppid,
                None => return false,
            }
        }
        false
    }

    /// The router is gone: end every process left (the router has stopped
    /// the services it could), reap them, clean up.
    fn finish(mut self) -> u8 {
        // A router that ended cleanly stopped its services; one that
        // crashed did not: TERM first, then KILL what remains.
        let me = self.me.as_raw();
        procs::signal_descendants(me, Signal::SIGTERM);
        let deadline = Instant::now() + FINAL_REAP;
        loop {
            self.reap_quietly();
            // The router's threads may still be ending after its main one
            // shows as a zombie: done only once it is reaped.
            if self.router_exit.is_some() && procs::descendants_of(me).is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                procs::signal_descendants(me, Signal::SIGKILL);
                if self.router_exit.is_none() {
                    let _ = nix::sys::signal::kill(self.router, Signal::SIGKILL);
                    if let Ok(st) = nix::sys::wait::waitpid(self.router, None) {
                        self.router_exit = match st {
                            nix::sys::wait::WaitStatus::Exited(_, c) => Some(ExitKind::Code(c)),
                            nix::sys::wait::WaitStatus::Signaled(_, s, _) => {
                                Some(ExitKind::Signal(s as i32))
                            }
                            _ => None,
                        };
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.reap_quietly();
        procs::prune_cgroups(true);
        if let Some(p) = &self.setup.pidfile {
            let _ = std::fs::remove_file(p);
        }
        let code = match self.router_exit {
            Some(ExitKind::Code(c)) => c as u8,
            Some(ExitKind::Signal(s)) => {
                warn!("the router was killed by signal {s}");
                1
            }
            None => 1,
        };
        info!(router = ?self.router_exit, "warden exiting");
        code
    }

    fn reap_quietly(&mut self) {
        for (pid, kind) in reaper::reap_all() {
            if pid == self.router.as_raw() {
                self.router_exit = Some(kind);
            }
        }
    }
}

/// A token names a cgroup directory: no path tricks.
fn valid_token(token: &str) -> bool {
    !token.is_empty()
        && token.len() <= 200
        && !token.starts_with('.')
        && token
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_cannot_escape_the_cgroup_directory() {
        assert!(valid_token("org.freedesktop.PolicyKit1-12-3"));
        for bad in [
            "",
            "..",
            ".",
            "../x",
            "a/b",
            "a\0b",
            ".hidden",
            &"x".repeat(201),
        ] {
            assert!(!valid_token(bad), "{bad:?}");
        }
    }
}
