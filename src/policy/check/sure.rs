//! Answers known before the message is read: for each message type, and
//! requested reply or not, whether a policy allows every such message
//! whatever its fields, counterpart and fds. Method returns and errors
//! always have a reply serial (zbus refuses them without one); for calls
//! and signals the answer holds for those without (the usual case), so
//! the caller must know that much. On a system bus most receives
//! (every type is allowed by `system.conf`, and the services' files add few
//! receive denials) and every requested reply are of this kind, so the bus
//! can let them through without reading their header, which for a message
//! the bus built itself costs more than the check.

use super::{MessageCheck, MessageType};

/// The direction of a rule list.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Dir {
    Send,
    /// Not eavesdropping: eavesdropped copies are always checked.
    Receive,
}

/// For each (message type, requested reply): allowed whatever the rest.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Sure([bool; 8]);

const TYPES: [MessageType; 4] = [
    MessageType::MethodCall,
    MessageType::MethodReturn,
    MessageType::Signal,
    MessageType::Error,
];

fn slot(t: MessageType, requested: bool) -> usize {
    let t = match t {
        MessageType::MethodCall => 0,
        MessageType::MethodReturn => 1,
        MessageType::Signal => 2,
        MessageType::Error => 3,
    };
    t * 2 + usize::from(requested)
}

impl Sure {
    pub(super) fn new(rules: &[MessageCheck], dir: Dir) -> Self {
        let mut sure = Sure::default();
        for t in TYPES {
            for requested in [false, true] {
                // The last allow that matches every such message, and after
                // it nothing that could end on a deny or a logged allow.
                let last = rules
                    .iter()
                    .rposition(|c| c.allow && matches_all(c, t, requested, dir));
                sure.0[slot(t, requested)] = last.is_some_and(|k| {
                    rules[k..].iter().all(|c| {
                        (c.allow && !(dir == Dir::Send && c.rule.log))
                            || !can_match(c, t, requested, dir)
                    })
                });
            }
        }
        sure
    }

    /// Whether every message of type `t`, with or without a reply serial,
    /// requested or not, is allowed (not logged); false when unknown (a
    /// call or signal with a reply serial).
    pub(super) fn allows(&self, t: MessageType, has_reply_serial: bool, requested: bool) -> bool {
        has_reply_serial == with_reply(t) && self.0[slot(t, requested)]
    }
}

/// The types the table is for with a reply serial: those that always have
/// one. Calls and signals are for those without.
fn with_reply(t: MessageType) -> bool {
    matches!(t, MessageType::MethodReturn | MessageType::Error)
}

/// Whether an allow rule matches every message of type `t`.
fn matches_all(c: &MessageCheck, t: MessageType, requested: bool, dir: Dir) -> bool {
    let r = &c.rule;
    let broadcast = match r.broadcast {
        None => true,
        // Only signals can be broadcasts.
        Some(false) => t != MessageType::Signal,
        Some(true) => false,
    };
    r.message_type.is_none_or(|x| x == t)
        && r.path.is_none()
        && r.interface.is_none()
        && r.member.is_none()
        && r.error.is_none()
        && r.name.is_none()
        && r.min_fds == 0
        && r.max_fds == u32::MAX
        // With a reply serial, an allow matches requested replies, or any
        // with requested_reply="false" or eavesdrop="true".
        && (!with_reply(t) || requested || !r.requested_reply || r.eavesdrop)
        && (dir == Dir::Receive || (broadcast && !r.log))
}

/// Whether a rule could match some message of type `t` (when unsure: yes).
fn can_match(c: &MessageCheck, t: MessageType, requested: bool, dir: Dir) -> bool {
    let r = &c.rule;
    let reply = match (with_reply(t), c.allow) {
        (false, _) => true,
        (true, true) => requested || !r.requested_reply || r.eavesdrop,
        (true, false) => !requested || r.requested_reply,
    };
    let direction = match dir {
        // A deny with eavesdrop="true" matches only eavesdropped copies.
        Dir::Receive => c.allow || !r.eavesdrop,
        Dir::Send => r.broadcast != Some(true) || t == MessageType::Signal,
    };
    r.message_type.is_none_or(|x| x == t) && reply && direction && r.min_fds <= r.max_fds
}
