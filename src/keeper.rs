//! The keeper: the process a bus was started as, kept above the bus so
//! that nothing the bus started outlives it, even when the bus is killed
//! with SIGKILL.
//!
//! Before its runtime exists, busvisor forks. The child is the bus (or, on
//! a system bus, the warden above the router). The parent, the keeper, is a
//! child subreaper that only waits, on one thread:
//! - SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 that a process
//!   sends it are passed on to the bus (a terminal's signals to the
//!   foreground group reach the bus directly; a hangup's SIGHUP, which
//!   only the session leader gets, is passed on: see `forwarding`);
//! - when the bus ends, however it ends, whatever it started and left is
//!   below the keeper: the services, what they double-forked and what
//!   those re-parented to the bus, since the keeper is the nearest
//!   subreaper left. The keeper sends them SIGTERM, then SIGKILL (and
//!   `cgroup.kill` to the bus's cgroups) after a grace period, reaps them,
//!   removes the cgroup directories, the pidfile and, after a crash, the
//!   socket files, and exits with the bus's status.
//!
//! The keeper's pid is the bus's pid for the outside world: `--print-pid`
//! prints it and the pidfile holds it (both are set before the fork). The
//! bus dies with the keeper (`PR_SET_PDEATHSIG`, SIGTERM): a keeper killed
//! with SIGKILL makes the bus shut down, stopping its services itself.

use std::os::fd::{AsFd, RawFd};
use std::path::PathBuf;
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::unistd::{ForkResult, Pid};
use tracing::{info, warn};

use crate::supervision::procs;
use crate::supervision::reaper::{self, ExitKind};

/// How long the bus's orphans get between SIGTERM and SIGKILL.
const GRACE: Duration = Duration::from_secs(5);

/// What a bus that is killed cannot remove itself.
#[derive(Debug, Default)]
pub struct Leftovers {
    /// Removed when the bus ends (the keeper's pid is in it).
    pub pidfile: Option<PathBuf>,
    /// Socket files, removed when the bus did not end by itself.
    pub sockets: Vec<PathBuf>,
    /// Descriptors the keeper closes at once: listening sockets and the
    /// pipes the bus reports its address on, which must close when the bus
    /// does.
    pub close: Vec<RawFd>,
}

#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    #[error("cannot become a child subreaper (Linux 3.4+): {0}")]
    Subreaper(nix::Error),
    #[error("cannot block signals: {0}")]
    Signals(nix::Error),
    #[error("cannot fork the bus: {0}")]
    Fork(nix::Error),
}

fn signals() -> SigSet {
    let mut set = SigSet::empty();
    // The signals the keeper passes on to the bus: those `run` passes on.
    for s in crate::forwarding::FORWARDED
        .into_iter()
        .chain([Signal::SIGCHLD])
    {
        set.add(s);
    }
    set
}

/// Fork into the keeper and the bus. Returns in the bus (the child), with
/// the signal mask it had; the keeper never returns: it exits with the
/// bus's status. `forked` (started by `--fork`) makes the keeper let go of
/// its stdout (`--fork`'s parent waits for it to close) and, as dbus-daemon
/// does unless `DBUS_DEBUG_OUTPUT` is set, of its stderr. Call before any
/// other thread exists.
pub fn keep(leftovers: Leftovers, forked: bool) -> Result<(), KeeperError> {
    reaper::become_subreaper().map_err(KeeperError::Subreaper)?;
    let mut old = SigSet::empty();
    // Blocked before the fork, so that none is lost in between; the bus
    // gets its mask back.
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&signals()), Some(&mut old))
        .map_err(KeeperError::Signals)?;
    let keeper = Pid::this();
    // SAFETY: no other thread exists yet (callers run before the runtime
    // is built), so the child may run arbitrary code after fork.
    match unsafe { nix::unistd::fork() }.map_err(KeeperError::Fork)? {
        ForkResult::Child => {
            let armed = nix::sys::prctl::set_pdeathsig(Signal::SIGTERM);
            if armed.is_err() || nix::unistd::getppid() != keeper {
                // The keeper is already gone: nobody would clean up after us.
                std::process::exit(1);
            }
            let _ = nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
            Ok(())
        }
        ForkResult::Parent { child } => {
            for fd in &leftovers.close {
                let _ = nix::unistd::close(*fd);
            }
            if forked && let Ok(null) = std::fs::File::open("/dev/null") {
                let _ = nix::unistd::dup2_stdout(&null);
                if std::env::var_os(crate::daemon::DEBUG_OUTPUT_ENV).is_none() {
                    let _ = nix::unistd::dup2_stderr(&null);
                }
            }
            // The keeper ran the start-up and from now on only waits.
            crate::resident::settle();
            let code = Keeper {
                bus: child,
                leftovers,
                session_leader: crate::forwarding::session_leader(),
            }
            .run();
            std::process::exit(code);
        }
    }
}

struct Keeper {
    bus: Pid,
    leftovers: Leftovers,
    session_leader: bool,
}

impl Keeper {
    fn run(self) -> i32 {
        let sfd = match SignalFd::with_flags(
            &signals(),
            SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK,
        ) {
            Ok(s) => s,
            Err(e) => {
                // Without its signals the keeper is of no use: let the bus
                // be the main process on its own.
                warn!("keeper: cannot watch signals ({e}); leaving the bus on its own");
                return self.wait_plain();
            }
        };
        let exit = loop {
            if let Some(kind) = self.bus_exit() {
                break kind;
            }
            let mut fds = [PollFd::new(sfd.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    warn!("keeper: poll: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            while let Ok(Some(info)) = sfd.read_signal() {
                self.pass_on(info.ssi_signo as i32, info.ssi_code);
            }
        };
        self.finish(exit)
    }

    /// No signalfd: just wait for the bus, then clean up.
    fn wait_plain(self) -> i32 {
        let exit = loop {
            if let Some(kind) = self.bus_exit() {
                break kind;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        self.finish(exit)
    }

    /// A signal a process sent the keeper goes to the bus. One the kernel
    /// sent to the whole process group (a terminal's ^C) reached the bus
    /// too: passing it on would deliver it twice. A hangup's SIGHUP to the
    /// session leader reached the keeper alone (see `forwarding`).
    fn pass_on(&self, signo: i32, code: i32) {
        let Ok(signal) = Signal::try_from(signo) else {
            return;
        };
        let got = crate::forwarding::Received {
            signal,
            code,
            sender: 0,
        };
        let same_group = crate::forwarding::in_my_group(self.bus.as_raw());
        if signal == Signal::SIGCHLD
            || crate::forwarding::reached_command(&got, same_group, self.session_leader)
        {
            return;
        }
        let _ = nix::sys::signal::kill(self.bus, signal);
    }

    /// Reap whatever has exited; the bus's status once it has.
    fn bus_exit(&self) -> Option<ExitKind> {
        reaper::reap_all()
            .into_iter()
            .find_map(|(pid, kind)| (pid == self.bus.as_raw()).then_some(kind))
    }

    /// The bus has ended: end what it left, clean up, and say how it ended.
    fn finish(self, exit: ExitKind) -> i32 {
        let left = procs::end_descendants(GRACE, || {
            reaper::reap_all();
        });
        if left > 0 {
            info!(
                count = left,
                "the bus ended ({exit}); ended the processes it left"
            );
        }
        // Exact where there are cgroups: nothing of the bus's is left there.
        procs::kill_cgroups_of(self.bus.as_raw() as u32);
        reaper::reap_all();
        procs::remove_cgroups_of(self.bus.as_raw() as u32);
        if let Some(p) = &self.leftovers.pidfile {
            let _ = std::fs::remove_file(p);
        }
        if matches!(exit, ExitKind::Signal(_)) {
            for p in &self.leftovers.sockets {
                let _ = std::fs::remove_file(p);
            }
        }
        match exit {
            ExitKind::Code(c) => c,
            ExitKind::Signal(s) => {
                warn!("the bus was killed by signal {s}");
                128 + s
            }
        }
    }
}
