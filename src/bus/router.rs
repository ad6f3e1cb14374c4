//! The path of every message: unicast, broadcast, eavesdropping, monitors,
//! expected replies, and the signals the bus sends about names.

use tracing::{debug, warn};

use super::names::NameChange;
use super::outbox::{Incoming, PushError};
use super::peer::{PeerId, parse_unique_name, unique_name};
use super::pending::Waiter;
use super::{Activator, Facts, Requester, Verdict, driver};
use crate::bus::matching::{MessageInfo, Owners, body_signature};
use crate::wire::{self, BusError, ErrorName, Flags, Message, Type, names};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::BusState;

/// Answers match rules' sender and destination keys against the registry.
struct NameView<'a> {
    st: &'a BusState,
    /// None when the bus itself sent the message.
    sender: Option<PeerId>,
    /// The addressed recipient: Some(None) for the bus, None for no destination.
    dest: Option<Option<PeerId>>,
}

impl NameView<'_> {
    fn is(&self, who: Option<PeerId>, name: &str) -> bool {
        match who {
            None => self.st.is_bus_owned(name),
            Some(p) if name.starts_with(':') => parse_unique_name(name) == Some(p),
            Some(p) => self.st.names.is_primary(name, p),
        }
    }
}

impl Owners for NameView<'_> {
    fn sender_is(&self, name: &str) -> bool {
        self.is(self.sender, name)
    }
    fn destination_is(&self, name: &str) -> bool {
        self.dest.is_some_and(|d| self.is(d, name))
    }
}

const NO_FDS_TEXT: &str =
    "Tried to send message with Unix file descriptors to a client that doesn't support that.";
const NO_REPLY_TEXT: &str = "Message recipient disconnected from message bus without replying";

impl BusState {
    fn view(&self, sender: Option<PeerId>, dest: Option<Option<PeerId>>) -> NameView<'_> {
        NameView {
            st: self,
            sender,
            dest,
        }
    }

    /// Route one message from `from`; its sender field is already stamped.
    pub(super) fn handle(
        &mut self,
        facts: &Facts,
        sup: &mut dyn Activator,
        from: PeerId,
        msg: Message,
    ) -> Verdict {
        self.pressure = None;
        // Left set only by a panic while routing an earlier message.
        self.apart = false;
        self.held_capture = None;
        let Some(peer) = self.peers.get_mut(&from) else {
            return Verdict::Disconnect("unknown peer");
        };
        if peer.monitor.is_some() {
            return Verdict::Disconnect("monitors may not send messages");
        }
        peer.touch();
        self.charge = Some((
            peer.outbox.incoming.clone(),
            msg.data().bytes().as_ptr() as usize,
        ));
        let hdr = msg.header();
        if is_local(&hdr) {
            return Verdict::Disconnect("message on the reserved local path or interface");
        }
        trace_message(from, &msg, &hdr);
        let dest = hdr.destination().map(|d| d.as_str());
        let to_bus = dest == Some(names::BUS_NAME);
        if !peer.hello && (!to_bus || !driver::is_hello(&msg)) {
            return Verdict::Disconnect("the first message must be Hello");
        }
        if msg.data().len() as u64 > self.limits.max_message_size {
            return Verdict::Disconnect("message larger than max_message_size");
        }
        if msg.data().fds().len() as u64 > self.limits.max_message_unix_fds {
            return Verdict::Disconnect("message carries more fds than max_message_unix_fds");
        }
        self.hold_capture(&msg, from, dest, to_bus);
        match (msg.message_type(), dest) {
            (Type::MethodReturn | Type::Error, _) => self.route_reply(from, &msg),
            (_, None) => self.broadcast(&msg, Some(from)),
            (_, Some(d)) if to_bus || d == self.own_name => {
                self.eavesdrop(&msg, Some(from), Some(None));
                // Before Hello a peer has no policy: its Hello is not checked.
                if let Err(e) = self.check_to_bus(from, &msg) {
                    self.deny(from, &msg, &e);
                } else if to_bus {
                    driver::handle(facts, self, sup, from, &msg);
                } else if msg.message_type() == Type::MethodCall {
                    let call = super::CallRef {
                        from,
                        call: msg.clone(),
                    };
                    let answer = sup.call(&call, facts, self);
                    self.answer(&call, answer);
                }
            }
            (_, Some(d)) => {
                let d = d.to_owned();
                self.route_unicast(sup, from, &msg, &d);
            }
        }
        self.release_capture();
        self.charge = None;
        match self.pressure.take() {
            Some(o) => Verdict::Wait(o),
            None => Verdict::Continue,
        }
    }

    /// Find the monitors that take the message being routed; the copies go
    /// out with the first message the bus sends on its behalf (see `capture`).
    fn hold_capture(&mut self, msg: &Message, from: PeerId, dest: Option<&str>, to_bus: bool) {
        if self.monitors.is_empty() {
            return;
        }
        // Monitors' rules see the addressed recipient (a `destination=` rule
        // matches its unique name and the names it owns), and are matched
        // now, before routing changes any name.
        let recipient = match dest {
            _ if to_bus => Some(None),
            Some(d) => self.resolve(d).map(Some),
            None => None,
        };
        let takers = self.capturers(msg, Some(from), recipient, true);
        if !takers.is_empty() {
            self.held_capture = Some((msg.clone(), takers));
        }
    }

    /// Answer a message the policy refused with its AccessDenied, whatever
    /// its type and flags, as dbus-daemon does.
    pub(super) fn deny(&mut self, from: PeerId, msg: &Message, e: &BusError) {
        if let Some(m) = wire::error(msg, e) {
            self.send_to(from, m);
        }
    }

    /// Queue a message the bus sends (reply, error or unicast signal) to one
    /// peer, unless its receive policy refuses it (silently, as dbus-daemon).
    pub(super) fn send_to(&mut self, to: PeerId, msg: Message) {
        self.capture(&msg, None, Some(Some(to)));
        self.send_captured(to, msg);
    }

    /// `send_to` for a message monitors saw already, when it was queued for
    /// a name's next owner (dbus-daemon captures it once).
    fn send_captured(&mut self, to: PeerId, msg: Message) {
        if let Err(e) = self.check_delivery(None, to, &msg, true, false) {
            // Eaten, but monitors see the error it would have been
            // (dbus-daemon's capture_error_reply; dbus#457).
            if let Some(m) = wire::error(&msg, &e) {
                self.capture(&m, None, Some(None));
            }
            return;
        }
        let is_reply = matches!(msg.message_type(), Type::MethodReturn | Type::Error);
        if self.push(to, msg) == Err(PushError::Full) && is_reply {
            self.cut_for_unread_reply(to);
        }
    }

    /// A peer that does not read even its own replies cannot be served
    /// consistently any more.
    fn cut_for_unread_reply(&self, to: PeerId) {
        warn!(peer = %unique_name(to), "outbox full on a reply; disconnecting");
        if let Some(p) = self.peers.get(&to) {
            p.cutter.cut();
        }
    }

    fn push(&mut self, to: PeerId, msg: Message) -> Result<(), PushError> {
        let Some(p) = self.peers.get_mut(&to) else {
            return Err(PushError::Closed);
        };
        p.touch();
        let charge = charge_of(&self.charge, &msg);
        let pressured = p.outbox.push_counted(msg, charge)?;
        if pressured && self.pressure.is_none() {
            self.pressure = Some(p.outbox.clone());
        }
        Ok(())
    }

    /// Copy a message to the monitors whose rules match it. As in
    /// dbus-daemon, where a message and what the bus sends on its behalf go
    /// out together at the end of its transaction: the message being routed
    /// goes first, unless this is sent `apart` (a transaction of its own,
    /// which dbus-daemon completes before the one it runs inside).
    pub(super) fn capture(
        &mut self,
        msg: &Message,
        sender: Option<PeerId>,
        dest: Option<Option<PeerId>>,
    ) {
        if self.monitors.is_empty() {
            return;
        }
        if !self.apart {
            self.release_capture();
        }
        let takers = self.capturers(msg, sender, dest, true);
        self.push_to_monitors(msg, &takers);
    }

    /// Copy one of busvisor's own signals (the supervisor's events) to the
    /// monitors with a rule that selects it. A monitor that asked for
    /// everything sees what dbus-daemon would send, and dbus-daemon sends
    /// none of these.
    pub(super) fn capture_own(&mut self, msg: &Message) {
        if self.monitors.is_empty() {
            return;
        }
        if !self.apart {
            self.release_capture();
        }
        let takers = self.capturers(msg, None, None, false);
        self.push_to_monitors(msg, &takers);
    }

    /// Capture the message being routed, if it is still held.
    fn release_capture(&mut self) {
        if let Some((msg, takers)) = self.held_capture.take() {
            self.push_to_monitors(&msg, &takers);
        }
    }

    /// The monitors whose rules match a message; without `catch_all`, only
    /// by a rule that selects something (not `''`, not an empty list).
    fn capturers(
        &self,
        msg: &Message,
        sender: Option<PeerId>,
        dest: Option<Option<PeerId>>,
        catch_all: bool,
    ) -> Vec<PeerId> {
        let info = MessageInfo::new(msg);
        let view = self.view(sender, dest);
        self.monitors
            .iter()
            .copied()
            .filter(|m| {
                self.peers.get(m).is_some_and(|p| {
                    let rules = p.monitor.as_deref().unwrap_or(&[]);
                    (catch_all && rules.is_empty())
                        || rules
                            .iter()
                            .any(|r| (catch_all || !r.is_wildcard()) && r.matches(&info, &view))
                })
            })
            .collect()
    }

    fn push_to_monitors(&self, msg: &Message, monitors: &[PeerId]) {
        for m in monitors {
            if let Some(p) = self.peers.get(m) {
                // A monitor that falls behind loses messages, counted; it never stalls the bus.
                let _ = p
                    .outbox
                    .push_counted(msg.clone(), charge_of(&self.charge, msg));
            }
        }
    }

    /// Deliver to every connection with a matching rule.
    pub(super) fn broadcast(&mut self, msg: &Message, sender: Option<PeerId>) {
        self.broadcast_capped(msg, sender, None);
    }

    /// `broadcast`; with `cap`, recipients with that many bytes queued are
    /// skipped and no sender waits for any (see `emit_lossy`).
    pub(super) fn broadcast_capped(
        &mut self,
        msg: &Message,
        sender: Option<PeerId>,
        cap: Option<usize>,
    ) {
        let info = MessageInfo::new(msg);
        let view = NameView {
            st: self,
            sender,
            dest: None,
        };
        let mut pressure = None;
        let mut refused = None;
        self.matches.for_each_match(
            &info,
            &view,
            |_, _| true,
            |k| {
                if let Err(e) = self.check_delivery(sender, k, msg, false, false) {
                    refused.get_or_insert(e);
                    return;
                }
                if let Some(p) = self.peers.get(&k) {
                    if cap.is_some_and(|c| p.outbox.queued_bytes() >= c) {
                        p.outbox.dropped.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    match p
                        .outbox
                        .push_counted(msg.clone(), charge_of(&self.charge, msg))
                    {
                        Ok(true) if pressure.is_none() && cap.is_none() => {
                            pressure = Some(p.outbox.clone())
                        }
                        Ok(_) => {}
                        Err(e) => debug!(peer = %unique_name(k), "broadcast not queued: {e:?}"),
                    }
                }
            },
        );
        if self.pressure.is_none() {
            self.pressure = pressure;
        }
        // A refused broadcast is silent for its sender; monitors see the
        // AccessDenied it would have had (dbus-daemon's capture_error_reply).
        if let (Some(e), Some(from)) = (refused, sender)
            && let Some(m) = wire::error(msg, &e)
        {
            self.capture(&m, None, Some(Some(from)));
        }
    }

    /// Deliver a unicast message to eavesdropping rules other than its recipient's.
    fn eavesdrop(&self, msg: &Message, sender: Option<PeerId>, dest: Option<Option<PeerId>>) {
        if self.eavesdrop_rules == 0 {
            return;
        }
        let info = MessageInfo::new(msg);
        let view = self.view(sender, dest);
        let recipient = dest.flatten();
        self.matches.for_each_match(
            &info,
            &view,
            |k, rule| rule.eavesdrop() && Some(k) != recipient,
            |k| {
                if self.check_delivery(sender, k, msg, false, true).is_err() {
                    return;
                }
                if let Some(p) = self.peers.get(&k) {
                    let _ = p
                        .outbox
                        .push_charged(msg.clone(), charge_of(&self.charge, msg));
                }
            },
        );
    }

    /// The connected, addressable peer a destination name stands for.
    pub(super) fn resolve(&self, name: &str) -> Option<PeerId> {
        if name.starts_with(':') {
            parse_unique_name(name)
                .filter(|id| self.peers.get(id).is_some_and(|p| p.is_addressable()))
        } else {
            self.names.owner(name)
        }
    }

    fn reply_error(&mut self, call: &Message, e: BusError) {
        if !wire::wants_reply(call) {
            return;
        }
        let Some(to) = call.header().sender().and_then(|s| parse_unique_name(s)) else {
            return;
        };
        if let Some(m) = wire::error(call, &e) {
            self.send_to(to, m);
        }
    }

    fn route_unicast(&mut self, sup: &mut dyn Activator, from: PeerId, msg: &Message, dest: &str) {
        let no_auto_start = msg.primary_header().flags().contains(Flags::NO_AUTO_START);
        let to = match self.resolve(dest) {
            // An owner going away for idleness keeps its name until it exits:
            // its messages wait for the next instance instead of being lost.
            Some(to) if !dest.starts_with(':') && !no_auto_start && self.pending.is_held(to) => {
                None
            }
            other => other,
        };
        match to {
            Some(to) => self.deliver(from, msg, to, dest),
            None if no_auto_start => {
                let text = format!("Name \"{dest}\" does not exist");
                self.reply_error(msg, BusError::new(ErrorName::NameHasNoOwner, text));
            }
            None => {
                // Checked before a start, with the destination as written.
                if sup.provides(dest)
                    && let Err(e) = self.check_activation(from, msg)
                {
                    return self.deny(from, msg, &e);
                }
                let waiter = Waiter::Message {
                    msg: msg.clone(),
                    from,
                };
                if let Err(e) = self.activate(sup, dest, waiter) {
                    self.reply_error(msg, e);
                }
            }
        }
    }

    /// Queue `waiter` until `name` is taken; the activator starts what
    /// provides it.
    pub(super) fn activate(
        &mut self,
        sup: &mut dyn Activator,
        name: &str,
        waiter: Waiter,
    ) -> Result<(), BusError> {
        let max = self.limits.max_pending_service_starts;
        if self.pending.count() as u64 >= max {
            return Err(BusError::new(
                ErrorName::LimitsExceeded,
                format!(
                    "The maximum number of pending activations has been reached, activation of {name} failed (max_pending_service_starts={max})"
                ),
            ));
        }
        let from = waiter.from();
        let requester = Requester {
            name: from.map(unique_name).unwrap_or_default(),
            pid: from.and_then(|p| self.peer_pid(p)),
        };
        sup.start(name, requester, self)?;
        self.pending.push(name, waiter);
        Ok(())
    }

    /// Deliver a unicast message to the connected peer `to`.
    fn deliver(&mut self, from: PeerId, msg: &Message, to: PeerId, dest: &str) {
        if let Err(e) = self.check_delivery(Some(from), to, msg, false, false) {
            return self.deny(from, msg, &e);
        }
        let tracked = wire::wants_reply(msg);
        if tracked
            && self.replies.waiting_count(from) as u64 >= self.limits.max_replies_per_connection
        {
            let text = "The maximum number of pending replies per connection has been reached";
            self.reply_error(msg, BusError::new(ErrorName::LimitsExceeded, text));
            return;
        }
        match self.push(to, msg.clone()) {
            Ok(()) => {
                if tracked {
                    let serial = msg.primary_header().serial_num().get();
                    if self.replies.expect(from, serial, to) {
                        self.reply_timer.notify_one();
                    }
                }
                self.eavesdrop(msg, Some(from), Some(Some(to)));
            }
            Err(PushError::Full) => {
                debug!(to = %unique_name(to), "outbox full, refusing message");
                let text =
                    format!("The message queue of {dest} is full: it is not reading its messages");
                self.reply_error(msg, BusError::new(ErrorName::LimitsExceeded, text));
            }
            Err(PushError::Closed) => {
                self.reply_error(msg, BusError::new(ErrorName::NoReply, NO_REPLY_TEXT));
            }
            Err(PushError::NoFds) => {
                self.reply_error(msg, BusError::new(ErrorName::NotSupported, NO_FDS_TEXT));
            }
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
        // An unrequested reply (a second one, or to a call that wanted none)
        // is up to the policy, as in dbus-daemon: session.conf's
        // `<allow send_destination="*" eavesdrop="true"/>` lets it through.
        let requested = self.replies.take(to, serial.get(), from);
        if let Err(e) = self.check_delivery(Some(from), to, msg, requested, false) {
            if !requested {
                debug!(from = %unique_name(from), "unrequested reply refused");
            }
            return self.deny(from, msg, &e);
        }
        match self.push(to, msg.clone()) {
            Err(PushError::Full) => self.cut_for_unread_reply(to),
            // A reply with fds for a caller that cannot take them: the
            // caller gets an error instead of waiting forever.
            Err(PushError::NoFds) => {
                let e = BusError::new(ErrorName::NotSupported, NO_FDS_TEXT);
                if let Some(e) = wire::detached_error(&unique_name(to), serial.get(), &e) {
                    self.send_to(to, e);
                }
            }
            _ => {}
        }
        self.eavesdrop(msg, Some(from), Some(Some(to)));
    }

    /// Broadcast NameOwnerChanged.
    pub(super) fn announce_owner(&mut self, name: &str, old: Option<&str>, new: Option<&str>) {
        // Every connect and disconnect announces its unique name, which
        // hardly anyone watches: build the signal only for a possible taker.
        if self.monitors.is_empty()
            && !self
                .matches
                .may_match("NameOwnerChanged", names::BUS_NAME, names::BUS_NAME, name)
        {
            return;
        }
        let body = (name, old.unwrap_or(""), new.unwrap_or(""));
        if let Some(sig) = bus_signal("NameOwnerChanged", None, &body) {
            self.emit(&sig);
        }
    }

    /// Turn registry changes into the bus's signals, in order, and hand a
    /// taken name what waited for it: StartServiceByName callers get their
    /// answer at once, queued messages right after NameAcquired.
    pub(super) fn announce(&mut self, changes: Vec<NameChange>, sup: &mut dyn Activator) {
        let mut held: Vec<(PeerId, String, Vec<Waiter>)> = Vec::new();
        for c in changes {
            match c {
                NameChange::OwnerChanged { name, old, new } => {
                    let old_name = old.map(unique_name);
                    let new_name = new.map(unique_name);
                    self.announce_owner(&name, old_name.as_deref(), new_name.as_deref());
                    sup.name_owner_changed(&name, old, new, self);
                    if let Some(owner) = new {
                        let queued = self.started(&name);
                        if !queued.is_empty() {
                            held.push((owner, name, queued));
                        }
                    }
                }
                NameChange::Lost { peer, name } => self.name_signal("NameLost", peer, &name),
                NameChange::Acquired { peer, name } => {
                    self.name_signal("NameAcquired", peer, &name);
                    if let Some(i) = held.iter().position(|(p, n, _)| *p == peer && *n == name) {
                        let (_, name, queued) = held.swap_remove(i);
                        self.deliver_queued(peer, &name, queued);
                    }
                }
            }
        }
    }

    /// `name` was taken: answer its StartServiceByName callers with 1 and
    /// return the messages to deliver after NameAcquired.
    fn started(&mut self, name: &str) -> Vec<Waiter> {
        let mut queued = Vec::new();
        for w in self.pending.take(name) {
            match w {
                Waiter::Start(call) => {
                    let r = wire::reply(&call.call, &(1u32,));
                    self.answer(&call, Ok(r));
                }
                m @ (Waiter::Message { .. } | Waiter::FromBus(_)) => queued.push(m),
            }
        }
        queued
    }

    fn deliver_queued(&mut self, owner: PeerId, name: &str, queued: Vec<Waiter>) {
        for w in queued {
            match w {
                Waiter::Message { msg, from } if self.peers.contains_key(&from) => {
                    self.deliver(from, &msg, owner, name)
                }
                Waiter::FromBus(msg) => self.send_captured(owner, msg),
                _ => {}
            }
        }
    }

    pub(super) fn name_signal(&mut self, member: &str, peer: PeerId, name: &str) {
        // A leaving peer's NameLost signals reach only monitors: build them
        // only for those (a peer may leave with 50k names).
        if self.monitors.is_empty() && !self.peers.contains_key(&peer) {
            return;
        }
        let dest = unique_name(peer);
        if let Some(sig) = bus_signal(member, Some(&dest), &(name,)) {
            self.send_to(peer, sig);
        }
    }
}

/// Whether a message uses the reserved local path or interface, which
/// dbus-daemon's header validation refuses (and drops its sender): relayed,
/// a `Disconnected` would close every libdbus client that gets it.
fn is_local(hdr: &wire::Header<'_>) -> bool {
    hdr.path().is_some_and(|p| p.as_str() == names::LOCAL_PATH)
        || hdr
            .interface()
            .is_some_and(|i| i.as_str() == names::IFACE_LOCAL)
}

/// A signal of the driver's interface.
fn bus_signal<B>(member: &str, dest: Option<&str>, body: &B) -> Option<Message>
where
    B: serde::Serialize + wire::DynamicType,
{
    wire::signal(names::BUS_PATH, names::BUS_NAME, member, dest, body)
}

/// The sender's `Incoming` when `msg` is the message being routed (a
/// clone shares its bytes); what the bus sends itself is charged to nobody.
fn charge_of<'a>(
    charge: &'a Option<(Arc<Incoming>, usize)>,
    msg: &Message,
) -> Option<&'a Arc<Incoming>> {
    match charge {
        Some((to, at)) if *at == msg.data().bytes().as_ptr() as usize => Some(to),
        _ => None,
    }
}

/// One trace line per message routed (off unless tracing is at trace level).
fn trace_message(from: PeerId, msg: &Message, hdr: &wire::Header<'_>) {
    tracing::trace!(
        peer = %unique_name(from),
        kind = ?msg.message_type(),
        serial = msg.primary_header().serial_num().get(),
        reply_serial = ?hdr.reply_serial(),
        dest = ?hdr.destination().map(|d| d.as_str()),
        path = ?hdr.path().map(|p| p.as_str()),
        iface = ?hdr.interface().map(|i| i.as_str()),
        member = ?hdr.member().map(|m| m.as_str()),
        signature = body_signature(msg),
        "message"
    );
}
