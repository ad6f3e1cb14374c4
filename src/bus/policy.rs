//! The policy as the bus core applies it (dbus-daemon's
//! `bus_context_check_security_policy` call sites, `bus/bus.c`): every
//! connection gets its `ClientPolicy` at Hello, and again when the policy is
//! reloaded; unicast, broadcast, eavesdropping, messages to and from the
//! driver, RequestName and activation ask it.
//!
//! The common case costs one comparison: while no connected peer has a
//! policy that refuses anything (the stock session.conf), no check runs.
//! Otherwise (a system bus's policy of hundreds of rules) a check is cheap
//! in three ways: the client policy tests only the rules a message can hit
//! (`policy::check`'s index); what a policy allows of every message of a
//! type is known in advance, so replies, and most receives, pass without
//! a rule tested or their header read; and a broadcast's recipients share
//! what no recipient changes ([`Memo`]).

use std::cell::{OnceCell, RefCell};
use std::collections::HashMap;

use tracing::warn;

use super::BusState;
use super::peer::{PeerId, parse_unique_name, unique_name};
use crate::policy::MessageType;
use crate::policy::Policy;
use crate::policy::check::{
    ClientPolicy, Decision, MessageFacts, Names, Partial, Party, REJECTED_RECEIVE, REJECTED_SEND,
    Receiver, Sender, WOULD_REJECT, complaint, has_prefix, own_denied,
};
use crate::wire::{BusError, ErrorName, Header, Message, Type};

/// The bus's policy and the connections' share of it.
#[derive(Default)]
pub(crate) struct Enforcer {
    policy: Policy,
    /// One client policy per (uid, groups): connections share them.
    shared: HashMap<(u32, Box<[u32]>), ClientPolicy>,
    /// Connections whose policy refuses something: while none, no check runs.
    restricted: usize,
    /// Connections with a policy.
    assigned: usize,
    /// The policy in `shared` while it holds only one: when every
    /// connection has a policy, it is theirs, without a lookup.
    sole: Option<ClientPolicy>,
    /// What the checks of a broadcast's recipients share.
    memo: RefCell<Memo>,
}

/// A broadcast is checked once per recipient: the sender's send rules that
/// name no receiver answer the same for every recipient, and recipients
/// that share a policy (the same uid and groups) get the same receive
/// answer. Those answers are kept here from one recipient to the next.
///
/// They stay valid only while nothing else is asked of the policy: every
/// other question (a unicast, a call to the bus, which is how a peer's names
/// change, a new policy) forgets them, so a sender's names and policy
/// cannot change under them.
#[derive(Default)]
struct Memo {
    /// The broadcast and its sender. The message is held, so that no other
    /// message can have its address while it is here (so never one with
    /// fds).
    msg: Option<(Message, Option<PeerId>)>,
    /// The address and length of its bytes: its identity.
    id: (usize, usize),
    /// The sender's policy and its send rules that name no receiver (None
    /// when the policy allows every such message whatever its receiver).
    send: Option<(ClientPolicy, Option<Partial>)>,
    /// The last recipient's policy and its receive answer.
    receive: Option<(ClientPolicy, Decision)>,
}

/// The identity of a message while the memo holds it.
fn identity(msg: &Message) -> (usize, usize) {
    let bytes: &[u8] = msg.data();
    (bytes.as_ptr() as usize, bytes.len())
}

impl Memo {
    /// Whether the answers are for `msg` from `from`.
    fn is_for(&self, msg: &Message, from: Option<PeerId>) -> bool {
        self.msg.as_ref().is_some_and(|(_, f)| *f == from) && self.id == identity(msg)
    }
}

impl Enforcer {
    pub(crate) fn new(policy: Policy) -> Self {
        Enforcer {
            policy,
            ..Enforcer::default()
        }
    }

    /// Forgets a broadcast's answers ([`Memo`]): something else is asked.
    fn forget(&self) {
        let mut memo = self.memo.borrow_mut();
        if memo.msg.is_some() {
            *memo = Memo::default();
        }
    }

    fn client(&mut self, uid: u32, groups: &[u32]) -> ClientPolicy {
        // at_console: false for everyone without logind, as dbus-daemon.
        let policy = &self.policy;
        let p = self
            .shared
            .entry((uid, groups.into()))
            .or_insert_with(|| policy.client(uid, groups, false))
            .clone();
        self.sole = (self.shared.len() == 1).then(|| p.clone());
        self.assigned += 1;
        p
    }
}

/// The names a connection is known by: its unique name, and the names it
/// owns or is queued for.
struct PeerNames<'a> {
    st: &'a BusState,
    peer: PeerId,
}

impl Names for PeerNames<'_> {
    fn has(&self, name: &str) -> bool {
        parse_unique_name(name) == Some(self.peer) || self.st.names.of(self.peer).contains(name)
    }

    fn has_under(&self, prefix: &str) -> bool {
        // Only a prefix starting with ':' can hold a unique name: build it
        // then alone.
        (prefix.starts_with(':') && has_prefix(&unique_name(self.peer), prefix))
            || self.st.names.of(self.peer).any_under(prefix)
    }

    fn each_name(&self, f: &mut dyn FnMut(&str)) {
        // The unique name is left out: formatting it would allocate, and
        // the policy tests rules naming one with `has`.
        self.st.names.of(self.peer).iter().for_each(|n| f(n));
    }
}

/// A message's type, from its primary header: no need to read the rest.
fn message_type(msg: &Message) -> MessageType {
    match msg.message_type() {
        Type::MethodCall => MessageType::MethodCall,
        Type::MethodReturn => MessageType::MethodReturn,
        Type::Signal => MessageType::Signal,
        Type::Error => MessageType::Error,
    }
}

/// The facts of a message the checks read, from its header (which the
/// caller keeps: the facts borrow its strings).
fn facts<'h>(msg: &Message, hdr: &'h Header<'_>, requested_reply: bool) -> MessageFacts<'h> {
    MessageFacts {
        message_type: message_type(msg),
        path: hdr.path().map(|p| p.as_str()),
        interface: hdr.interface().map(|i| i.as_str()),
        member: hdr.member().map(|m| m.as_str()),
        error_name: hdr.error_name().map(|e| e.as_str()),
        destination: hdr.destination().map(|d| d.as_str()),
        n_fds: msg.data().fds().len() as u32,
        has_reply_serial: hdr.reply_serial().is_some(),
        requested_reply,
    }
}

/// Whether the sender's policy allows sending, and the recipient's
/// receiving, every message of type `t` whatever its fields (None: nothing
/// to check). Eavesdropped copies are always checked.
fn surely(
    from: Option<&ClientPolicy>,
    to: Option<&ClientPolicy>,
    t: MessageType,
    has_reply_serial: bool,
    requested: bool,
    eavesdropping: bool,
) -> (bool, bool) {
    (
        from.is_none_or(|p| p.surely_sends(t, has_reply_serial, requested)),
        to.is_none_or(|p| !eavesdropping && p.surely_receives(t, has_reply_serial, requested)),
    )
}

/// The sender a receive is checked against: a connection by its names, the
/// bus by the sender header.
fn sender<'a>(names: Option<&'a PeerNames<'a>>, hdr: &'a Header<'_>) -> Sender<'a> {
    match names {
        Some(names) => Sender::Connection(names),
        None => Sender::Driver(hdr.sender().map(|s| s.as_str())),
    }
}

/// A broadcast's header, read when first needed.
struct Lazy<'m> {
    msg: &'m Message,
    hdr: OnceCell<Header<'m>>,
}

impl<'m> Lazy<'m> {
    fn new(msg: &'m Message) -> Self {
        Lazy {
            msg,
            hdr: OnceCell::new(),
        }
    }

    fn header(&self) -> &Header<'m> {
        self.hdr.get_or_init(|| self.msg.header())
    }

    /// A broadcast's facts: never a requested reply.
    fn facts(&self) -> MessageFacts<'_> {
        facts(self.msg, self.header(), false)
    }
}

/// A refusal: the AccessDenied text, logged at warning level as dbus-daemon
/// logs it at security level.
fn refusal(text: String) -> BusError {
    warn!("{text}");
    BusError::new(ErrorName::AccessDenied, text)
}

impl BusState {
    /// Whether any check can refuse anything now.
    pub(super) fn enforcing(&self) -> bool {
        self.enforcer.restricted > 0
    }

    /// Give a connection that completed Hello its policy.
    pub(super) fn assign_policy(&mut self, peer: PeerId) {
        let Some(p) = self.peers.get(&peer) else {
            return;
        };
        let (uid, groups) = (p.creds.uid.unwrap_or(u32::MAX), p.groups.clone());
        self.enforcer.forget();
        let policy = self.enforcer.client(uid, &groups);
        if !policy.allows_everything() {
            self.enforcer.restricted += 1;
        }
        let old = self
            .peers
            .get_mut(&peer)
            .and_then(|p| p.policy.replace(policy));
        // Each connection counts once.
        self.release_policy(old);
    }

    /// A connection leaves: it no longer counts.
    pub(super) fn release_policy(&mut self, policy: Option<ClientPolicy>) {
        self.enforcer.forget();
        if let Some(p) = policy {
            self.enforcer.assigned -= 1;
            if !p.allows_everything() {
                self.enforcer.restricted -= 1;
            }
        }
    }

    /// A new policy (reload): every connection gets its share of it.
    pub(crate) fn set_policy(&mut self, policy: Policy) {
        self.enforcer = Enforcer::new(policy);
        let ids: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.policy.is_some())
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            // The old policy counted in the old enforcer only.
            if let Some(p) = self.peers.get_mut(&id) {
                p.policy = None;
            }
            self.assign_policy(id);
        }
    }

    /// Whether uid may connect at all (dbus-daemon's connect-time check).
    pub(crate) fn may_connect(&self, uid: u32, groups: &[u32], bus_uid: u32) -> bool {
        self.enforcer.policy.can_connect(uid, groups, bus_uid)
    }

    /// A connected peer's policy.
    fn policy_of(&self, peer: PeerId) -> Option<&ClientPolicy> {
        // While every connection has one and the same policy (one uid, as
        // on a session bus), it needs no lookup.
        if self.enforcer.assigned == self.peers.len()
            && let Some(p) = &self.enforcer.sole
        {
            debug_assert!(self.peers.contains_key(&peer), "peer {peer} is connected");
            return Some(p);
        }
        self.peers.get(&peer).and_then(|p| p.policy.as_ref())
    }

    fn loginfo(&self, peer: PeerId) -> &str {
        self.peers.get(&peer).map_or("", |p| &p.loginfo)
    }

    /// Act on a decision: Ok when allowed (logging "Would reject" for a
    /// `log="true"` rule), the AccessDenied with dbus-daemon's text when not.
    fn judge(
        &self,
        d: Decision,
        text: &str,
        f: &MessageFacts,
        from: Option<PeerId>,
        to: Option<PeerId>,
    ) -> Result<(), BusError> {
        if d.allowed && !d.log {
            return Ok(());
        }
        let name = from.map(unique_name);
        let sender = from.zip(name.as_deref()).map(|(p, name)| Party {
            name,
            loginfo: self.loginfo(p),
        });
        let recipient = to.map(|p| self.loginfo(p));
        if d.allowed {
            warn!(
                "{}",
                complaint(WOULD_REJECT, d.matched_rules, f, sender, recipient)
            );
            return Ok(());
        }
        Err(refusal(complaint(
            text,
            d.matched_rules,
            f,
            sender,
            recipient,
        )))
    }

    /// A message from a connection (`from`) or from the bus (None) to the
    /// connection `to`: the sender's send policy, then the recipient's
    /// receive policy (dbus-daemon's order). `eavesdropping`: `to` is not
    /// the addressed recipient.
    pub(super) fn check_delivery(
        &self,
        from: Option<PeerId>,
        to: PeerId,
        msg: &Message,
        requested_reply: bool,
        eavesdropping: bool,
    ) -> Result<(), BusError> {
        if !self.enforcing() {
            return Ok(());
        }
        let t = message_type(msg);
        let requested = requested_reply && !eavesdropping;
        let to_policy = self.policy_of(to);
        let reply = matches!(t, MessageType::MethodReturn | MessageType::Error);
        // The next recipient of the broadcast being checked: its header is
        // read only if needed.
        if !reply && !eavesdropping && !requested {
            let mut memo = self.enforcer.memo.borrow_mut();
            if memo.is_for(msg, from) {
                return self.next_recipient(&mut memo, from, to, to_policy, msg);
            }
        }
        let (hdr, from_policy, sure);
        let f = if reply {
            // A reply, which always has a reply serial: when both policies
            // allow every such reply, its header is not read (for the bus's
            // own replies, reading it costs more than the check).
            from_policy = from.and_then(|from| self.policy_of(from));
            sure = surely(from_policy, to_policy, t, true, requested, eavesdropping);
            if sure == (true, true) {
                self.enforcer.forget();
                return Ok(());
            }
            hdr = msg.header();
            facts(msg, &hdr, requested)
        } else {
            hdr = msg.header();
            let f = facts(msg, &hdr, requested);
            // A message with fds is not held: its fds would stay open.
            if f.destination.is_none() && !eavesdropping && !requested && f.n_fds == 0 {
                let mut memo = self.enforcer.memo.borrow_mut();
                *memo = self.first_recipient(from, msg, &f);
                return self.next_recipient(&mut memo, from, to, to_policy, msg);
            }
            from_policy = from.and_then(|from| self.policy_of(from));
            let serial = f.has_reply_serial;
            sure = surely(from_policy, to_policy, t, serial, requested, eavesdropping);
            f
        };
        self.enforcer.forget();
        if let Some(p) = from_policy.filter(|_| !sure.0) {
            let recipient = PeerNames { st: self, peer: to };
            let d = p.can_send(&f, Receiver::Connection(&recipient));
            self.judge(d, REJECTED_SEND, &f, from, Some(to))?;
        }
        let Some(p) = to_policy.filter(|_| !sure.1) else {
            return Ok(());
        };
        let names = from.map(|peer| PeerNames { st: self, peer });
        let d = p.can_receive(&f, sender(names.as_ref(), &hdr), eavesdropping);
        self.judge(d, REJECTED_RECEIVE, &f, from, Some(to))
    }

    /// The memo for a broadcast, from its first recipient on: the message,
    /// and the sender's send part.
    fn first_recipient(&self, from: Option<PeerId>, msg: &Message, f: &MessageFacts) -> Memo {
        let send = from.and_then(|from| self.policy_of(from)).map(|p| {
            let sure = p.surely_sends(f.message_type, f.has_reply_serial, false);
            (p.clone(), (!sure).then(|| p.send_unnamed(f)))
        });
        Memo {
            msg: Some((msg.clone(), from)),
            id: identity(msg),
            send,
            receive: None,
        }
    }

    /// [`Self::check_delivery`] of a broadcast for one of its recipients,
    /// from the memo: the message is read again only for a recipient known
    /// by a name some send rule names, for a recipient policy the memo has
    /// no receive answer of, and for the text of a refusal.
    fn next_recipient(
        &self,
        memo: &mut Memo,
        from: Option<PeerId>,
        to: PeerId,
        to_policy: Option<&ClientPolicy>,
        msg: &Message,
    ) -> Result<(), BusError> {
        let lazy = Lazy::new(msg);
        // None: no send check, or every such message may be sent.
        if let Some((p, Some(unnamed))) = &memo.send {
            let recipient = PeerNames { st: self, peer: to };
            let d = if p.send_names_matter(&recipient) {
                p.can_send_after(&lazy.facts(), Receiver::Connection(&recipient), *unnamed)
            } else {
                p.send_decision(*unnamed)
            };
            if !d.allowed || d.log {
                self.judge(d, REJECTED_SEND, &lazy.facts(), from, Some(to))?;
            }
        }
        let Some(p) = to_policy else {
            return Ok(());
        };
        let d = match &memo.receive {
            Some((q, d)) if q.ptr_eq(p) => *d,
            _ => {
                let names = from.map(|peer| PeerNames { st: self, peer });
                let sender = sender(names.as_ref(), lazy.header());
                let d = p.can_receive(&lazy.facts(), sender, false);
                memo.receive = Some((p.clone(), d));
                d
            }
        };
        if d.allowed {
            return Ok(());
        }
        self.judge(d, REJECTED_RECEIVE, &lazy.facts(), from, Some(to))
    }

    /// A message to the bus driver (or the bus's own control API): the
    /// sender's send policy, the destination compared as written.
    pub(super) fn check_to_bus(&self, from: PeerId, msg: &Message) -> Result<(), BusError> {
        self.check_send_as_written(from, msg, Receiver::Driver)
    }

    /// A message that would start a service: the sender's send policy,
    /// before the start, the destination compared as written (dbus-daemon
    /// 1.11.10, fd.o #98666).
    pub(super) fn check_activation(&self, from: PeerId, msg: &Message) -> Result<(), BusError> {
        self.check_send_as_written(from, msg, Receiver::Activation)
    }

    /// The sender's send policy toward a receiver that has no names of its
    /// own to compare (the driver, a service not yet started).
    fn check_send_as_written(
        &self,
        from: PeerId,
        msg: &Message,
        to: Receiver<'_>,
    ) -> Result<(), BusError> {
        if !self.enforcing() {
            return Ok(());
        }
        self.enforcer.forget();
        let Some(p) = self.policy_of(from) else {
            return Ok(());
        };
        let hdr = msg.header();
        let f = facts(msg, &hdr, false);
        let d = p.can_send(&f, to);
        self.judge(d, REJECTED_SEND, &f, Some(from), None)
    }

    /// RequestName: the own rules.
    pub(super) fn check_own(&self, from: PeerId, name: &str) -> Result<(), BusError> {
        if !self.enforcing() {
            return Ok(());
        }
        self.enforcer.forget();
        match self.policy_of(from) {
            Some(p) if !p.can_own(name) => Err(refusal(own_denied(&unique_name(from), name))),
            _ => Ok(()),
        }
    }
}
