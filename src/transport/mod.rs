//! Listening sockets, the accept loop, authentication and the two tasks of
//! each connection (reader and writer).
//!
//! Authentication (SASL EXTERNAL, `sasl.rs`) runs under the configured auth
//! timeout and holds no shared state, so a client that never authenticates
//! costs one task and one socket and blocks nobody. Only the bus's own uid
//! (or root) may connect. After it, a connection is two tasks around one
//! socket (`socket.rs`): zbus frames and parses what the reader receives,
//! and no zbus `Connection` is kept per peer.

pub mod sasl;
pub mod socket;

use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use nix::sys::socket::sockopt;
use tokio::net::UnixListener;
use tracing::{debug, info, warn};
use zbus::connection::socket::ReadHalf;
use zbus::message::Message;
use zbus::names::OwnedUniqueName;

use crate::bus::{Activator, Bus, Credentials, Cutter, Outbox, PeerId, Verdict, unique_name};
use crate::config::address::ListenAddress;
use crate::wire::{self, BusError, ErrorName};

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot listen on {address}: {source}")]
    Bind {
        address: String,
        source: std::io::Error,
    },
    #[error("{0} is in use by a running bus; refusing to replace it")]
    InUse(String),
    #[error("unsupported listen address {0}: busvisor listens on unix sockets only")]
    Unsupported(String),
}

/// A bound listening socket and the address clients use for it.
pub(crate) struct Bound {
    pub listener: UnixListener,
    /// Client address, without the guid.
    pub address: String,
    /// Socket file to remove at shutdown (the caller's job).
    pub path: Option<PathBuf>,
}

fn random_suffix() -> String {
    let g = zbus::Guid::generate();
    g.as_str()[..16].to_owned()
}

fn bind_path(path: &Path, spec: &str) -> Result<Bound, TransportError> {
    if path.exists() {
        // A live bus answers a connect; a stale socket file does not.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(TransportError::InUse(path.display().to_string()));
        }
        let _ = std::fs::remove_file(path);
    }
    let std = StdUnixListener::bind(path).map_err(|source| TransportError::Bind {
        address: spec.to_owned(),
        source,
    })?;
    finish(
        std,
        crate::config::address::client_address_for_path(path),
        Some(path.to_owned()),
        spec,
    )
}

fn finish(
    std: StdUnixListener,
    address: String,
    path: Option<PathBuf>,
    spec: &str,
) -> Result<Bound, TransportError> {
    let err = |source| TransportError::Bind {
        address: spec.to_owned(),
        source,
    };
    std.set_nonblocking(true).map_err(err)?;
    let listener = UnixListener::from_std(std).map_err(err)?;
    Ok(Bound {
        listener,
        address,
        path,
    })
}

/// Bind one listen address. Must be called inside the tokio runtime.
pub(crate) fn bind(addr: &ListenAddress, spec: &str) -> Result<Bound, TransportError> {
    match addr {
        ListenAddress::Path(p) => bind_path(p, spec),
        ListenAddress::Dir(d) | ListenAddress::Tmpdir(d) => {
            let p = d.join(format!("dbus-{}", random_suffix()));
            bind_path(&p, spec)
        }
        ListenAddress::Runtime => {
            let dir = std::env::var_os("XDG_RUNTIME_DIR").ok_or_else(|| TransportError::Bind {
                address: spec.to_owned(),
                source: std::io::Error::other("XDG_RUNTIME_DIR is not set"),
            })?;
            bind_path(&Path::new(&dir).join("bus"), spec)
        }
        ListenAddress::Abstract(name) => {
            use std::os::linux::net::SocketAddrExt;
            let err = |source| TransportError::Bind {
                address: spec.to_owned(),
                source,
            };
            let sa =
                std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).map_err(err)?;
            if std::os::unix::net::UnixStream::connect_addr(&sa).is_ok() {
                return Err(TransportError::InUse(format!("abstract socket {name}")));
            }
            let std = StdUnixListener::bind_addr(&sa).map_err(err)?;
            finish(
                std,
                format!(
                    "unix:abstract={}",
                    crate::config::address::escape_value(name)
                ),
                None,
                spec,
            )
        }
        ListenAddress::Tcp { .. } => Err(TransportError::Unsupported(spec.to_owned())),
    }
}

/// Counters shared by the accept loop and connection tasks.
#[derive(Default)]
pub(crate) struct Gate {
    incomplete: AtomicUsize,
}

impl Gate {
    pub(crate) fn new() -> Self {
        Gate {
            incomplete: AtomicUsize::new(0),
        }
    }
}

/// Holds one incomplete-connection slot.
struct Incomplete(Arc<Gate>);

impl Drop for Incomplete {
    fn drop(&mut self) {
        self.0.incomplete.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Accept connections until the task is dropped.
pub(crate) async fn serve<S: Activator + Send + 'static>(
    bus: Arc<Bus<S>>,
    gate: Arc<Gate>,
    listener: UnixListener,
) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let pending = gate.incomplete.load(Ordering::Relaxed) as u64;
        if pending >= bus.facts.limits.max_incomplete_connections {
            warn!("too many connections still authenticating ({pending}); refusing one");
            continue;
        }
        let connected = bus.peer_count() as u64;
        // Every client has the bus's uid (or is root): the per-user limit is the total.
        if connected >= bus.facts.limits.max_completed_connections
            || connected >= bus.facts.limits.max_connections_per_user
        {
            warn!("max_completed_connections reached; refusing a connection");
            continue;
        }
        tokio::spawn(connection(bus.clone(), gate.clone(), stream));
    }
}

async fn connection<S: Activator + Send + 'static>(
    bus: Arc<Bus<S>>,
    gate: Arc<Gate>,
    stream: tokio::net::UnixStream,
) {
    // Credentials straight from the socket (SO_PEERCRED, SO_PEERPIDFD): a
    // foreign uid is refused before it costs a handshake.
    let peer = match nix::sys::socket::getsockopt(&stream, sockopt::PeerCredentials) {
        Ok(c) => c,
        Err(e) => return debug!("cannot read peer credentials: {e}"),
    };
    if peer.uid() != bus.facts.uid && peer.uid() != 0 {
        return warn!(
            "refused a connection from uid {}: only uid {} may connect",
            peer.uid(),
            bus.facts.uid
        );
    }
    let creds = Credentials {
        uid: Some(peer.uid()),
        gid: Some(peer.gid()),
        pid: u32::try_from(peer.pid()).ok().filter(|p| *p > 0),
    };
    let pid = creds.pid;
    // Until its Hello, a connection is incomplete (as in dbus-daemon): it
    // counts against max_incomplete_connections and has auth_timeout to get
    // there. The guard gives the slot back however this task ends.
    gate.incomplete.fetch_add(1, Ordering::Relaxed);
    let incomplete = Incomplete(gate.clone());
    let timeout = Duration::from_millis(bus.facts.limits.auth_timeout_ms.max(1));
    let deadline = tokio::time::Instant::now() + timeout;
    let negotiated = match tokio::time::timeout_at(
        deadline,
        sasl::handshake(&stream, &bus.facts.guid, peer.uid()),
    )
    .await
    {
        Ok(Ok(n)) => n,
        Ok(Err(e)) => return debug!(?pid, "authentication failed: {e}"),
        // Dropping the stream closes it.
        Err(_) => {
            return info!(
                ?pid,
                "dropped a connection that did not authenticate within {timeout:?}"
            );
        }
    };
    let stream = Arc::new(stream);
    let cutter = Arc::new(Cutter::new(stream.clone()));
    let mut reader = socket::Reader::new(stream.clone());
    let mut leftover = negotiated.leftover;
    let mut seq = 0u64;
    let mut received_fds = Vec::new();
    // The peer joins the bus, and gets its unique name, with its Hello.
    // Before it, as in dbus-daemon, a method call gets AccessDenied and the
    // connection stays unregistered (and incomplete, on the same deadline).
    let first = loop {
        let m = tokio::time::timeout_at(
            deadline,
            reader.receive_message(seq, &mut leftover, &mut received_fds),
        )
        .await;
        let m = match m {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => return debug!(?pid, "read error before Hello: {e}"),
            Err(_) => {
                cutter.cut();
                return info!(
                    ?pid,
                    "dropped a connection that sent no Hello within {timeout:?}"
                );
            }
        };
        if crate::bus::driver::is_hello(&m) {
            break m;
        }
        seq += 1;
        let denied = BusError::new(
            ErrorName::AccessDenied,
            "Client tried to send a message other than Hello without being registered",
        );
        if wire::wants_reply(&m)
            && let Some(e) = wire::error(&m, &denied)
        {
            let sent = tokio::time::timeout_at(deadline, socket::write_all(&stream, &[e])).await;
            if !matches!(sent, Ok(Ok(()))) {
                return debug!(?pid, "cannot answer a message sent before Hello");
            }
        }
    };
    drop(incomplete);
    let outbox = Arc::new(Outbox::new(
        bus.facts.limits.max_outgoing_bytes as usize,
        bus.facts.limits.max_outgoing_unix_fds as usize,
        negotiated.fds,
    ));
    let id = bus.add_peer(outbox.clone(), cutter.clone(), creds);
    let me = match OwnedUniqueName::try_from(unique_name(id)) {
        Ok(n) => n,
        Err(e) => {
            bus.remove_peer(id);
            return warn!("bad unique name: {e}");
        }
    };
    info!(peer = %me, ?pid, "connected");
    let writer = tokio::spawn(write_loop(id, stream.clone(), outbox, cutter.clone()));

    let mut next = Some(first);
    loop {
        let msg = match next.take() {
            Some(m) => m,
            None => {
                seq += 1;
                match reader
                    .receive_message(seq, &mut leftover, &mut received_fds)
                    .await
                {
                    Ok(m) => m,
                    Err(e) => {
                        if !reader.at_message_boundary() {
                            debug!(peer = %me, "read error: {e}");
                        }
                        break;
                    }
                }
            }
        };
        // A body that does not match its signature is a protocol error.
        if let Err(e) = msg.body().validate() {
            info!(peer = %me, "invalid message body: {e}");
            break;
        }
        // Stamp the sender: peers may not speak for anyone else.
        let msg = if msg.header().sender().is_some_and(|s| *s == *me) {
            msg
        } else {
            match msg.with_sender(&me) {
                Ok(m) => m,
                Err(e) => {
                    info!(peer = %me, "cannot stamp message: {e}");
                    break;
                }
            }
        };
        match bus.handle(id, msg) {
            Verdict::Continue => {}
            Verdict::Disconnect(why) => {
                info!(peer = %me, "disconnecting: {why}");
                break;
            }
            // Backpressure: read no more from this peer until a recipient that
            // is reading, only slower, has caught up (bounded: a recipient
            // that stops moving stops being waited for).
            Verdict::Wait(outbox) => outbox.wait_drained().await,
        }
    }
    bus.remove_peer(id);
    // Let the writer flush what is queued, but never wait on a stuck peer.
    // The socket closes when the last handle to it goes, with this task.
    if tokio::time::timeout(Duration::from_millis(200), writer)
        .await
        .is_err()
    {
        cutter.cut();
    }
}

async fn write_loop(
    id: PeerId,
    stream: Arc<tokio::net::UnixStream>,
    outbox: Arc<Outbox>,
    cutter: Arc<Cutter>,
) {
    let mut batch: Vec<Message> = Vec::new();
    while outbox.next_batch(&mut batch).await {
        // Messages with fds never reach the outbox of a peer that cannot take them.
        let result = socket::write_all(&stream, &batch).await;
        outbox.sent(&batch);
        batch.clear();
        if let Err(e) = result {
            debug!(peer = %unique_name(id), "write failed: {e}");
            cutter.cut();
            break;
        }
    }
}
