//! The bus core's state, and what the supervisor may ask of it.
//!
//! Fields are private to the core (`bus/`); the `pub(crate)` methods here
//! are the calls that cross the boundary from the supervisor's side.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tracing::info;

use super::names::Names;
use super::outbox::{Cutter, Incoming, Outbox};
use super::peer::{IdMap, Identity, PeerEntry, PeerId, unique_name};
use super::pending::Pending;
use super::reply::ReplyRegistry;
use super::{Activator, Answer, CallRef};
use crate::bus::matching::{MatchIndex, MatchRule};
use crate::config::Limits;
use crate::wire::{self, BusError, ErrorName, Message};

/// Everything the bus core owns, behind the one lock.
pub(crate) struct BusState {
    pub(super) peers: IdMap<PeerEntry>,
    pub(super) names: Names,
    pub(super) matches: MatchIndex<PeerId>,
    /// Rules with eavesdrop=true, bus-wide: unicast fan-out is skipped when 0.
    pub(super) eavesdrop_rules: usize,
    pub(super) replies: ReplyRegistry,
    /// Woken when a call's deadline becomes the earliest (see `expire_replies`).
    pub(super) reply_timer: Arc<tokio::sync::Notify>,
    pub(super) monitors: Vec<PeerId>,
    pub(super) pending: Pending,
    pub(super) enforcer: super::policy::Enforcer,
    /// Connections that completed Hello: in all, and by uid.
    pub(super) completed: usize,
    pub(super) completed_by_uid: HashMap<u32, usize>,
    /// Debug.Stats' serial, one per answer.
    pub(super) stats_serial: u32,
    pub(super) limits: Limits,
    /// The name the activator answers as the bus (the control API).
    pub(super) own_name: &'static str,
    /// A recipient of the message being routed whose queue is filling
    /// while it reads: the sender waits for it (see `Verdict::Wait`).
    pub(super) pressure: Option<Arc<Outbox>>,
    /// The sender of the message being routed, and where that message's
    /// bytes are: its copies queued for others count against the sender's
    /// max_incoming_bytes (see `charge_of`).
    pub(super) charge: Option<(Arc<Incoming>, usize)>,
    /// The message being routed and the monitors that take it, held until
    /// the bus sends something on its behalf or is done with it, so that what
    /// the bus sends `apart` reaches monitors first (see `capture`).
    pub(super) held_capture: Option<(Message, Vec<PeerId>)>,
    /// Inside `apart`: captures leave `held_capture` held.
    pub(super) apart: bool,
}

impl BusState {
    pub(super) fn new(
        limits: Limits,
        own_name: &'static str,
        policy: crate::policy::Policy,
    ) -> Self {
        let timeout = (limits.reply_timeout_ms != crate::config::REPLY_TIMEOUT_NEVER)
            .then(|| Duration::from_millis(limits.reply_timeout_ms));
        BusState {
            peers: IdMap::default(),
            names: Names::default(),
            matches: MatchIndex::default(),
            eavesdrop_rules: 0,
            replies: ReplyRegistry::new(timeout),
            reply_timer: Arc::new(tokio::sync::Notify::new()),
            monitors: Vec::new(),
            pending: Pending::default(),
            enforcer: super::policy::Enforcer::new(policy),
            completed: 0,
            completed_by_uid: HashMap::new(),
            stats_serial: 0,
            limits,
            own_name,
            pressure: None,
            charge: None,
            held_capture: None,
            apart: false,
        }
    }

    pub(super) fn add_peer(
        &mut self,
        id: PeerId,
        outbox: Arc<Outbox>,
        cutter: Arc<Cutter>,
        who: Identity,
    ) {
        self.peers.insert(id, PeerEntry::new(outbox, cutter, who));
    }

    pub(super) fn peer_count(&self) -> usize {
        self.peers.len()
    }

    pub(super) fn cut_all(&self) {
        for p in self.peers.values() {
            p.cutter.cut();
        }
    }

    /// Names the bus itself owns.
    pub(super) fn is_bus_owned(&self, name: &str) -> bool {
        name == wire::names::BUS_NAME || name == self.own_name
    }

    /// The one way out for a peer: it leaves the bus, or (with `monitor`)
    /// stays only as a monitor with those rules. Either way its rules and
    /// names go, with dbus-daemon's signals, and every caller waiting for
    /// its reply gets NoReply.
    pub(super) fn goodbye(
        &mut self,
        id: PeerId,
        monitor: Option<Vec<MatchRule>>,
        sup: &mut dyn Activator,
    ) {
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        let addressable = peer.is_addressable();
        self.eavesdrop_rules -= std::mem::take(&mut peer.eavesdrop_rules);
        let me = unique_name(id);
        if monitor.is_some() {
            // Its names go first, announced while its rules still stand (as
            // dbus-daemon does).
            let changes = self.names.remove_peer(id);
            self.announce(changes, sup);
            self.matches.remove_all(id);
        } else {
            let peer = self.peers.remove(&id).expect("looked up above");
            // Room left by a crowd that came and went is given back.
            if self.peers.capacity() > 64 && self.peers.len() < self.peers.capacity() / 4 {
                self.peers.shrink_to_fit();
            }
            peer.outbox.close();
            if peer.hello {
                self.uncount_completed(peer.creds.uid);
            }
            self.release_policy(peer.policy.clone());
            self.monitors.retain(|m| *m != id);
            self.pending.hold(id, false);
            self.matches.remove_all(id);
            let changes = self.names.remove_peer(id);
            self.announce(changes, sup);
            let dropped = peer
                .outbox
                .dropped
                .load(std::sync::atomic::Ordering::Relaxed);
            info!(peer = %me, pid = ?peer.creds.pid, dropped, "disconnected");
        }
        if addressable {
            self.announce_owner(&me, Some(&me), None);
        }
        if let Some(rules) = monitor {
            self.name_signal("NameLost", id, &me);
            if let Some(p) = self.peers.get_mut(&id) {
                p.monitor = Some(rules);
            }
            self.monitors.push(id);
        }
        // Calls to this peer will never be answered; calls from it need no answer.
        let text = "Message recipient disconnected from message bus without replying";
        for (caller, serial) in self.replies.remove_peer(id).0 {
            let e = BusError::new(ErrorName::NoReply, text);
            if let Some(e) = wire::detached_error(&unique_name(caller), serial, &e) {
                self.send_to(caller, e);
            }
        }
    }

    /// Answer the calls whose reply did not come within `reply_timeout`
    /// with NoReply, as dbus-daemon does.
    pub(super) fn expire_replies(&mut self, now: std::time::Instant) {
        let text = "Message did not receive a reply (timeout by message bus)";
        for (caller, serial) in self.replies.expire(now) {
            let e = BusError::new(ErrorName::NoReply, text);
            if let Some(e) = wire::detached_error(&unique_name(caller), serial, &e) {
                self.send_to(caller, e);
            }
        }
    }

    /// Whether one more connection may complete its Hello: dbus-daemon's
    /// `max_completed_connections` and `max_connections_per_user`, with its
    /// texts.
    pub(super) fn check_completion(&self, uid: Option<u32>) -> Result<(), BusError> {
        let limits = &self.limits;
        let (text, name, limit) = if self.completed as u64 >= limits.max_completed_connections {
            let text = "The maximum number of active connections has been reached".to_owned();
            (
                text,
                "max_completed_connections",
                limits.max_completed_connections,
            )
        } else if let Some(uid) = uid
            && self.completed_by_uid.get(&uid).copied().unwrap_or(0) as u64
                >= limits.max_connections_per_user
        {
            let text =
                format!("The maximum number of active connections for UID {uid} has been reached");
            (
                text,
                "max_connections_per_user",
                limits.max_connections_per_user,
            )
        } else {
            return Ok(());
        };
        tracing::warn!("{text} ({name}={limit})");
        Err(BusError::new(ErrorName::LimitsExceeded, text))
    }

    pub(super) fn count_completed(&mut self, uid: Option<u32>) {
        self.completed += 1;
        if let Some(uid) = uid {
            *self.completed_by_uid.entry(uid).or_default() += 1;
        }
    }

    fn uncount_completed(&mut self, uid: Option<u32>) {
        self.completed -= 1;
        if let Some(uid) = uid
            && let Some(n) = self.completed_by_uid.get_mut(&uid)
        {
            *n -= 1;
            if *n == 0 {
                self.completed_by_uid.remove(&uid);
            }
        }
    }

    // What the supervisor asks of the bus.

    /// Broadcast a signal the bus emits (lifecycle events among them).
    pub(crate) fn emit(&mut self, sig: &Message) {
        self.capture(sig, None, None);
        self.broadcast(sig, None);
    }

    /// Broadcast one of busvisor's own events (the supervisor's lifecycle
    /// signals): only monitors that ask for it with a rule see it.
    pub(crate) fn emit_event(&mut self, sig: &Message) {
        self.capture_own(sig);
        self.broadcast(sig, None);
    }

    /// `emit_event` for a signal that may be lost (a service's output): a
    /// recipient whose queue holds `cap` bytes or more does not get it (it
    /// is counted as dropped), and nobody is asked to wait for it.
    pub(crate) fn emit_lossy(&mut self, sig: &Message, cap: usize) {
        self.capture_own(sig);
        self.broadcast_capped(sig, None, Some(cap));
    }

    /// Whether any rule or monitor could take a signal: when not, skip
    /// building it.
    pub(crate) fn wants_signals(&self) -> bool {
        !self.matches.is_empty() || !self.monitors.is_empty()
    }

    /// Answer a call the bus took earlier (its caller may have asked for no reply).
    pub(crate) fn answer(&mut self, call: &CallRef, outcome: Answer) {
        if !wire::wants_reply(&call.call) {
            return;
        }
        let msg = match outcome {
            Ok(Some(reply)) => reply,
            Ok(None) => return,
            Err(e) => match wire::error(&call.call, &e) {
                Some(m) => m,
                None => return,
            },
        };
        self.send_to(call.from, msg);
    }

    /// Answer a call the bus took earlier with an empty reply or an error.
    pub(crate) fn complete(&mut self, call: &CallRef, outcome: Result<(), BusError>) {
        let answer = outcome.map(|()| wire::reply(&call.call, &()));
        self.answer(call, answer);
    }

    /// The unique name of the owner of `name`, if any.
    pub(crate) fn owner_name(&self, name: &str) -> Option<String> {
        self.resolve(name).map(unique_name)
    }

    /// Send a message of the bus to the owner of `name`, or keep it for the
    /// name's next owner (monitors see it now, as dbus-daemon captures it).
    pub(crate) fn send_from_bus_to_name(&mut self, name: &str, msg: Message) {
        match self.resolve(name) {
            Some(owner) => self.send_to(owner, msg),
            None => {
                self.capture(&msg, None, None);
                self.pending
                    .push(name, super::pending::Waiter::FromBus(msg));
            }
        }
    }

    /// Answer everything that waits for any of `names` with `e`, as
    /// dbus-daemon fails a pending activation: every waiter still connected
    /// gets the error, even for a signal or a call that wanted no reply, in
    /// a step of its own.
    pub(crate) fn fail_pending(&mut self, names: &[String], e: &BusError) {
        self.apart(|core| {
            for n in names {
                for w in core.pending.take(n) {
                    if let Some(to) = w.from()
                        && core.peers.contains_key(&to)
                        && let Some(m) = wire::error(w.call(), e)
                    {
                        core.send_to(to, m);
                    }
                }
            }
        });
    }

    /// Run `f` as a step of its own, as dbus-daemon runs a transaction of
    /// its own while it routes a message (an ActivationRequest, the errors
    /// of a failed activation): monitors see what `f` sends before the
    /// message being routed.
    pub(crate) fn apart<R>(&mut self, f: impl FnOnce(&mut BusState) -> R) -> R {
        let was = std::mem::replace(&mut self.apart, true);
        let r = f(self);
        self.apart = was;
        r
    }

    pub(crate) fn has_pending(&self, names: &[String]) -> bool {
        self.pending.has_any(names)
    }

    /// Queue messages addressed by name to `peer` instead of delivering
    /// them (its service is stopping for idleness), or stop doing so.
    pub(crate) fn hold(&mut self, peer: PeerId, on: bool) {
        self.pending.hold(peer, on);
    }

    pub(crate) fn is_connected(&self, peer: PeerId) -> bool {
        self.peers.contains_key(&peer)
    }

    pub(crate) fn peer_pid(&self, peer: PeerId) -> Option<u32> {
        self.peers.get(&peer).and_then(|p| p.creds.pid)
    }

    /// Keep track of when `peer` last sent or received a message.
    pub(crate) fn watch(&mut self, peer: PeerId) {
        if let Some(p) = self.peers.get_mut(&peer) {
            p.watched = true;
            p.touch();
        }
    }

    /// How long since a watched peer last sent or received a message.
    pub(crate) fn idle_for(&self, peer: PeerId) -> Option<Duration> {
        self.peers
            .get(&peer)
            .filter(|p| p.watched)
            .map(|p| p.last_activity.elapsed())
    }

    pub(crate) fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Calls waiting for `peer` to answer.
    pub(crate) fn calls_pending_to(&self, peer: PeerId) -> usize {
        self.replies.owed_count(peer)
    }
}
