//! dbus-daemon's `<policy>`: the rule model (this file), the parser of
//! `<policy>`, `<allow>` and `<deny>` elements with dbus-daemon's validation
//! (`parse.rs`), and the checks: who may connect, own, send and receive
//! (`check.rs`). It knows no zbus and no bus state: the config parser fills
//! a [`Policy`], the bus core asks it questions.
//!
//! The semantics are dbus-daemon 1.14's `bus/policy.c`, `bus/config-parser.c`
//! and `bus/bus.c`, read to the letter (../shared/design/system-bus-and-policy.md
//! sections 1.1 to 1.7).

use std::collections::BTreeMap;

pub(crate) mod check;
pub(crate) mod parse;

/// A message type a rule names (`send_type`, `receive_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum MessageType {
    MethodCall,
    MethodReturn,
    Signal,
    Error,
}

/// The message fields of a send or receive rule. `None` means "any": the
/// attribute was absent or `*`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct MessageRule {
    pub(crate) message_type: Option<MessageType>,
    pub(crate) path: Option<String>,
    pub(crate) interface: Option<String>,
    pub(crate) member: Option<String>,
    pub(crate) error: Option<String>,
    /// Send rules: `send_destination` (or `send_destination_prefix`, with
    /// `name_is_prefix`). Receive rules: `receive_sender`.
    pub(crate) name: Option<String>,
    /// `send_destination_prefix`: `name` is a prefix on `.` boundaries.
    pub(crate) name_is_prefix: bool,
    /// `min_fds`; 0 when absent.
    pub(crate) min_fds: u32,
    /// `max_fds`; `u32::MAX` when absent.
    pub(crate) max_fds: u32,
    /// `eavesdrop`; false when absent.
    pub(crate) eavesdrop: bool,
    /// `*_requested_reply`, with dbus-daemon's default already applied:
    /// true for allow rules, false for deny rules, when absent.
    pub(crate) requested_reply: bool,
    /// `send_broadcast`: `Some(true)` only signals without destination,
    /// `Some(false)` everything else, `None` either.
    pub(crate) broadcast: Option<bool>,
    /// `log="true"` on a send rule.
    pub(crate) log: bool,
}

impl Default for MessageRule {
    fn default() -> Self {
        MessageRule {
            message_type: None,
            path: None,
            interface: None,
            member: None,
            error: None,
            name: None,
            name_is_prefix: false,
            min_fds: 0,
            max_fds: u32::MAX,
            eavesdrop: false,
            requested_reply: false,
            broadcast: None,
            log: false,
        }
    }
}

/// What a rule is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum RuleKind {
    Send(MessageRule),
    Receive(MessageRule),
    /// `own` (`prefix` false) or `own_prefix` (`prefix` true); `None` is `own="*"`.
    Own {
        name: Option<String>,
        prefix: bool,
    },
    /// `user`; `None` is `user="*"`. Connect-time only.
    User(Option<u32>),
    /// `group`; `None` is `group="*"`. Connect-time only.
    Group(Option<u32>),
}

/// One `<allow>` or `<deny>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Rule {
    pub(crate) allow: bool,
    pub(crate) kind: RuleKind,
}

/// Every `<policy>` of a configuration, by context, each list in file order
/// (includes appended where they stand), as dbus-daemon's `BusPolicy`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Policy {
    /// `<policy context="default">`.
    pub(crate) default: Vec<Rule>,
    /// `<policy context="mandatory">`.
    pub(crate) mandatory: Vec<Rule>,
    /// `<policy user="...">`, by uid.
    pub(crate) by_user: BTreeMap<u32, Vec<Rule>>,
    /// `<policy group="...">`, by gid.
    pub(crate) by_group: BTreeMap<u32, Vec<Rule>>,
    /// `<policy at_console="true">`.
    pub(crate) at_console: Vec<Rule>,
    /// `<policy at_console="false">`.
    pub(crate) not_at_console: Vec<Rule>,
}

impl Policy {
    /// Add `other`'s rules after this policy's own, context by context.
    pub(crate) fn append(&mut self, other: Policy) {
        self.default.extend(other.default);
        self.mandatory.extend(other.mandatory);
        for (uid, rules) in other.by_user {
            self.by_user.entry(uid).or_default().extend(rules);
        }
        for (gid, rules) in other.by_group {
            self.by_group.entry(gid).or_default().extend(rules);
        }
        self.at_console.extend(other.at_console);
        self.not_at_console.extend(other.not_at_console);
    }
}
