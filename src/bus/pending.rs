//! What waits for a name to be taken: messages to deliver to its next
//! owner and StartServiceByName calls to answer, and the connections whose
//! messages are held back (a service stopping for idleness).
//!
//! The queues live in the bus core so that taking a name and delivering
//! what waited for it happen under one lock, in dbus-daemon's order:
//! NameOwnerChanged, StartServiceByName replies, NameAcquired, the queued
//! messages, and last the owner's RequestName reply.

use std::collections::{HashMap, HashSet};

use super::CallRef;
use super::peer::PeerId;
use crate::wire::Message;

/// Something waiting for a name to be taken.
pub(crate) enum Waiter {
    /// A message to deliver to the new owner.
    Message { msg: Message, from: PeerId },
    /// A StartServiceByName call to answer with 1.
    Start(CallRef),
    /// A message of the bus itself for the name's owner (an
    /// ActivationRequest waiting for systemd).
    FromBus(Message),
}

impl Waiter {
    /// The peer to answer; None for the bus's own messages.
    pub(crate) fn from(&self) -> Option<PeerId> {
        match self {
            Waiter::Message { from, .. } => Some(*from),
            Waiter::Start(c) => Some(c.from),
            Waiter::FromBus(_) => None,
        }
    }

    pub(crate) fn call(&self) -> &Message {
        match self {
            Waiter::Message { msg, .. } | Waiter::FromBus(msg) => msg,
            Waiter::Start(c) => &c.call,
        }
    }
}

#[derive(Default)]
pub(crate) struct Pending {
    by_name: HashMap<String, Vec<Waiter>>,
    count: usize,
    /// Connections whose messages wait in the queue instead of reaching
    /// them (see `hold`).
    held: HashSet<PeerId>,
}

impl Pending {
    /// Waiters of every name.
    pub(crate) fn count(&self) -> usize {
        self.count
    }

    pub(crate) fn push(&mut self, name: &str, waiter: Waiter) {
        match self.by_name.get_mut(name) {
            Some(q) => q.push(waiter),
            None => {
                self.by_name.insert(name.to_owned(), vec![waiter]);
            }
        }
        self.count += 1;
    }

    /// Everything that waited for `name`, in arrival order.
    pub(crate) fn take(&mut self, name: &str) -> Vec<Waiter> {
        let q = self.by_name.remove(name).unwrap_or_default();
        self.count -= q.len();
        q
    }

    pub(crate) fn has_any(&self, names: &[String]) -> bool {
        names.iter().any(|n| self.by_name.contains_key(n))
    }

    /// Hold back the messages addressed by well-known name to `peer` (or
    /// release them to flow again): its owner is going away, and the next
    /// owner should get them.
    pub(crate) fn hold(&mut self, peer: PeerId, on: bool) {
        if on {
            self.held.insert(peer);
        } else {
            self.held.remove(&peer);
        }
    }

    pub(crate) fn is_held(&self, peer: PeerId) -> bool {
        !self.held.is_empty() && self.held.contains(&peer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(serial: u32) -> Waiter {
        let m = crate::wire::Message::method_call("/", "M")
            .serial(std::num::NonZeroU32::new(serial).unwrap())
            .build(&())
            .unwrap();
        Waiter::Message { msg: m, from: 1 }
    }

    #[test]
    fn queues_keep_arrival_order_and_count() {
        let mut p = Pending::default();
        p.push("a.b", msg(1));
        p.push("a.b", msg(2));
        p.push("c.d", msg(3));
        assert_eq!(p.count(), 3);
        assert!(p.has_any(&["x.y".into(), "c.d".into()]));
        let q: Vec<u32> = p
            .take("a.b")
            .iter()
            .map(|w| w.call().primary_header().serial_num().get())
            .collect();
        assert_eq!(q, [1, 2]);
        assert_eq!(p.count(), 1);
        assert!(p.take("a.b").is_empty());
        assert!(!p.has_any(&["a.b".into()]));
    }

    #[test]
    fn held_peers() {
        let mut p = Pending::default();
        assert!(!p.is_held(4));
        p.hold(4, true);
        assert!(p.is_held(4) && !p.is_held(5));
        p.hold(4, false);
        assert!(!p.is_held(4));
    }
}
