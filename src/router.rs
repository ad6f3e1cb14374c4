//! The routing core: the bus state and the path of every message.
//!
//! Each peer's reader task calls [`Bus::handle`] with a message whose sender
//! field it has already stamped. `handle` takes the state lock, decides every
//! recipient, pushes the message into their outboxes and returns; it never
//! awaits, so the lock is never held across an await and a slow peer can only
//! fill its own outbox. Because one lock orders all state changes, the
//! messages caused by one event (NameOwnerChanged, NameLost, NameAcquired,
//! replies) reach every queue in one consistent order.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use tracing::{debug, info, warn};
use zbus::message::{Flags, Message, Type};

use crate::activation::Waiter;
use crate::activation::definition::{Catalog, ServiceDirSpec};
use crate::config::Limits;
use crate::matching::{MatchIndex, MatchRule, MessageInfo, Owners};
use crate::names::{NameChange, Names};
use crate::peer::{Credentials, Cutter, Outbox, PeerId, PushError, parse_unique_name, unique_name};
use crate::supervision::{Service, SupervisorHandle};

pub const BUS_NAME: &str = "org.freedesktop.DBus";
pub const BUS_PATH: &str = "/org/freedesktop/DBus";

/// Error names the bus uses, without repeating the prefix everywhere.
pub mod err {
    pub const SERVICE_UNKNOWN: &str = "org.freedesktop.DBus.Error.ServiceUnknown";
    pub const NAME_HAS_NO_OWNER: &str = "org.freedesktop.DBus.Error.NameHasNoOwner";
    pub const NO_REPLY: &str = "org.freedesktop.DBus.Error.NoReply";
    pub const LIMITS_EXCEEDED: &str = "org.freedesktop.DBus.Error.LimitsExceeded";
    pub const INVALID_ARGS: &str = "org.freedesktop.DBus.Error.InvalidArgs";
    pub const UNKNOWN_METHOD: &str = "org.freedesktop.DBus.Error.UnknownMethod";
    pub const UNKNOWN_INTERFACE: &str = "org.freedesktop.DBus.Error.UnknownInterface";
    pub const UNKNOWN_PROPERTY: &str = "org.freedesktop.DBus.Error.UnknownProperty";
    pub const PROPERTY_READ_ONLY: &str = "org.freedesktop.DBus.Error.PropertyReadOnly";
    pub const ACCESS_DENIED: &str = "org.freedesktop.DBus.Error.AccessDenied";
    pub const MATCH_RULE_INVALID: &str = "org.freedesktop.DBus.Error.MatchRuleInvalid";
    pub const MATCH_RULE_NOT_FOUND: &str = "org.freedesktop.DBus.Error.MatchRuleNotFound";
    pub const NOT_SUPPORTED: &str = "org.freedesktop.DBus.Error.NotSupported";
    pub const FAILED: &str = "org.freedesktop.DBus.Error.Failed";
    pub const UNIX_PROCESS_ID_UNKNOWN: &str = "org.freedesktop.DBus.Error.UnixProcessIdUnknown";
    pub const ADT_AUDIT_DATA_UNKNOWN: &str = "org.freedesktop.DBus.Error.AdtAuditDataUnknown";
    pub const SELINUX_CONTEXT_UNKNOWN: &str =
        "org.freedesktop.DBus.Error.SELinuxSecurityContextUnknown";
}

/// What the reader should do after handing a message to the bus.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Continue,
    Disconnect(&'static str),
    /// Routed; the sender should wait for this recipient's queue to drain
    /// before sending more (it is reading, but slower than the sender).
    Wait(Arc<Outbox>),
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Outbox({} bytes)", self.queued_bytes())
    }
}

impl PartialEq for Outbox {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other)
    }
}

impl Eq for Outbox {}

pub struct PeerEntry {
    pub outbox: Arc<Outbox>,
    pub cutter: Arc<Cutter>,
    pub creds: Credentials,
    pub hello: bool,
    /// Some once the peer became a monitor: its rules (empty = everything).
    pub monitor: Option<Vec<MatchRule>>,
    /// Calls this peer made that still wait for a reply.
    pub pending_calls: usize,
    pub eavesdrop_rules: usize,
}

/// Everything the routing core owns, behind one lock.
pub struct State {
    pub peers: HashMap<PeerId, PeerEntry>,
    pub names: Names,
    pub matches: MatchIndex<PeerId>,
    /// Rules with eavesdrop=true, bus-wide: unicast fan-out is skipped when 0.
    pub eavesdrop_rules: usize,
    /// (caller, serial of its call) -> the peer that may reply.
    pub replies: HashMap<(PeerId, u32), PeerId>,
    pub monitors: Vec<PeerId>,
    pub activation_env: Vec<(String, String)>,
    pub limits: Limits,
    /// Activatable services, by name and id.
    pub catalog: Catalog,
    /// Where the catalog comes from, for reloads.
    pub service_dirs: (Vec<std::path::PathBuf>, Vec<ServiceDirSpec>),
    /// Runtime state of every service that has been started, by id.
    pub services: BTreeMap<String, Service>,
    /// Per bus name: what waits for it to be taken.
    pub pending: HashMap<String, Vec<Waiter>>,
    pub pending_count: usize,
    /// The connection of each running service, for activity and name loss.
    pub peer_service: HashMap<PeerId, String>,
    pub supervisor: Option<SupervisorHandle>,
    /// A recipient of the message being routed whose queue is filling
    /// while it reads: the sender waits for it (see `Verdict::Wait`).
    pub pressure: Option<Arc<Outbox>>,
    /// When the catalog was last read.
    pub scanned_at: std::time::SystemTime,
    /// Callers of ReloadConfig or Reload waiting for the next scan, whether
    /// a scan runs, and whether another was asked for since it started
    /// (see `driver::request_reload`).
    pub reload_waiters: Vec<(PeerId, Message)>,
    pub reloading: bool,
    pub reload_requested: bool,
    /// The serial of the last lifecycle event.
    pub event_serial: u64,
    /// Service properties as last announced with PropertiesChanged.
    pub announced: HashMap<String, Vec<(&'static str, zbus::wire::OwnedVariant)>>,
}

impl State {
    fn new(limits: Limits) -> Self {
        State {
            peers: HashMap::new(),
            names: Names::default(),
            matches: MatchIndex::default(),
            eavesdrop_rules: 0,
            replies: HashMap::new(),
            monitors: Vec::new(),
            activation_env: Vec::new(),
            limits,
            catalog: Catalog::default(),
            service_dirs: (Vec::new(), Vec::new()),
            services: BTreeMap::new(),
            pending: HashMap::new(),
            pending_count: 0,
            peer_service: HashMap::new(),
            supervisor: None,
            event_serial: 0,
            scanned_at: std::time::SystemTime::UNIX_EPOCH,
            reload_waiters: Vec::new(),
            reloading: false,
            reload_requested: false,
            pressure: None,
            announced: HashMap::new(),
        }
    }
}

/// The bus: fixed facts and the locked state.
pub struct Bus {
    state: Mutex<State>,
    pub guid: String,
    pub limits: Limits,
    pub uid: u32,
    pub pid: u32,
    pub machine_id: String,
    /// The address clients use, once listening.
    pub address: std::sync::OnceLock<String>,
    /// Group lists by (uid, primary gid), looked up once (a session bus sees one uid).
    groups: Mutex<HashMap<(u32, u32), Vec<u32>>>,
    /// The number of the next unique name; given out at Hello, from 0, as dbus-daemon does.
    next_unique: std::sync::atomic::AtomicU64,
}

/// Answers match rules' sender and destination keys against the registry.
struct NameView<'a> {
    names: &'a Names,
    /// None when the bus itself sent the message.
    sender: Option<PeerId>,
    /// The addressed recipient: Some(None) for the bus, None for no destination.
    dest: Option<Option<PeerId>>,
}

fn owns(names: &Names, peer: PeerId, name: &str) -> bool {
    if name.starts_with(':') {
        parse_unique_name(name) == Some(peer)
    } else {
        names.is_primary(name, peer)
    }
}

impl Owners for NameView<'_> {
    fn sender_is(&self, name: &str) -> bool {
        match self.sender {
            None => name == BUS_NAME || name == crate::lifecycle::NAME,
            Some(p) => owns(self.names, p, name),
        }
    }
    fn destination_is(&self, name: &str) -> bool {
        match self.dest {
            None => false,
            Some(None) => name == BUS_NAME || name == crate::lifecycle::NAME,
            Some(Some(p)) => owns(self.names, p, name),
        }
    }
}

/// Whether `msg` is a method call whose sender wants an answer (no
/// NO_REPLY_EXPECTED flag).
pub(crate) fn wants_reply(msg: &Message) -> bool {
    msg.message_type() == Type::MethodCall
        && !msg
            .primary_header()
            .flags()
            .contains(Flags::NO_REPLY_EXPECTED)
}

/// A method-return or error built by the bus in reply to `call`.
pub(crate) fn bus_reply<B>(call: &Message, body: &B) -> Option<Message>
where
    B: serde::Serialize + zbus::wire::DynamicType,
{
    Message::method_return(&call.header())
        .sender(BUS_NAME)
        .build(body)
        .map_err(|e| warn!("cannot build reply: {e}"))
        .ok()
}

pub(crate) fn bus_error(call: &Message, name: &str, text: &str) -> Option<Message> {
    Message::error(&call.header(), name)
        .sender(BUS_NAME)
        .build(&(text,))
        .map_err(|e| warn!("cannot build error {name}: {e}"))
        .ok()
}

fn bus_signal<B>(member: &str, dest: Option<&str>, body: &B) -> Option<Message>
where
    B: serde::Serialize + zbus::wire::DynamicType,
{
    let mut b = Message::signal(BUS_PATH, BUS_NAME, member).sender(BUS_NAME);
    if let Some(d) = dest {
        b = b.destination(d.to_owned());
    }
    b.build(body)
        .map_err(|e| warn!("cannot build signal {member}: {e}"))
        .ok()
}

const NO_FDS_TEXT: &str =
    "Tried to send message with Unix file descriptors to a client that doesn't support that.";

/// The smallest call from `caller` with `serial`: Message's reply builders
/// need a header to answer.
fn stand_in_call(caller: PeerId, serial: u32) -> Option<Message> {
    let serial = std::num::NonZeroU32::new(serial)?;
    Message::method_call("/", "x")
        .sender(unique_name(caller))
        .serial(serial)
        .build(&())
        .ok()
}

/// An error reply to a call that is not at hand, only its caller and serial.
fn detached_error(caller: PeerId, serial: u32, name: &str, text: &str) -> Option<Message> {
    bus_error(&stand_in_call(caller, serial)?, name, text)
}

impl Bus {
    pub fn new(guid: String, limits: Limits) -> Self {
        let machine_id = std::fs::read_to_string("/etc/machine-id")
            .or_else(|_| std::fs::read_to_string("/var/lib/dbus/machine-id"))
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| guid.clone());
        Bus {
            state: Mutex::new(State::new(limits)),
            guid,
            limits,
            uid: nix::unistd::getuid().as_raw(),
            pid: std::process::id(),
            machine_id,
            address: std::sync::OnceLock::new(),
            next_unique: std::sync::atomic::AtomicU64::new(0),
            groups: Mutex::new(HashMap::new()),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while routing must not take the bus down with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The sorted groups of a user, as GetConnectionCredentials reports them
    /// (the primary group and the user's supplementary groups).
    pub fn groups_of(&self, uid: u32, gid: u32) -> Vec<u32> {
        let mut cache = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .entry((uid, gid))
            .or_insert_with(|| {
                let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
                    .ok()
                    .flatten();
                let mut gids: Vec<u32> = user
                    .and_then(|u| {
                        let name = std::ffi::CString::new(u.name).ok()?;
                        nix::unistd::getgrouplist(&name, nix::unistd::Gid::from_raw(gid)).ok()
                    })
                    .map(|g| g.into_iter().map(|g| g.as_raw()).collect())
                    .unwrap_or_else(|| vec![gid]);
                gids.sort_unstable();
                gids.dedup();
                gids
            })
            .clone()
    }

    /// Register a connection that sent Hello; its id is its unique name's number.
    pub fn add_peer(&self, outbox: Arc<Outbox>, cutter: Arc<Cutter>, creds: Credentials) -> PeerId {
        let id = self
            .next_unique
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.lock().peers.insert(
            id,
            PeerEntry {
                outbox,
                cutter,
                creds,
                hello: false,
                monitor: None,
                pending_calls: 0,
                eavesdrop_rules: 0,
            },
        );
        id
    }

    pub fn peer_count(&self) -> usize {
        self.lock().peers.len()
    }

    /// Cut every connection (shutdown).
    pub fn cut_all(&self) {
        for p in self.lock().peers.values() {
            p.cutter.cut();
        }
    }

    /// Route one message from `from`; its sender field is already stamped.
    pub fn handle(self: &Arc<Self>, from: PeerId, msg: Message) -> Verdict {
        let mut st = self.lock();
        st.pressure = None;
        let Some(peer) = st.peers.get(&from) else {
            return Verdict::Disconnect("unknown peer");
        };
        if peer.monitor.is_some() {
            return Verdict::Disconnect("monitors may not send messages");
        }
        let hdr = msg.header();
        tracing::trace!(
            peer = %unique_name(from),
            kind = ?msg.message_type(),
            serial = msg.primary_header().serial_num().get(),
            reply_serial = ?hdr.reply_serial(),
            dest = ?hdr.destination().map(|d| d.as_str()),
            path = ?hdr.path().map(|p| p.as_str()),
            iface = ?hdr.interface().map(|i| i.as_str()),
            member = ?hdr.member().map(|m| m.as_str()),
            signature = crate::matching::body_signature(&msg),
            "message"
        );
        let to_bus = hdr.destination().map(|d| d.as_str()) == Some(BUS_NAME);
        if !peer.hello {
            let is_hello = to_bus
                && msg.message_type() == Type::MethodCall
                && hdr.member().map(|m| m.as_str()) == Some("Hello");
            if !is_hello {
                return Verdict::Disconnect("the first message must be Hello");
            }
        }
        if msg.data().len() as u64 > self.limits.max_message_size {
            return Verdict::Disconnect("message larger than max_message_size");
        }
        if msg.data().fds().len() as u64 > self.limits.max_message_unix_fds {
            return Verdict::Disconnect("message carries more fds than max_message_unix_fds");
        }
        st.capture(&msg, Some(from), if to_bus { Some(None) } else { None });
        match msg.message_type() {
            Type::MethodReturn | Type::Error => st.route_reply(from, &msg),
            _ => match hdr.destination() {
                None => st.broadcast(&msg, Some(from)),
                Some(_) if to_bus => {
                    st.eavesdrop(&msg, Some(from), Some(None));
                    return crate::driver::handle(self, &mut st, from, &msg);
                }
                Some(dest) if dest.as_str() == crate::lifecycle::NAME => {
                    st.eavesdrop(&msg, Some(from), Some(None));
                    return crate::control::handle(self, &mut st, from, &msg);
                }
                Some(dest) => {
                    let dest = dest.as_str().to_owned();
                    st.route_unicast(from, &msg, &dest);
                }
            },
        }
        match st.pressure.take() {
            Some(o) => Verdict::Wait(o),
            None => Verdict::Continue,
        }
    }

    /// A peer's connection ended: release its names, fail calls waiting on it.
    pub fn remove_peer(&self, id: PeerId) {
        let mut st = self.lock();
        let Some(peer) = st.peers.remove(&id) else {
            return;
        };
        peer.outbox.close();
        st.matches.remove_all(id);
        st.eavesdrop_rules -= peer.eavesdrop_rules;
        st.monitors.retain(|m| *m != id);
        st.peer_service.remove(&id);
        let changes = st.names.remove_peer(id);
        st.announce(changes);
        if peer.hello && peer.monitor.is_none() {
            let me = unique_name(id);
            st.announce_owner(&me, Some(&me), None);
        }
        // Calls to this peer will never be answered; calls from it need no answer.
        let mut orphaned = Vec::new();
        st.replies.retain(|&(caller, serial), replier| {
            if caller == id {
                return false;
            }
            if *replier == id {
                orphaned.push((caller, serial));
                return false;
            }
            true
        });
        for (caller, serial) in orphaned {
            if let Some(p) = st.peers.get_mut(&caller) {
                p.pending_calls = p.pending_calls.saturating_sub(1);
            }
            if let Some(e) = detached_error(
                caller,
                serial,
                err::NO_REPLY,
                "Message recipient disconnected from message bus without replying",
            ) {
                st.send_to(caller, e);
            }
        }
        let dropped = peer
            .outbox
            .dropped
            .load(std::sync::atomic::Ordering::Relaxed);
        info!(
            peer = %unique_name(id),
            pid = ?peer.creds.pid,
            dropped,
            "disconnected"
        );
    }
}

impl State {
    /// Send the outcome of a method the bus answers itself (driver, control
    /// API): the reply, or the error, unless the caller asked for none.
    pub fn answer(
        &mut self,
        from: PeerId,
        call: &Message,
        outcome: Result<Option<Message>, (&'static str, String)>,
    ) {
        if !wants_reply(call) {
            return;
        }
        match outcome {
            Ok(Some(reply)) => self.send_to(from, reply),
            Ok(None) => {}
            Err((name, text)) => {
                if let Some(e) = bus_error(call, name, &text) {
                    self.send_to(from, e);
                }
            }
        }
    }

    /// Queue a message the bus sends (reply, error or unicast signal) to one peer.
    pub fn send_to(&mut self, to: PeerId, msg: Message) {
        self.capture(&msg, None, Some(Some(to)));
        let is_reply = matches!(msg.message_type(), Type::MethodReturn | Type::Error);
        if self.push(to, msg) == Err(PushError::Full) && is_reply {
            // A peer that does not read its own replies cannot be served consistently.
            warn!(peer = %unique_name(to), "outbox full on a reply from the bus; disconnecting");
            if let Some(p) = self.peers.get(&to) {
                p.cutter.cut();
            }
        }
    }

    fn push(&mut self, to: PeerId, msg: Message) -> Result<(), PushError> {
        let Some(p) = self.peers.get(&to) else {
            return Err(PushError::Closed);
        };
        let pressured = p.outbox.push_counted(msg)?;
        if pressured && self.pressure.is_none() {
            self.pressure = Some(p.outbox.clone());
        }
        Ok(())
    }

    /// Copy a message to the monitors whose rules match it.
    fn capture(&self, msg: &Message, sender: Option<PeerId>, dest: Option<Option<PeerId>>) {
        if self.monitors.is_empty() {
            return;
        }
        let info = MessageInfo::new(msg);
        let view = NameView {
            names: &self.names,
            sender,
            dest,
        };
        for m in &self.monitors {
            let Some(p) = self.peers.get(m) else { continue };
            let rules = p.monitor.as_deref().unwrap_or(&[]);
            if rules.is_empty() || rules.iter().any(|r| r.matches(&info, &view)) {
                // A monitor that falls behind loses messages, counted; it never stalls the bus.
                let _ = p.outbox.push_counted(msg.clone());
            }
        }
    }

    /// Deliver to every connection with a matching rule.
    pub fn broadcast(&mut self, msg: &Message, sender: Option<PeerId>) {
        let info = MessageInfo::new(msg);
        let view = NameView {
            names: &self.names,
            sender,
            dest: None,
        };
        let peers = &self.peers;
        let pressure = &mut self.pressure;
        self.matches.for_each_match(
            &info,
            &view,
            |_, _| true,
            |k| {
                if let Some(p) = peers.get(&k) {
                    match p.outbox.push_counted(msg.clone()) {
                        Ok(true) if pressure.is_none() => *pressure = Some(p.outbox.clone()),
                        Ok(_) => {}
                        Err(e) => debug!(peer = %unique_name(k), "broadcast not queued: {e:?}"),
                    }
                }
            },
        );
        tracing::trace!(
            serial = msg.primary_header().serial_num().get(),
            "broadcast done"
        );
    }

    /// Deliver a unicast message to eavesdropping rules other than its recipient's.
    fn eavesdrop(&self, msg: &Message, sender: Option<PeerId>, dest: Option<Option<PeerId>>) {
        if self.eavesdrop_rules == 0 {
            return;
        }
        let info = MessageInfo::new(msg);
        let view = NameView {
            names: &self.names,
            sender,
            dest,
        };
        let recipient = dest.flatten();
        let peers = &self.peers;
        self.matches.for_each_match(
            &info,
            &view,
            |k, rule| rule.eavesdrop() && Some(k) != recipient,
            |k| {
                if let Some(p) = peers.get(&k) {
                    let _ = p.outbox.push(msg.clone());
                }
            },
        );
    }

    /// Resolve a destination name to a connected peer.
    fn resolve(&self, name: &str) -> Option<PeerId> {
        if name.starts_with(':') {
            parse_unique_name(name).filter(|id| self.peers.get(id).is_some_and(|p| p.hello))
        } else {
            self.names.owner(name)
        }
    }

    fn reply_error(&mut self, call: &Message, name: &str, text: &str) {
        if !wants_reply(call) {
            return;
        }
        let Some(to) = call.header().sender().and_then(|s| parse_unique_name(s)) else {
            return;
        };
        if let Some(e) = bus_error(call, name, text) {
            self.send_to(to, e);
        }
    }

    fn route_unicast(&mut self, from: PeerId, msg: &Message, dest: &str) {
        let no_auto_start = msg.primary_header().flags().contains(Flags::NO_AUTO_START);
        let to = match self.resolve(dest) {
            // A service stopping for idleness keeps its name until it exits:
            // hold its messages for the next instance instead of losing them.
            Some(to) if !dest.starts_with(':') && !no_auto_start && self.idle_stopping(to) => None,
            other => other,
        };
        let Some(to) = to else {
            if no_auto_start {
                self.reply_error(
                    msg,
                    err::NAME_HAS_NO_OWNER,
                    &format!("Name \"{dest}\" does not exist"),
                );
                return;
            }
            let waiter = Waiter::Message {
                msg: msg.clone(),
                from,
            };
            if let Err((name, text)) = self.activate(dest, waiter) {
                self.reply_error(msg, name, &text);
            }
            return;
        };
        self.deliver(from, msg, to, dest);
    }

    fn idle_stopping(&self, peer: PeerId) -> bool {
        self.peer_service
            .get(&peer)
            .and_then(|id| self.services.get(id))
            .is_some_and(|s| {
                s.state == crate::supervision::ServiceState::Stopping
                    && s.stop_reason == Some(crate::supervision::StopReason::Idle)
            })
    }

    fn touch(&mut self, peer: PeerId) {
        if let Some(id) = self.peer_service.get(&peer)
            && let Some(s) = self.services.get_mut(id)
        {
            s.last_activity = std::time::Instant::now();
        }
    }

    /// Deliver a unicast message to the connected peer `to`.
    fn deliver(&mut self, from: PeerId, msg: &Message, to: PeerId, dest: &str) {
        if !self.peer_service.is_empty() {
            self.touch(to);
            self.touch(from);
        }
        let tracked = wants_reply(msg);
        if tracked {
            let pending = self.peers.get(&from).map_or(0, |p| p.pending_calls);
            if pending as u64 >= self.limits.max_replies_per_connection {
                self.reply_error(
                    msg,
                    err::LIMITS_EXCEEDED,
                    "The maximum number of pending replies per connection has been reached",
                );
                return;
            }
        }
        match self.push(to, msg.clone()) {
            Ok(()) => {
                if tracked {
                    let serial = msg.primary_header().serial_num().get();
                    if self.replies.insert((from, serial), to).is_none()
                        && let Some(p) = self.peers.get_mut(&from)
                    {
                        p.pending_calls += 1;
                    }
                }
                self.eavesdrop(msg, Some(from), Some(Some(to)));
            }
            Err(PushError::Full) => {
                debug!(to = %unique_name(to), "outbox full, refusing message");
                self.reply_error(
                    msg,
                    err::LIMITS_EXCEEDED,
                    &format!("The message queue of {dest} is full: it is not reading its messages"),
                );
            }
            Err(PushError::Closed) => self.reply_error(
                msg,
                err::NO_REPLY,
                "Message recipient disconnected from message bus without replying",
            ),
            Err(PushError::NoFds) => self.reply_error(msg, err::NOT_SUPPORTED, NO_FDS_TEXT),
        }
    }

    fn route_reply(&mut self, from: PeerId, msg: &Message) {
        let hdr = msg.header();
        let (Some(dest), Some(serial)) = (hdr.destination(), hdr.reply_serial()) else {
            debug!("reply without destination or reply serial dropped");
            return;
        };
        let Some(to) = self.resolve(dest.as_str()) else {
            return;
        };
        match self.replies.get(&(to, serial.get())) {
            Some(&replier) if replier == from => {
                self.replies.remove(&(to, serial.get()));
                if let Some(p) = self.peers.get_mut(&to) {
                    p.pending_calls = p.pending_calls.saturating_sub(1);
                }
                match self.push(to, msg.clone()) {
                    // The caller does not read even its own replies: it cannot be
                    // served consistently any more.
                    Err(PushError::Full) => {
                        warn!(peer = %unique_name(to), "outbox full on a reply; disconnecting");
                        if let Some(p) = self.peers.get(&to) {
                            p.cutter.cut();
                        }
                    }
                    // A reply with fds for a caller that cannot take them:
                    // the caller gets an error instead of waiting forever.
                    Err(PushError::NoFds) => {
                        if let Some(e) =
                            detached_error(to, serial.get(), err::NOT_SUPPORTED, NO_FDS_TEXT)
                        {
                            self.send_to(to, e);
                        }
                    }
                    _ => {}
                }
                self.eavesdrop(msg, Some(from), Some(Some(to)));
            }
            _ => debug!(from = %unique_name(from), "unrequested reply dropped"),
        }
    }

    /// True when no rule or monitor could want a signal: skip building it.
    pub fn matches_nothing_from_bus(&self) -> bool {
        self.matches.is_empty() && self.monitors.is_empty()
    }

    /// Broadcast a signal the bus itself emits.
    pub fn broadcast_from_bus(&mut self, sig: &Message) {
        self.capture(sig, None, None);
        self.broadcast(sig, None);
    }

    /// Broadcast NameOwnerChanged.
    pub fn announce_owner(&mut self, name: &str, old: Option<&str>, new: Option<&str>) {
        // Every connect and disconnect announces its unique name, which
        // hardly anyone watches: build the signal only for a possible taker.
        if self.monitors.is_empty()
            && !self
                .matches
                .may_match("NameOwnerChanged", BUS_NAME, BUS_NAME, name)
        {
            return;
        }
        if let Some(sig) = bus_signal(
            "NameOwnerChanged",
            None,
            &(name, old.unwrap_or(""), new.unwrap_or("")),
        ) {
            self.capture(&sig, None, None);
            self.broadcast(&sig, None);
        }
    }

    /// Turn registry changes into the bus's signals, in order; complete
    /// pending activations of names that were taken.
    pub fn announce(&mut self, changes: Vec<NameChange>) {
        let mut held: Vec<(PeerId, String, Vec<Waiter>)> = Vec::new();
        for c in changes {
            match c {
                NameChange::OwnerChanged { name, old, new } => {
                    let old_name = old.map(unique_name);
                    let new_name = new.map(unique_name);
                    self.announce_owner(&name, old_name.as_deref(), new_name.as_deref());
                    match (old, new) {
                        (_, Some(owner)) => {
                            let queued = self.name_taken(&name, owner);
                            if !queued.is_empty() {
                                held.push((owner, name, queued));
                            }
                        }
                        (Some(old), None) => self.name_released(&name, old),
                        (None, None) => {}
                    }
                }
                NameChange::Lost { peer, name } => self.name_signal("NameLost", peer, &name),
                NameChange::Acquired { peer, name } => {
                    self.name_signal("NameAcquired", peer, &name);
                    if let Some(i) = held.iter().position(|(p, n, _)| *p == peer && *n == name) {
                        let (_, name, queued) = held.swap_remove(i);
                        for w in queued {
                            if let Waiter::Message { msg, from } = w
                                && self.peers.contains_key(&from)
                            {
                                self.deliver(from, &msg, peer, &name);
                            }
                        }
                    }
                }
            }
        }
    }

    pub fn name_signal(&mut self, member: &str, peer: PeerId, name: &str) {
        let dest = unique_name(peer);
        if let Some(sig) = bus_signal(member, Some(&dest), &(name,)) {
            self.send_to(peer, sig);
        }
    }
}
