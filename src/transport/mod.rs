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
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};
use zbus::message::Message;
use zbus::names::OwnedUniqueName;

use crate::bus::{
    Activator, Bus, Credentials, Cutter, Facts, Identity, Outbox, PeerId, Verdict, unique_name,
};
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
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(String),
    #[error("unsupported listen address {0}: busvisor listens on unix sockets only")]
    Unsupported(String),
}

/// A bound listening socket and the address clients use for it.
pub(crate) struct Bound {
    /// Non-blocking, not yet registered with a runtime: a bus that drops
    /// privileges binds before its runtime exists.
    pub listener: StdUnixListener,
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
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        // Only a stale socket may go: anything else at the path is
        // somebody's file, which a typo in --address must not destroy.
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(TransportError::NotASocket(path.display().to_string()));
        }
        // A live bus answers a connect; a stale socket file does not.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(TransportError::InUse(path.display().to_string()));
        }
        let _ = std::fs::remove_file(path);
    }
    let err = |source| TransportError::Bind {
        address: spec.to_owned(),
        source,
    };
    let std = StdUnixListener::bind(path).map_err(err)?;
    // Open to every user, as dbus-daemon makes it: who may connect is the
    // policy's call (and the directory's), not the socket file's mode.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777)).map_err(err)?;
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
    Ok(Bound {
        listener: std,
        address,
        path,
    })
}

/// Bind one listen address.
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

impl Incomplete {
    fn hold(gate: Arc<Gate>) -> Self {
        gate.incomplete.fetch_add(1, Ordering::Relaxed);
        Incomplete(gate)
    }
}

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
        // The completed-connection limits answer Hello with LimitsExceeded,
        // as dbus-daemon does (`bus/driver.c`); this cap only keeps
        // connections whose Hello was refused from piling up.
        let connected = bus.peer_count() as u64;
        let limits = &bus.facts.limits;
        if connected >= limits.max_completed_connections + limits.max_incomplete_connections {
            warn!("{connected} connections registered or refused at Hello; refusing one");
            continue;
        }
        tokio::spawn(connection(bus.clone(), gate.clone(), stream));
    }
}

/// Serve one accepted connection until it ends.
async fn connection<S: Activator + Send + 'static>(
    bus: Arc<Bus<S>>,
    gate: Arc<Gate>,
    stream: UnixStream,
) {
    let Some((uid, creds)) = credentials(&bus, &stream) else {
        return;
    };
    // Until its Hello, a connection is incomplete (as in dbus-daemon): it
    // counts against max_incomplete_connections and has auth_timeout to get
    // there. The guard gives the slot back however this task ends.
    let incomplete = Incomplete::hold(gate);
    let deadline = Deadline::start(&bus.facts);
    // The handshake's futures are boxed: the task keeps, for as long as it
    // lives, room for its largest state, and an idle peer is past these.
    let Some(negotiated) = Box::pin(authenticate(
        &stream,
        &bus.facts.guid,
        uid,
        creds.pid,
        deadline,
    ))
    .await
    else {
        return;
    };
    let limits = socket::ReadLimits {
        max_message_size: bus.facts.limits.max_message_size,
        pending_fd_timeout: Duration::from_millis(bus.facts.limits.pending_fd_timeout_ms),
        fds: negotiated.fds,
    };
    let mut link = Link::new(stream, limits, negotiated.leftover);
    let Some(hello) = Box::pin(await_hello(&mut link, creds.pid, deadline)).await else {
        return;
    };
    drop(incomplete);
    let Some(peer) = register(&bus, &link, creds, negotiated.fds) else {
        return;
    };
    link.reader.stamp(&peer.name);
    read_loop(&bus, &mut link, &peer, hello).await;
    teardown(&bus, peer, &link.cutter).await;
}

/// The auth timeout and when it runs out: authentication and Hello share it.
#[derive(Clone, Copy)]
struct Deadline {
    at: Instant,
    timeout: Duration,
}

impl Deadline {
    fn start(facts: &Facts) -> Self {
        let timeout = Duration::from_millis(facts.limits.auth_timeout_ms.max(1));
        Deadline {
            at: Instant::now() + timeout,
            timeout,
        }
    }
}

/// The peer's uid (for the handshake) and credentials; None (logged) if
/// they cannot be read or the uid may not connect.
fn credentials<S: Activator>(bus: &Bus<S>, stream: &UnixStream) -> Option<(u32, Credentials)> {
    // Credentials straight from the socket (SO_PEERCRED, SO_PEERPIDFD): a
    // foreign uid is refused before it costs a handshake.
    let peer = match nix::sys::socket::getsockopt(stream, sockopt::PeerCredentials) {
        Ok(c) => c,
        Err(e) => {
            debug!("cannot read peer credentials: {e}");
            return None;
        }
    };
    // The policy's connect rules (`<allow user=...>`, `<allow group=...>`);
    // without one, only the bus's own uid, as in dbus-daemon.
    let facts = &bus.facts;
    let groups = facts.groups_of(peer.uid(), peer.gid());
    if !bus.may_connect(peer.uid(), &groups) {
        warn!(
            "refused a connection from uid {}: the policy does not allow it to connect",
            peer.uid()
        );
        return None;
    }
    let creds = Credentials {
        uid: Some(peer.uid()),
        gid: Some(peer.gid()),
        pid: u32::try_from(peer.pid()).ok().filter(|p| *p > 0),
    };
    Some((peer.uid(), creds))
}

/// SASL EXTERNAL by the deadline; None (logged) if it fails or is late.
async fn authenticate(
    stream: &UnixStream,
    guid: &str,
    uid: u32,
    pid: Option<u32>,
    deadline: Deadline,
) -> Option<sasl::Negotiated> {
    let Deadline { at, timeout } = deadline;
    match tokio::time::timeout_at(at, sasl::handshake(stream, guid, uid)).await {
        Ok(Ok(n)) => Some(n),
        Ok(Err(e)) => {
            debug!(?pid, "authentication failed: {e}");
            None
        }
        // The caller drops the stream, which closes it.
        Err(_) => {
            info!(
                ?pid,
                "dropped a connection that did not authenticate within {timeout:?}"
            );
            None
        }
    }
}

/// An authenticated socket and what its reader carries from one message to
/// the next.
struct Link {
    stream: Arc<UnixStream>,
    cutter: Arc<Cutter>,
    reader: socket::Reader,
}

impl Link {
    fn new(stream: UnixStream, limits: socket::ReadLimits, leftover: Vec<u8>) -> Self {
        let stream = Arc::new(stream);
        Link {
            cutter: Arc::new(Cutter::new(stream.clone())),
            reader: socket::Reader::new(stream.clone(), limits, leftover),
            stream,
        }
    }

    async fn receive(&mut self) -> std::io::Result<Message> {
        self.reader.receive().await
    }
}

/// Read up to the peer's Hello, by the deadline. Before it, as in
/// dbus-daemon, a method call gets AccessDenied and the connection stays
/// unregistered (and incomplete). None (logged) if it ends first.
async fn await_hello(link: &mut Link, pid: Option<u32>, deadline: Deadline) -> Option<Message> {
    let Deadline { at, timeout } = deadline;
    loop {
        let m = match tokio::time::timeout_at(at, link.receive()).await {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => {
                debug!(?pid, "read error before Hello: {e}");
                return None;
            }
            Err(_) => {
                link.cutter.cut();
                info!(
                    ?pid,
                    "dropped a connection that sent no Hello within {timeout:?}"
                );
                return None;
            }
        };
        if crate::bus::driver::is_hello(&m) {
            return Some(m);
        }
        if !deny_before_hello(link, &m, pid, deadline).await {
            return None;
        }
    }
}

/// Answer a message sent before Hello with AccessDenied if it wants a
/// reply; false (logged) if the answer cannot be written by the deadline.
async fn deny_before_hello(link: &Link, m: &Message, pid: Option<u32>, deadline: Deadline) -> bool {
    let denied = BusError::new(
        ErrorName::AccessDenied,
        "Client tried to send a message other than Hello without being registered",
    );
    if wire::wants_reply(m)
        && let Some(e) = wire::error(m, &denied)
    {
        let sent =
            tokio::time::timeout_at(deadline.at, socket::write_all(&link.stream, &[e])).await;
        if !matches!(sent, Ok(Ok(()))) {
            debug!(?pid, "cannot answer a message sent before Hello");
            return false;
        }
    }
    true
}

/// A peer on the bus: its id, its unique name and the task writing to it.
struct Registered {
    id: PeerId,
    name: OwnedUniqueName,
    writer: JoinHandle<()>,
    /// Its queue (and its messages queued for others: max_incoming_bytes).
    outbox: Arc<Outbox>,
}

/// What the bus keeps of who the peer is, read here, off the bus lock: its
/// groups from the socket (SO_PEERGROUPS, Linux 4.13+; the user database
/// only on older kernels) and its command line for the log.
fn identity(facts: &Facts, cutter: &Cutter, creds: Credentials) -> Identity {
    let mut groups = match (creds.uid, creds.gid, cutter.groups()) {
        (_, Some(gid), Some(mut g)) => {
            g.push(gid);
            g
        }
        (Some(uid), Some(gid), None) => facts.groups_of(uid, gid),
        _ => Vec::new(),
    };
    groups.sort_unstable();
    groups.dedup();
    let cmdline = creds.pid.and_then(cmdline_head);
    Identity {
        loginfo: Identity::loginfo(&creds, cmdline.as_deref()).into(),
        groups: groups.into(),
        creds,
    }
}

/// The start of a process's command line, as much as the log shows of it:
/// one read (`std::fs::read` would stat the file and read it in growing
/// steps, seven system calls instead of three).
fn cmdline_head(pid: u32) -> Option<Vec<u8>> {
    use std::io::Read;
    let mut f = std::fs::File::open(format!("/proc/{pid}/cmdline")).ok()?;
    let mut head = [0u8; 64];
    let n = f.read(&mut head).ok()?;
    Some(head[..n].to_vec())
}

/// Join the bus with the Hello: the peer gets its unique name and an
/// outbox, which a writer task drains. None (logged) if the name is bad.
fn register<S: Activator>(
    bus: &Bus<S>,
    link: &Link,
    creds: Credentials,
    fds: bool,
) -> Option<Registered> {
    let limits = &bus.facts.limits;
    let outbox = Arc::new(
        Outbox::new(
            limits.max_outgoing_bytes as usize,
            limits.max_outgoing_unix_fds as usize,
            fds,
        )
        .limit_incoming(limits.max_incoming_bytes as usize),
    );
    let who = identity(&bus.facts, &link.cutter, creds);
    let id = bus.add_peer(outbox.clone(), link.cutter.clone(), who);
    let name = match OwnedUniqueName::try_from(unique_name(id)) {
        Ok(n) => n,
        Err(e) => {
            bus.remove_peer(id);
            warn!("bad unique name: {e}");
            return None;
        }
    };
    info!(peer = %name, pid = ?creds.pid, "connected");
    trim::joined();
    let writer = tokio::spawn(write_loop(
        id,
        link.stream.clone(),
        outbox.clone(),
        link.cutter.clone(),
    ));
    Some(Registered {
        id,
        name,
        writer,
        outbox,
    })
}

/// Hand the peer's messages to the bus, its Hello first, until the peer
/// closes, breaks the protocol or is disconnected.
async fn read_loop<S: Activator>(bus: &Bus<S>, link: &mut Link, peer: &Registered, hello: Message) {
    let me = &peer.name;
    let mut msg = hello;
    // The Hello came before the peer had a name; the reader stamps the rest.
    let mut stamped = false;
    // A pipelining peer's messages are all in its socket and the chunk
    // read ahead: reading them never waits, so without a bound one peer
    // could keep the worker for its whole backlog. Each turn is TURN
    // messages (a 4 KiB share of a big one counting as one), then the
    // task yields to the others.
    const TURN: usize = 16;
    let mut turn = 0;
    loop {
        turn += 1 + msg.data().len() / 4096;
        if turn >= TURN {
            turn = 0;
            tokio::task::yield_now().await;
        }
        let Some(admitted) = admit(msg, me, stamped) else {
            return;
        };
        stamped = true;
        match bus.handle(peer.id, admitted) {
            Verdict::Continue => {}
            Verdict::Disconnect(why) => return info!(peer = %me, "disconnecting: {why}"),
            // Backpressure: read no more from this peer until a recipient that
            // is reading, only slower, has caught up (bounded: a recipient
            // that stops moving stops being waited for).
            Verdict::Wait(outbox) => outbox.wait_drained().await,
        }
        // max_incoming_bytes: while this peer's messages queued for others
        // pass it, read no more of them (dbus-daemon's live messages).
        if peer.outbox.incoming.over() {
            peer.outbox.incoming.wait_within().await;
        }
        msg = match link.receive().await {
            Ok(m) => m,
            Err(e) => {
                // At a message boundary, the peer just closed.
                let closed = e.kind() == std::io::ErrorKind::UnexpectedEof
                    && link.reader.at_message_boundary();
                if !closed {
                    info!(peer = %me, "disconnecting: {e}");
                }
                return;
            }
        };
    }
}

/// The message as the bus may route it: its body valid and its sender
/// stamped (`stamped`: the reader did). None (logged) on a protocol error.
pub(crate) fn admit(msg: Message, me: &OwnedUniqueName, stamped: bool) -> Option<Message> {
    // A body that does not match its signature is a protocol error.
    if let Err(e) = msg.body().validate() {
        info!(peer = %me, "invalid message body: {e}");
        return None;
    }
    // Stamp the sender: peers may not speak for anyone else.
    if stamped || msg.header().sender().is_some_and(|s| *s == **me) {
        return Some(msg);
    }
    match msg.with_sender(me) {
        Ok(m) => Some(m),
        Err(e) => {
            info!(peer = %me, "cannot stamp message: {e}");
            None
        }
    }
}

/// Leave the bus. Let the writer flush what is queued, but never wait on a
/// stuck peer. The socket closes when the last handle to it goes, with the
/// connection task.
async fn teardown<S: Activator>(bus: &Bus<S>, peer: Registered, cutter: &Cutter) {
    bus.remove_peer(peer.id);
    trim::left();
    // Its outbox is closed: a writer with nothing queued or being written
    // ends by itself as soon as it runs, so no timer is armed for it
    // (arming one wakes the runtime's driver: a system call and a turn of
    // its loop per connection).
    if peer.outbox.queued_bytes() == 0 {
        return;
    }
    if Box::pin(tokio::time::timeout(
        Duration::from_millis(200),
        peer.writer,
    ))
    .await
    .is_err()
    {
        cutter.cut();
    }
}

/// Memory given back after a mass disconnect. glibc keeps what is freed
/// for reuse, and the connections of many peers leave it spread over the
/// heap; once the bus has `DROP` fewer registered peers than at its peak
/// since the last trim, `malloc_trim` runs when they stop leaving (no
/// fewer peers than 200 ms before; one trim at a time, so a storm of
/// disconnects costs one), returning the free pages.
mod trim {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Duration;

    static LIVE: AtomicUsize = AtomicUsize::new(0);
    static PEAK: AtomicUsize = AtomicUsize::new(0);
    static ARMED: AtomicBool = AtomicBool::new(false);

    /// How many peers must have left since the peak.
    const DROP: usize = 256;

    pub(super) fn joined() {
        let live = LIVE.fetch_add(1, Ordering::Relaxed) + 1;
        PEAK.fetch_max(live, Ordering::Relaxed);
    }

    pub(super) fn left() {
        let live = LIVE.fetch_sub(1, Ordering::Relaxed) - 1;
        if PEAK.load(Ordering::Relaxed) < live + DROP || ARMED.swap(true, Ordering::Relaxed) {
            return;
        }
        tokio::spawn(async {
            // Once they stop leaving.
            loop {
                let before = LIVE.load(Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(200)).await;
                if LIVE.load(Ordering::Relaxed) >= before {
                    break;
                }
            }
            PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
            ARMED.store(false, Ordering::Relaxed);
            crate::resident::trim_heap();
        });
    }
}

async fn write_loop(id: PeerId, stream: Arc<UnixStream>, outbox: Arc<Outbox>, cutter: Arc<Cutter>) {
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
