//! Where service processes are started, signalled and reaped: in this
//! process (a session bus, or a bus that runs as one user), or by the
//! warden (a bus started as root with `<user>`: see `crate::warden`).

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nix::sys::signal::Signal;
use nix::sys::socket::MsgFlags;
use tokio::io::Interest;
use tokio::sync::{mpsc, oneshot};
use tracing::{error, warn};

use super::reaper::{self, ExitKind};
use super::spawner::{SpawnRequest, Spawned, Spawner};
use crate::warden::protocol::{self, Event, Request};
use crate::wire::{BusError, ErrorName};

/// What the supervisor starts with.
pub(crate) enum HostSpec {
    /// Spawn and reap here; this process is the subreaper.
    Local,
    /// The router's end of the link to the warden.
    Warden(OwnedFd),
}

/// The running host.
pub(crate) enum Host {
    Local(Spawner),
    Warden(Arc<WardenLink>),
}

/// Sends signals to service processes; cheap to clone, usable under the
/// core lock (it never waits).
#[derive(Clone, Default)]
pub(crate) enum Killer {
    #[default]
    Local,
    Warden(mpsc::UnboundedSender<Vec<u8>>),
}

impl Killer {
    /// Kill the invocation `token`'s whole cgroup at once where there is
    /// one: here, or by the warden (the cgroups are root's). True only when
    /// it is known done: the warden's answer is not awaited, so the caller
    /// signals each process it knows as well.
    pub(crate) fn kill_cgroup(&self, token: &str) -> bool {
        match self {
            Killer::Local => super::procs::kill_cgroup(token),
            Killer::Warden(tx) => {
                if super::procs::cgroups().is_some() {
                    let _ = tx.send(
                        Request::KillCgroup {
                            token: token.to_owned(),
                        }
                        .encode(),
                    );
                }
                false
            }
        }
    }

    /// Signal `pid`: through its pidfd where busvisor holds one, so that
    /// a process that got the pid after it was reaped is never signalled.
    /// The warden checks with a pidfd of its own that the pid is one of its
    /// descendants.
    pub(crate) fn kill(&self, pid: i32, pidfd: Option<&OwnedFd>, sig: Signal) {
        match self {
            Killer::Local => {
                let _ = match pidfd {
                    Some(fd) => super::procs::pidfd_send_signal(fd, Some(sig)),
                    None => nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig)
                        .map_err(Into::into),
                };
            }
            Killer::Warden(tx) => {
                let _ = tx.send(
                    Request::Kill {
                        pid,
                        signal: sig as i32,
                    }
                    .encode(),
                );
            }
        }
    }
}

impl Host {
    /// Start the host; exits of service processes go to `exits`.
    pub(crate) fn start(
        spec: HostSpec,
        exits: mpsc::UnboundedSender<(i32, ExitKind)>,
    ) -> std::io::Result<Host> {
        match spec {
            HostSpec::Local => {
                reaper::become_subreaper().map_err(|e| {
                    std::io::Error::other(format!(
                        "cannot become a child subreaper (prctl PR_SET_CHILD_SUBREAPER, Linux 3.4+): {e}"
                    ))
                })?;
                super::procs::setup_cgroups(false);
                let spawner = Spawner::start()?;
                tokio::spawn(reaper::run(exits));
                Ok(Host::Local(spawner))
            }
            HostSpec::Warden(sock) => {
                super::procs::use_cgroups(nix::unistd::getppid().as_raw() as u32);
                Ok(Host::Warden(WardenLink::start(sock, exits)?))
            }
        }
    }

    pub(crate) fn killer(&self) -> Killer {
        match self {
            Host::Local(_) => Killer::Local,
            Host::Warden(link) => Killer::Warden(link.out.clone()),
        }
    }

    /// Start a service's process: `req` here, or the definition `id` as the
    /// warden reads it.
    pub(crate) async fn spawn(
        &self,
        id: &str,
        token: &str,
        req: SpawnRequest,
    ) -> Result<Spawned, BusError> {
        match self {
            Host::Local(spawner) => {
                let program = req.argv[0].clone();
                spawner.spawn(req).await.map_err(|e| {
                    BusError::new(
                        ErrorName::SpawnExecFailed,
                        format!("Failed to execute program {program}: {e}"),
                    )
                })
            }
            Host::Warden(link) => link.spawn(id, token).await,
        }
    }

    /// Start a process that is not a service (`busvisor run`'s command).
    pub(crate) async fn spawn_command(&self, req: SpawnRequest) -> std::io::Result<Spawned> {
        match self {
            Host::Local(spawner) => spawner.spawn(req).await,
            Host::Warden(_) => Err(std::io::Error::other(
                "a bus with a warden runs no commands of its own",
            )),
        }
    }
}

type Pending = Mutex<HashMap<u64, oneshot::Sender<Result<Spawned, BusError>>>>;

/// The router's end of the link to the warden.
pub(crate) struct WardenLink {
    out: mpsc::UnboundedSender<Vec<u8>>,
    pending: Pending,
    seq: AtomicU64,
}

impl WardenLink {
    fn start(
        sock: OwnedFd,
        exits: mpsc::UnboundedSender<(i32, ExitKind)>,
    ) -> std::io::Result<Arc<WardenLink>> {
        // Registered with the runtime as a stream socket, although it is a
        // SOCK_SEQPACKET: only readiness is used, every read and write is
        // our own recvmsg/sendmsg.
        let std = std::os::unix::net::UnixStream::from(sock);
        std.set_nonblocking(true)?;
        let sock = Arc::new(tokio::net::UnixStream::from_std(std)?);
        let (out, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let link = Arc::new(WardenLink {
            out,
            pending: Mutex::new(HashMap::new()),
            seq: AtomicU64::new(1),
        });
        let writer = sock.clone();
        tokio::spawn(async move {
            while let Some(msg) = rx.recv().await {
                loop {
                    if writer.writable().await.is_err() {
                        return;
                    }
                    match writer.try_io(Interest::WRITABLE, || {
                        protocol::send(writer.as_raw_fd(), &msg, &[]).map_err(std::io::Error::from)
                    }) {
                        Ok(()) => break,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                        Err(e) => {
                            warn!("cannot write to the warden: {e}");
                            break;
                        }
                    }
                }
            }
        });
        let reader = link.clone();
        tokio::spawn(async move {
            loop {
                if sock.readable().await.is_err() {
                    break;
                }
                let got = sock.try_io(Interest::READABLE, || {
                    protocol::recv(&*sock, MsgFlags::MSG_DONTWAIT).map_err(std::io::Error::from)
                });
                match got {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(e) => {
                        error!("reading from the warden: {e}");
                        break;
                    }
                    Ok((data, _)) if data.is_empty() => break,
                    Ok((data, fds)) => reader.event(&data, fds, &exits),
                }
            }
            // Nothing can be started, stopped or reaped any more: a bus
            // that cannot keep its services does not go on.
            error!("the warden is gone: exiting");
            std::process::exit(1);
        });
        Ok(link)
    }

    fn event(
        &self,
        data: &[u8],
        fds: Vec<OwnedFd>,
        exits: &mpsc::UnboundedSender<(i32, ExitKind)>,
    ) {
        let event = match Event::decode(data) {
            Ok(e) => e,
            Err(e) => return warn!("{e}"),
        };
        let (seq, result) = match event {
            Event::Exited { pid, kind } => {
                let _ = exits.send((pid, kind));
                return;
            }
            Event::Spawned { seq, pid, program } => {
                let mut fds = fds.into_iter();
                (
                    seq,
                    Ok(Spawned {
                        pid,
                        program: program.into(),
                        stdout: fds.next(),
                        stderr: fds.next(),
                    }),
                )
            }
            Event::Failed { seq, error, text } => {
                let name = ErrorName::parse(&error).unwrap_or(ErrorName::SpawnExecFailed);
                (seq, Err(BusError::new(name, text)))
            }
        };
        let waiter = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&seq);
        if let Some(w) = waiter {
            let _ = w.send(result);
        }
    }

    async fn spawn(&self, id: &str, token: &str) -> Result<Spawned, BusError> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(seq, tx);
        let req = Request::Spawn {
            seq,
            id: id.to_owned(),
            token: token.to_owned(),
        };
        let gone = || BusError::new(ErrorName::SpawnExecFailed, "the warden is gone");
        self.out.send(req.encode()).map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }
}
