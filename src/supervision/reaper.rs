//! The one reaper: busvisor is a child subreaper, so every process it
//! started, and every orphan of those, ends up as its child. On each SIGCHLD
//! (signals coalesce) it collects exits with `waitid(P_ALL, WNOHANG)` until
//! none is left, and reports them.

use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::spawner::SPAWN_LOCK;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    Code(i32),
    Signal(i32),
}

impl ExitKind {
    pub fn is_success(&self) -> bool {
        *self == ExitKind::Code(0)
    }
}

impl std::fmt::Display for ExitKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitKind::Code(c) => write!(f, "exited with status {c}"),
            ExitKind::Signal(s) => {
                let name = nix::sys::signal::Signal::try_from(*s)
                    .map(|s| s.as_str())
                    .unwrap_or("unknown");
                write!(f, "killed by signal {s} ({name})")
            }
        }
    }
}

/// Become a child subreaper. Fatal if it fails: supervision depends on it.
pub fn become_subreaper() -> nix::Result<()> {
    nix::sys::prctl::set_child_subreaper(true)
}

/// Collect every exited child now; never blocks.
pub fn reap_all() -> Vec<(i32, ExitKind)> {
    let _guard = SPAWN_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut out = Vec::new();
    loop {
        match waitid(Id::All, WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG) {
            Ok(WaitStatus::Exited(pid, code)) => out.push((pid.as_raw(), ExitKind::Code(code))),
            Ok(WaitStatus::Signaled(pid, sig, _)) => {
                out.push((pid.as_raw(), ExitKind::Signal(sig as i32)))
            }
            Ok(WaitStatus::StillAlive) => break,
            Ok(other) => debug!("waitid: {other:?}"),
            Err(nix::errno::Errno::ECHILD) => break,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                warn!("waitid failed: {e}");
                break;
            }
        }
    }
    out
}

/// Run the reaper: exits go to `tx`.
pub async fn run(tx: mpsc::UnboundedSender<(i32, ExitKind)>) {
    let mut sigchld = match signal(SignalKind::child()) {
        Ok(s) => s,
        Err(e) => return warn!("cannot watch SIGCHLD: {e}"),
    };
    loop {
        let exits = reap_all();
        if !exits.is_empty() {
            super::procs::prune_cgroups(false);
        }
        for exit in exits {
            if tx.send(exit).is_err() {
                return;
            }
        }
        // tokio's signal stream coalesces but never loses a SIGCHLD that
        // came after it was created, and each wake-up reaps everything:
        // no polling when nothing exits.
        if sigchld.recv().await.is_none() {
            return;
        }
    }
}
