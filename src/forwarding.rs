//! The signals `busvisor run` passes on to its command, as tini does:
//! SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 (the keeper, above
//! the bus, passes the same on to the bus by the same rule).
//!
//! They are blocked in every thread and read from a signalfd, which says
//! how each was sent. That matters because the command shares busvisor's
//! process group (as under dbus-run-session, so that the terminal's job
//! control sees one job): what the terminal sends to the whole foreground
//! group (Ctrl-C) reached the command already, and sending it again would
//! make one Ctrl-C two. Blocked signals are also the only ones PID 1 in a
//! PID namespace is sure to get: the kernel drops a signal sent to it that
//! it neither blocks nor handles.

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

/// What `run` forwards to its command.
pub const FORWARDED: [Signal; 6] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

fn set() -> SigSet {
    let mut set = SigSet::empty();
    for s in FORWARDED {
        set.add(s);
    }
    set
}

/// Block the forwarded signals in this thread and so in every thread it
/// starts afterwards: call it before the runtime starts, or a signal may go
/// to a thread that takes its default action (death). What busvisor
/// spawns starts with no signal blocked (see `spawner`).
pub fn block() -> nix::Result<()> {
    set().thread_block()
}

/// One signal received, and how it was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Received {
    pub(crate) signal: Signal,
    /// `si_code`: `SI_USER` for kill(2), `SI_KERNEL` for the terminal.
    pub(crate) code: i32,
    pub(crate) sender: u32,
}

/// The forwarded signals as they arrive (see [`block`]), read by a thread
/// of their own.
pub(crate) struct Signals {
    rx: tokio::sync::mpsc::UnboundedReceiver<Received>,
}

impl Signals {
    pub(crate) fn new() -> std::io::Result<Signals> {
        let fd = SignalFd::with_flags(&set(), SfdFlags::SFD_CLOEXEC)?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        std::thread::Builder::new()
            .name("busvisor-signals".into())
            .spawn(move || {
                loop {
                    match fd.read_signal() {
                        Ok(Some(info)) => {
                            let Ok(signal) = Signal::try_from(info.ssi_signo as i32) else {
                                continue;
                            };
                            let r = Received {
                                signal,
                                code: info.ssi_code,
                                sender: info.ssi_pid,
                            };
                            if tx.send(r).is_err() {
                                return;
                            }
                        }
                        Ok(None) | Err(nix::errno::Errno::EINTR) => {}
                        Err(e) => return tracing::warn!("cannot read signals any more: {e}"),
                    }
                }
            })?;
        Ok(Signals { rx })
    }

    /// The next signal; None if they can no longer be read.
    pub(crate) async fn recv(&mut self) -> Option<Received> {
        self.rx.recv().await
    }
}

/// Whether the command got `r` itself, so that forwarding it would deliver
/// it twice. The kernel (`SI_KERNEL`) sends the terminal's SIGINT and
/// SIGQUIT (Ctrl-C, Ctrl-\) to the whole foreground group, and SIGHUP to a
/// whole group when its session leader exits or the group is orphaned; but
/// a hangup sends SIGHUP to the session leader alone. kill(2) reaches
/// busvisor alone. `same_group`: the command is still in busvisor's process
/// group (an interactive shell moves to one of its own).
pub(crate) fn reached_command(r: &Received, same_group: bool, session_leader: bool) -> bool {
    if r.code != libc::SI_KERNEL || !same_group {
        return false;
    }
    match r.signal {
        Signal::SIGINT | Signal::SIGQUIT => true,
        Signal::SIGHUP => !session_leader,
        _ => false,
    }
}

/// Whether `pid` is in this process's group.
pub(crate) fn in_my_group(pid: i32) -> bool {
    nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(pid)))
        .is_ok_and(|g| g == nix::unistd::getpgrp())
}

/// Whether this process leads its session.
pub(crate) fn session_leader() -> bool {
    nix::unistd::getsid(None).is_ok_and(|s| s == nix::unistd::getpid())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn got(signal: Signal, code: i32) -> Received {
        Received {
            signal,
            code,
            sender: 0,
        }
    }

    #[test]
    fn only_what_the_terminal_sent_to_the_shared_group_is_not_forwarded() {
        let k = libc::SI_KERNEL;
        let u = libc::SI_USER;
        // Ctrl-C, Ctrl-\: the whole group got it.
        assert!(reached_command(&got(Signal::SIGINT, k), true, false));
        assert!(reached_command(&got(Signal::SIGQUIT, k), true, true));
        // ... unless the command has a group of its own.
        assert!(!reached_command(&got(Signal::SIGINT, k), false, false));
        // kill(2) reaches busvisor alone, whatever the signal.
        for s in FORWARDED {
            assert!(!reached_command(&got(s, u), true, false), "{s}");
        }
        // A hangup signals the session leader alone; a leader's exit, its
        // foreground group.
        assert!(!reached_command(&got(Signal::SIGHUP, k), true, true));
        assert!(reached_command(&got(Signal::SIGHUP, k), true, false));
        // The kernel sends no SIGTERM or SIGUSR1 to groups.
        assert!(!reached_command(&got(Signal::SIGTERM, k), true, false));
        assert!(!reached_command(&got(Signal::SIGUSR1, k), true, false));
    }
}
