//! The checks of a [`Policy`]: who may connect, and, per connection, what it
//! may own, send and receive. Pure functions over the rule model; the bus
//! core supplies the facts (message header fields, the names a connection
//! owns or is queued for) and acts on the answers.
//!
//! dbus-daemon 1.14's `bus/policy.c`, to the letter:
//! `bus_policy_create_client_policy` and `bus_client_policy_optimize`
//! ([`Policy::client`]), `bus_policy_allow_unix_user`
//! ([`Policy::can_connect`]), `bus_rules_check_can_own`
//! ([`ClientPolicy::can_own`]), `bus_client_policy_check_can_send` and
//! `_can_receive` ([`ClientPolicy::can_send`], [`ClientPolicy::can_receive`]).
//! The texts of the errors are `complain_about_message` (`bus/bus.c`) and
//! `bus_registry_acquire_service` (`bus/services.c`).
//!
//! In every check the last matching rule wins, and when nothing matches the
//! answer is deny.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use super::{MessageRule, MessageType, Policy, Rule, RuleKind};

mod index;
mod sure;
use index::{Fold, MessageIndex, OwnIndex};
use sure::{Dir, Sure};

/// What the checks need to know of one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MessageFacts<'a> {
    pub(crate) message_type: MessageType,
    pub(crate) path: Option<&'a str>,
    pub(crate) interface: Option<&'a str>,
    pub(crate) member: Option<&'a str>,
    pub(crate) error_name: Option<&'a str>,
    /// The destination header field.
    pub(crate) destination: Option<&'a str>,
    /// The number of unix fds attached.
    pub(crate) n_fds: u32,
    /// Whether the message has a reply serial (a method return or an error).
    pub(crate) has_reply_serial: bool,
    /// Whether it is a reply the bus was expecting: sent by a connection to
    /// the addressed recipient, which had a pending call with that serial
    /// (consumed by this reply), or sent by the bus driver. False otherwise,
    /// and for eavesdropped copies.
    pub(crate) requested_reply: bool,
}

/// The names a connection is known by, for `send_destination`,
/// `send_destination_prefix` and `receive_sender`. Both questions count the
/// connection's unique name, the names it is the primary owner of, and the
/// names it is queued for (dbus-daemon's `bus_service_owner_in_queue` and
/// `bus_connection_is_queued_owner_by_prefix`).
pub(crate) trait Names {
    /// Whether the connection owns or is queued for `name`.
    fn has(&self, name: &str) -> bool;
    /// Whether the connection owns or is queued for a name equal to
    /// `prefix` or below it on `.` boundaries ([`has_prefix`]).
    fn has_under(&self, prefix: &str) -> bool;
    /// Calls `f` with each name the connection owns or is queued for, each
    /// once (a name listed twice would count its rules twice). The unique
    /// name may be left out: rules naming one are tested with `has`.
    fn each_name(&self, f: &mut dyn FnMut(&str));
}

/// The receiver a send is checked against.
#[derive(Clone, Copy)]
pub(crate) enum Receiver<'a> {
    /// The bus driver: `send_destination` is compared with the destination
    /// header.
    Driver,
    /// The check before auto-activation, when the service is not running
    /// yet: as for the driver, the destination header is compared.
    Activation,
    /// A connection (the addressed one, an eavesdropper, or each recipient
    /// of a broadcast), by the names it owns or is queued for.
    Connection(&'a dyn Names),
}

/// The sender a receive is checked against.
#[derive(Clone, Copy)]
pub(crate) enum Sender<'a> {
    /// The bus driver: `receive_sender` is compared with the message's
    /// sender header (which the driver sets to `org.freedesktop.DBus`).
    Driver(Option<&'a str>),
    /// A connection, by the names it owns or is queued for.
    Connection(&'a dyn Names),
}

/// The rules of a check that name no counterpart: which matched last, and
/// how many.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Partial(Fold);

/// The answer of a send or receive check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Decision {
    pub(crate) allowed: bool,
    /// How many rules matched, for the "%d matched rules" of the error text.
    pub(crate) matched_rules: usize,
    /// The `log` of the last matching send rule: when the message is
    /// allowed, the bus logs "Would reject message" ([`WOULD_REJECT`]).
    pub(crate) log: bool,
}

/// An `<allow>` or `<deny>` of a send or receive kind, in a client policy.
#[derive(Debug, PartialEq, Eq, Hash)]
struct MessageCheck {
    allow: bool,
    rule: MessageRule,
}

/// An `own` or `own_prefix` rule in a client policy.
#[derive(Debug, PartialEq, Eq, Hash)]
struct OwnCheck {
    allow: bool,
    /// `None` is `own="*"`.
    name: Option<String>,
    prefix: bool,
}

/// The rules that apply to one connection, by kind, each in the order of
/// dbus-daemon's flat list after its optimizer, with their index. Cheap to
/// clone (one `Arc`); equal policies compare and hash equal, so connections
/// with the same (uid, groups, at_console) can share one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct ClientPolicy(Arc<Lists>);

#[derive(Debug)]
struct Lists {
    send: Vec<MessageCheck>,
    receive: Vec<MessageCheck>,
    own: Vec<OwnCheck>,
    allows_everything: bool,
    /// Derived from the lists above (so left out of equality and hashing):
    /// where a check looks.
    send_index: MessageIndex,
    receive_index: MessageIndex,
    own_index: OwnIndex,
    sure_send: Sure,
    sure_receive: Sure,
}

impl PartialEq for Lists {
    fn eq(&self, other: &Self) -> bool {
        (&self.send, &self.receive, &self.own) == (&other.send, &other.receive, &other.own)
    }
}

impl Eq for Lists {}

impl Hash for Lists {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (&self.send, &self.receive, &self.own).hash(state);
    }
}

impl Policy {
    /// The policy of a connection of `uid`, member of `groups` (in the order
    /// of its credentials: dbus-daemon's `bus_connection_get_unix_groups`),
    /// at the console or not. The rules of the contexts in dbus-daemon's
    /// order: default, each group's, the user's, at_console true or false
    /// (never both), mandatory; `user` and `group` rules are left out.
    /// `groups` are only looked at when some `<policy group=...>` exists:
    /// like dbus-daemon, the caller may skip finding them otherwise (and
    /// refuse the connection when it cannot find them but needs them).
    pub(crate) fn client(&self, uid: u32, groups: &[u32], at_console: bool) -> ClientPolicy {
        let console = if at_console {
            &self.at_console
        } else {
            &self.not_at_console
        };
        let flat = self
            .default
            .iter()
            .chain(groups.iter().filter_map(|g| self.by_group.get(g)).flatten())
            .chain(self.by_user.get(&uid).into_iter().flatten())
            .chain(console)
            .chain(&self.mandatory);
        ClientPolicy::from_flat(flat)
    }

    /// Whether `uid`, member of `groups` (from NSS, as dbus-daemon's
    /// `_dbus_unix_groups_from_uid`; when they cannot be found the bus
    /// refuses without asking), may connect to a bus running as `bus_uid`.
    /// By default only the bus's own uid may (root too is refused); then the
    /// `user` and `group` rules of the default and mandatory contexts, last
    /// match wins.
    pub(crate) fn can_connect(&self, uid: u32, groups: &[u32], bus_uid: u32) -> bool {
        let rules = self.default.iter().chain(&self.mandatory);
        last_match(rules, uid == bus_uid, |rule: &Rule| match rule.kind {
            RuleKind::User(u) => u.is_none_or(|u| u == uid).then_some(rule.allow),
            RuleKind::Group(g) => g.is_none_or(|g| groups.contains(&g)).then_some(rule.allow),
            _ => None,
        })
        .0
    }
}

impl ClientPolicy {
    /// Splits dbus-daemon's flat list by kind and runs its optimizer.
    fn from_flat<'r>(rules: impl Iterator<Item = &'r Rule>) -> Self {
        let (mut send, mut receive, mut own) = (Vec::new(), Vec::new(), Vec::new());
        for rule in rules {
            let allow = rule.allow;
            match &rule.kind {
                RuleKind::Send(r) => send.push(MessageCheck {
                    allow,
                    rule: r.clone(),
                }),
                RuleKind::Receive(r) => receive.push(MessageCheck {
                    allow,
                    rule: r.clone(),
                }),
                RuleKind::Own { name, prefix } => own.push(OwnCheck {
                    allow,
                    name: name.clone(),
                    prefix: *prefix,
                }),
                RuleKind::User(_) | RuleKind::Group(_) => {}
            }
        }
        // dbus-daemon's `bus_client_policy_optimize`, quirk included: a rule
        // that names no message type, path, interface, member, error or
        // destination/sender (for own: `own="*"`) deletes every earlier rule
        // of its kind, as if it matched everything. It does not look at
        // `send_broadcast`, `min_fds`/`max_fds`, `eavesdrop` or
        // `requested_reply` (added in 2017 without touching the optimizer),
        // so `<allow send_interface="x"/>` then `<deny send_broadcast="true"/>`
        // denies unicast calls to x, and the man page's own
        // `<deny receive_sender="*" min_fds="1"/>` wipes out the receive
        // allows before it. We reproduce it because policies written for
        // dbus-daemon have been tested against exactly this behaviour.
        // Deleting before the last such rule of each kind is what the
        // original's rule-by-rule deletion comes to.
        drop_before_last(&mut send, |c| names_no_message_field(&c.rule));
        drop_before_last(&mut receive, |c| names_no_message_field(&c.rule));
        drop_before_last(&mut own, |c| c.name.is_none());
        let allows_everything = allows_all(&send, |c| c.allow && !c.rule.log, send_matches_all)
            && allows_all(&receive, |c| c.allow, receive_matches_all)
            && allows_all(&own, |c| c.allow, |c| c.name.is_none());
        ClientPolicy(Arc::new(Lists {
            send_index: MessageIndex::new(&send),
            receive_index: MessageIndex::new(&receive),
            own_index: OwnIndex::new(own.iter().map(|c| (c.name.as_deref(), c.prefix))),
            sure_send: Sure::new(&send, Dir::Send),
            sure_receive: Sure::new(&receive, Dir::Receive),
            send,
            receive,
            own,
            allows_everything,
        }))
    }

    /// Whether the connection may own (RequestName) `name`.
    pub(crate) fn can_own(&self, name: &str) -> bool {
        let own = &self.0.own;
        let last = self.0.own_index.last(name, |i| {
            let c = &own[i as usize];
            match (&c.name, c.prefix) {
                (None, _) => true,
                (Some(own), false) => own == name,
                (Some(prefix), true) => has_prefix(name, prefix),
            }
        });
        last.is_some_and(|i| own[i as usize].allow)
    }

    /// Whether the connection may send `msg` to `receiver`.
    pub(crate) fn can_send(&self, msg: &MessageFacts, receiver: Receiver) -> Decision {
        self.can_send_after(msg, receiver, self.send_unnamed(msg))
    }

    /// The part of a send check that no receiver changes: the rules that
    /// name none. A broadcast is checked once per recipient; the bus keeps
    /// this part for the next recipient ([`Self::can_send_after`]).
    pub(crate) fn send_unnamed(&self, msg: &MessageFacts) -> Partial {
        let send = &self.0.send;
        let fold = (self.0.send_index).unnamed(msg.interface, |i| send_hit(&send[i as usize], msg));
        Partial(fold)
    }

    /// Whether the rules that name a receiver can matter when sending to
    /// the connection known by `names`; when not, [`Self::send_decision`]
    /// of the unnamed part is the answer, and the message need not be read
    /// again.
    pub(crate) fn send_names_matter(&self, names: &dyn Names) -> bool {
        self.0.send_index.names_matter(|f| names.each_name(f))
    }

    /// The answer of a send check from its unnamed part alone (when the
    /// receiver's names do not matter).
    pub(crate) fn send_decision(&self, unnamed: Partial) -> Decision {
        decide(&self.0.send, unnamed.0)
    }

    /// [`Self::can_send`], given its `unnamed` part for the same message.
    pub(crate) fn can_send_after(
        &self,
        msg: &MessageFacts,
        receiver: Receiver,
        unnamed: Partial,
    ) -> Decision {
        let send = &self.0.send;
        let fold = self.0.send_index.named(
            unnamed.0,
            |f| match receiver {
                Receiver::Connection(names) => names.each_name(f),
                Receiver::Driver | Receiver::Activation => msg.destination.into_iter().for_each(f),
            },
            |i| send_hit(&send[i as usize], msg),
            |i| {
                let c = &send[i as usize];
                send_hit(c, msg) && destination_matches(&c.rule, msg, receiver)
            },
        );
        decide(send, fold)
    }

    /// Whether the connection may receive `msg` from `sender`. It is
    /// `eavesdropping` when the message has a destination and the
    /// connection is not the addressed recipient.
    pub(crate) fn can_receive(
        &self,
        msg: &MessageFacts,
        sender: Sender,
        eavesdropping: bool,
    ) -> Decision {
        let unnamed = self.receive_unnamed(msg, eavesdropping);
        self.can_receive_after(msg, sender, eavesdropping, unnamed)
    }

    /// The part of a receive check that no sender changes: the rules that
    /// name none. Recipients of a broadcast mostly share one policy; the
    /// bus keeps this part for the next one ([`Self::can_receive_after`]).
    pub(crate) fn receive_unnamed(&self, msg: &MessageFacts, eavesdropping: bool) -> Partial {
        let receive = &self.0.receive;
        let fold = (self.0.receive_index).unnamed(msg.interface, |i| {
            receive_hit(&receive[i as usize], msg, eavesdropping)
        });
        Partial(fold)
    }

    /// [`Self::can_receive`], given its `unnamed` part for the same message
    /// and `eavesdropping`.
    pub(crate) fn can_receive_after(
        &self,
        msg: &MessageFacts,
        sender: Sender,
        eavesdropping: bool,
        unnamed: Partial,
    ) -> Decision {
        let receive = &self.0.receive;
        let fold = self.0.receive_index.named(
            unnamed.0,
            |f| match sender {
                Sender::Connection(names) => names.each_name(f),
                Sender::Driver(header) => header.into_iter().for_each(f),
            },
            |i| receive_hit(&receive[i as usize], msg, eavesdropping),
            |i| {
                let c = &receive[i as usize];
                receive_hit(c, msg, eavesdropping) && sender_matches(&c.rule, sender)
            },
        );
        Decision {
            log: false,
            ..decide(receive, fold)
        }
    }

    /// True when every message of type `t`, with a reply serial or not,
    /// requested or not, may be sent to anyone, whatever its other fields,
    /// and no rule would log it: the check can be skipped, and the
    /// message's header need not be read. Never true for a call or signal
    /// with a reply serial.
    pub(crate) fn surely_sends(
        &self,
        t: MessageType,
        has_reply_serial: bool,
        requested: bool,
    ) -> bool {
        self.0.sure_send.allows(t, has_reply_serial, requested)
    }

    /// As [`Self::surely_sends`], for receiving from anyone, when not
    /// eavesdropping.
    pub(crate) fn surely_receives(
        &self,
        t: MessageType,
        has_reply_serial: bool,
        requested: bool,
    ) -> bool {
        self.0.sure_receive.allows(t, has_reply_serial, requested)
    }

    /// True when this policy provably allows every send, every receive
    /// (eavesdropping and unrequested replies included) and every name, and
    /// logs nothing: the bus may then skip the send, receive and own checks
    /// of this connection. Stock `session.conf` is of this shape.
    pub(crate) fn allows_everything(&self) -> bool {
        self.0.allows_everything
    }

    /// Whether `self` and `other` are the same shared policy.
    pub(crate) fn ptr_eq(&self, other: &ClientPolicy) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// A send rule's tests but the receiver's name.
fn send_hit(c: &MessageCheck, msg: &MessageFacts) -> bool {
    message_matches(c, msg) && broadcast_matches(&c.rule, msg)
}

/// A receive rule's tests but the sender's name.
fn receive_hit(c: &MessageCheck, msg: &MessageFacts, eavesdropping: bool) -> bool {
    eavesdrop_matches(c, eavesdropping) && message_matches(c, msg)
}

/// The decision of the last matching rule (deny when none matched).
fn decide(rules: &[MessageCheck], fold: Fold) -> Decision {
    let last = fold.last.map(|i| &rules[i as usize]);
    Decision {
        allowed: last.is_some_and(|c| c.allow),
        matched_rules: fold.count,
        log: last.is_some_and(|c| c.rule.log),
    }
}

/// Folds `rules` from `start`: each rule for which `decide` says
/// `Some(allow)` sets the answer. Returns the answer and how many matched.
fn last_match<T>(
    rules: impl IntoIterator<Item = T>,
    start: bool,
    mut decide: impl FnMut(T) -> Option<bool>,
) -> (bool, usize) {
    rules
        .into_iter()
        .filter_map(&mut decide)
        .fold((start, 0), |(_, n), allow| (allow, n + 1))
}

/// Removes every element before the last one that is `blanket`.
fn drop_before_last<T>(list: &mut Vec<T>, blanket: impl Fn(&T) -> bool) {
    if let Some(last) = list.iter().rposition(blanket) {
        list.drain(..last);
    }
}

/// True when the last rule of `rules` that matches everything (`universal`)
/// and every later rule pass `allow`: nothing can then end on a deny.
fn allows_all<T>(rules: &[T], allow: impl Fn(&T) -> bool, universal: impl Fn(&T) -> bool) -> bool {
    rules
        .iter()
        .rposition(universal)
        .is_some_and(|last| rules[last..].iter().all(allow))
}

/// The optimizer's test: no type, path, interface, member, error or name.
fn names_no_message_field(r: &MessageRule) -> bool {
    r.message_type.is_none()
        && r.path.is_none()
        && r.interface.is_none()
        && r.member.is_none()
        && r.error.is_none()
        && r.name.is_none()
}

/// A rule that limits nothing: no message field and every fd count.
fn limits_nothing(r: &MessageRule) -> bool {
    names_no_message_field(r) && r.min_fds == 0 && r.max_fds == u32::MAX
}

/// An allow send rule that matches every message: not limited to broadcasts
/// or non-broadcasts, nor (unless it eavesdrops) to requested replies.
fn send_matches_all(c: &MessageCheck) -> bool {
    let r = &c.rule;
    limits_nothing(r) && r.broadcast.is_none() && (r.eavesdrop || !r.requested_reply)
}

/// An allow receive rule that matches every message, eavesdropped too.
fn receive_matches_all(c: &MessageCheck) -> bool {
    limits_nothing(&c.rule) && c.rule.eavesdrop
}

/// What send and receive rules test alike: type, requested reply, path,
/// interface, member, error and fds.
fn message_matches(c: &MessageCheck, msg: &MessageFacts) -> bool {
    let (r, allow) = (&c.rule, c.allow);
    r.message_type.is_none_or(|t| t == msg.message_type)
        && reply_matches(c, msg)
        && field_matches(&r.path, msg.path)
        // A message without an interface matches deny rules, not allow rules.
        && r.interface.as_deref().is_none_or(|want| msg.interface.map_or(!allow, |i| i == want))
        && field_matches(&r.member, msg.member)
        && field_matches(&r.error, msg.error_name)
        && (r.min_fds..=r.max_fds).contains(&msg.n_fds)
}

/// A field the message lacks matches (path, member, error name).
fn field_matches(rule: &Option<String>, msg: Option<&str>) -> bool {
    rule.as_deref()
        .is_none_or(|want| msg.is_none_or(|have| have == want))
}

/// For messages with a reply serial: an allow rule with
/// `requested_reply="true"` (the default) matches only requested replies,
/// unless it has `eavesdrop="true"`; a deny rule with
/// `requested_reply="false"` (the default) matches only unrequested ones.
fn reply_matches(c: &MessageCheck, msg: &MessageFacts) -> bool {
    let r = &c.rule;
    if !msg.has_reply_serial {
        return true;
    }
    if c.allow {
        msg.requested_reply || !r.requested_reply || r.eavesdrop
    } else {
        !msg.requested_reply || r.requested_reply
    }
}

/// Receive only: an allow rule matches an eavesdropped message only with
/// `eavesdrop="true"`; a deny rule with `eavesdrop="true"` matches only
/// eavesdropped messages.
fn eavesdrop_matches(c: &MessageCheck, eavesdropping: bool) -> bool {
    if c.allow {
        !eavesdropping || c.rule.eavesdrop
    } else {
        eavesdropping || !c.rule.eavesdrop
    }
}

/// `send_broadcast`: a broadcast is a signal without a destination.
fn broadcast_matches(r: &MessageRule, msg: &MessageFacts) -> bool {
    let broadcast = msg.destination.is_none() && msg.message_type == MessageType::Signal;
    r.broadcast.is_none_or(|b| b == broadcast)
}

/// `send_destination` and `send_destination_prefix`: the receiving
/// connection's names, or, for the driver and activation, the header.
fn destination_matches(r: &MessageRule, msg: &MessageFacts, receiver: Receiver) -> bool {
    let Some(want) = r.name.as_deref() else {
        return true;
    };
    match (receiver, r.name_is_prefix) {
        (Receiver::Connection(names), false) => names.has(want),
        (Receiver::Connection(names), true) => names.has_under(want),
        (Receiver::Driver | Receiver::Activation, false) => msg.destination == Some(want),
        (Receiver::Driver | Receiver::Activation, true) => {
            msg.destination.is_some_and(|d| has_prefix(d, want))
        }
    }
}

/// `receive_sender`: the sending connection's names, or, for the driver,
/// the sender header.
fn sender_matches(r: &MessageRule, sender: Sender) -> bool {
    let Some(want) = r.name.as_deref() else {
        return true;
    };
    match sender {
        Sender::Connection(names) => names.has(want),
        Sender::Driver(header) => header == Some(want),
    }
}

/// Whether `name` is `prefix` or below it on `.` boundaries: `a.b` is
/// under `a.b` and `a`, not under `a.bc` nor `a.` (dbus-daemon's
/// `_dbus_string_starts_with_words_c_str` with `.`).
pub(crate) fn has_prefix(name: &str, prefix: &str) -> bool {
    name.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
}

/// The `complaint` of a message refused by the sender's send policy.
pub(crate) const REJECTED_SEND: &str = "Rejected send message";
/// The `complaint` of a message refused by the recipient's receive policy.
pub(crate) const REJECTED_RECEIVE: &str = "Rejected receive message";
/// The `complaint` logged (not returned) when a send rule with `log="true"`
/// allowed the message.
pub(crate) const WOULD_REJECT: &str = "Would reject message";

/// A connection as an error text names it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Party<'a> {
    /// Its unique name.
    pub(crate) name: &'a str,
    /// Its loginfo: `uid=N pid=N comm="..."` and so on.
    pub(crate) loginfo: &'a str,
}

/// dbus-daemon's `complain_about_message` text, returned as the
/// AccessDenied error and logged at security level: `complaint` is
/// [`REJECTED_SEND`], [`REJECTED_RECEIVE`] or [`WOULD_REJECT`]. `sender` is
/// `None` for the bus driver, `recipient_loginfo` for the driver or when
/// there is no recipient yet (before activation). Missing fields print as
/// `(unset)`, a missing destination as `org.freedesktop.DBus`.
pub(crate) fn complaint(
    complaint: &str,
    matched_rules: usize,
    msg: &MessageFacts,
    sender: Option<Party>,
    recipient_loginfo: Option<&str>,
) -> String {
    // The driver's loginfo is `(bus)` inside the parentheses of the format,
    // so dbus-daemon prints `sender="(unset)" ((bus))`; a missing recipient
    // prints `(bus)`.
    let (sender_name, sender_loginfo) =
        sender.map_or(("(unset)", "(bus)"), |p| (p.name, p.loginfo));
    format!(
        "{complaint}, {matched_rules} matched rules; type=\"{}\", sender=\"{sender_name}\" \
         ({sender_loginfo}) interface=\"{}\" member=\"{}\" error name=\"{}\" \
         requested_reply=\"{}\" destination=\"{}\" ({})",
        type_name(msg.message_type),
        msg.interface.unwrap_or("(unset)"),
        msg.member.unwrap_or("(unset)"),
        msg.error_name.unwrap_or("(unset)"),
        u8::from(msg.requested_reply),
        msg.destination.unwrap_or("org.freedesktop.DBus"),
        recipient_loginfo.unwrap_or("bus"),
    )
}

/// The AccessDenied text of a RequestName the own rules refuse.
pub(crate) fn own_denied(unique_name: &str, name: &str) -> String {
    format!(
        "Connection \"{unique_name}\" is not allowed to own the service \"{name}\" due to \
         security policies in the configuration file"
    )
}

/// dbus-daemon's `dbus_message_type_to_string`.
fn type_name(t: MessageType) -> &'static str {
    match t {
        MessageType::MethodCall => "method_call",
        MessageType::MethodReturn => "method_return",
        MessageType::Signal => "signal",
        MessageType::Error => "error",
    }
}

#[cfg(test)]
mod tests;
