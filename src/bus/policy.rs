//! The policy as the bus core applies it (dbus-daemon's
//! `bus_context_check_security_policy` call sites, `bus/bus.c`): every
//! connection gets its `ClientPolicy` at Hello, and again when the policy is
//! reloaded; unicast, broadcast, eavesdropping, messages to and from the
//! driver, RequestName and activation ask it.
//!
//! The common case costs one comparison: while no connected peer has a
//! policy that refuses anything (the stock session.conf), no check runs.

use std::cell::RefCell;
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
    /// The sender's policy and its send rules that name no receiver.
    send: Option<(ClientPolicy, Partial)>,
    /// The last recipient's policy and its receive answer.
    receive: Option<(ClientPolicy, Decision)>,
}

impl Memo {
    /// Forgets the answers unless they are for `msg` from `from`.
    fn keep_for(&mut self, msg: &Message, from: Option<PeerId>) {
        let same = self.msg.as_ref().is_some_and(|(m, f)| {
            let (a, b) = (m.data(), msg.data());
            *f == from && a.as_ptr() == b.as_ptr() && a.len() == b.len()
        });
        if !same {
            *self = Memo {
                msg: Some((msg.clone(), from)),
                ..Memo::default()
            };
        }
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
        self.shared
            .entry((uid, groups.into()))
            .or_insert_with(|| policy.client(uid, groups, false))
            .clone()
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
        parse_unique_name(name) == Some(self.peer)
            || self.st.names.of(self.peer).iter().any(|n| n == name)
    }

    fn has_under(&self, prefix: &str) -> bool {
        // Only a prefix starting with ':' can hold a unique name: build it
        // then alone.
        (prefix.starts_with(':') && has_prefix(&unique_name(self.peer), prefix))
            || self
                .st
                .names
                .of(self.peer)
                .iter()
                .any(|n| has_prefix(n, prefix))
    }

    fn each_name(&self, f: &mut dyn FnMut(&str)) {
        // The unique name is left out: formatting it would allocate, and
        // the policy tests rules naming one with `has`.
        self.st.names.of(self.peer).iter().for_each(|n| f(n));
    }
}

/// The facts of a message the checks read, from its header (which the
/// caller keeps: the facts borrow its strings).
fn facts<'h>(msg: &Message, hdr: &'h Header<'_>, requested_reply: bool) -> MessageFacts<'h> {
    let message_type = match msg.message_type() {
        Type::MethodCall => MessageType::MethodCall,
        Type::MethodReturn => MessageType::MethodReturn,
        Type::Signal => MessageType::Signal,
        Type::Error => MessageType::Error,
    };
    MessageFacts {
        message_type,
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

/// The sender a receive is checked against: a connection by its names, the
/// bus by the sender header.
fn sender<'a>(names: Option<&'a PeerNames<'a>>, hdr: &'a Header<'_>) -> Sender<'a> {
    match names {
        Some(names) => Sender::Connection(names),
        None => Sender::Driver(hdr.sender().map(|s| s.as_str())),
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
        if let Some(p) = self.peers.get_mut(&peer) {
            p.policy = Some(policy);
        }
    }

    /// A connection leaves: it no longer counts.
    pub(super) fn release_policy(&mut self, policy: Option<ClientPolicy>) {
        self.enforcer.forget();
        if policy.is_some_and(|p| !p.allows_everything()) {
            self.enforcer.restricted -= 1;
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
            self.assign_policy(id);
        }
    }

    /// Whether uid may connect at all (dbus-daemon's connect-time check).
    pub(crate) fn may_connect(&self, uid: u32, groups: &[u32], bus_uid: u32) -> bool {
        self.enforcer.policy.can_connect(uid, groups, bus_uid)
    }

    fn policy_of(&self, peer: PeerId) -> Option<&ClientPolicy> {
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
        let hdr = msg.header();
        let f = facts(msg, &hdr, requested_reply && !eavesdropping);
        // A message with fds is not held: its fds would stay open in the bus.
        if f.destination.is_some() || eavesdropping || requested_reply || f.n_fds > 0 {
            self.enforcer.forget();
            return self.check_one(from, to, &f, &hdr, eavesdropping);
        }
        // A broadcast: one recipient of many.
        let mut memo = self.enforcer.memo.borrow_mut();
        memo.keep_for(msg, from);
        let recipient = PeerNames { st: self, peer: to };
        let receiver = Receiver::Connection(&recipient);
        if let Some(from) = from {
            if memo.send.is_none() {
                memo.send = self
                    .policy_of(from)
                    .map(|p| (p.clone(), p.send_unnamed(&f)));
            }
            if let Some((p, unnamed)) = &memo.send {
                let d = p.can_send_after(&f, receiver, *unnamed);
                self.judge(d, REJECTED_SEND, &f, Some(from), Some(to))?;
            }
        }
        let Some(p) = self.policy_of(to) else {
            return Ok(());
        };
        let d = match &memo.receive {
            Some((q, d)) if q.ptr_eq(p) => *d,
            _ => {
                let names = from.map(|peer| PeerNames { st: self, peer });
                let d = p.can_receive(&f, sender(names.as_ref(), &hdr), false);
                memo.receive = Some((p.clone(), d));
                d
            }
        };
        self.judge(d, REJECTED_RECEIVE, &f, from, Some(to))
    }

    /// [`Self::check_delivery`] without the memo.
    fn check_one(
        &self,
        from: Option<PeerId>,
        to: PeerId,
        f: &MessageFacts,
        hdr: &Header<'_>,
        eavesdropping: bool,
    ) -> Result<(), BusError> {
        let recipient = PeerNames { st: self, peer: to };
        if let Some(p) = from.and_then(|from| self.policy_of(from)) {
            let d = p.can_send(f, Receiver::Connection(&recipient));
            self.judge(d, REJECTED_SEND, f, from, Some(to))?;
        }
        let Some(p) = self.policy_of(to) else {
            return Ok(());
        };
        let names = from.map(|peer| PeerNames { st: self, peer });
        let d = p.can_receive(f, sender(names.as_ref(), hdr), eavesdropping);
        self.judge(d, REJECTED_RECEIVE, f, from, Some(to))
    }

    /// A message to the bus driver (or the bus's own control API): the
    /// sender's send policy, the destination compared as written.
    pub(super) fn check_to_bus(&self, from: PeerId, msg: &Message) -> Result<(), BusError> {
        if !self.enforcing() {
            return Ok(());
        }
        self.enforcer.forget();
        let Some(p) = self.policy_of(from) else {
            return Ok(());
        };
        let hdr = msg.header();
        let f = facts(msg, &hdr, false);
        let d = p.can_send(&f, Receiver::Driver);
        self.judge(d, REJECTED_SEND, &f, Some(from), None)
    }

    /// A message that would start a service: the sender's send policy,
    /// before the start, the destination compared as written (dbus-daemon
    /// 1.11.10, fd.o #98666).
    pub(super) fn check_activation(&self, from: PeerId, msg: &Message) -> Result<(), BusError> {
        if !self.enforcing() {
            return Ok(());
        }
        self.enforcer.forget();
        let Some(p) = self.policy_of(from) else {
            return Ok(());
        };
        let hdr = msg.header();
        let f = facts(msg, &hdr, false);
        let d = p.can_send(&f, Receiver::Activation);
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
