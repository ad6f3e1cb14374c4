//! One connected client as the bus knows it: its id, credentials, outbox
//! and the few facts routing needs about it.

use std::sync::Arc;
use std::time::Instant;

use super::outbox::{Cutter, Outbox};
use crate::bus::matching::MatchRule;

/// A connection's number; its unique name is `:1.<id>`.
pub type PeerId = u64;

/// The unique name of a peer.
pub fn unique_name(id: PeerId) -> String {
    format!(":1.{id}")
}

/// The peer id behind a unique name of this bus, if it is one.
pub fn parse_unique_name(name: &str) -> Option<PeerId> {
    name.strip_prefix(":1.")?.parse().ok()
}

/// Credentials read from the socket when the peer connected.
#[derive(Debug, Default, Clone, Copy)]
pub struct Credentials {
    pub uid: Option<u32>,
    /// Primary gid; the supplementary groups are read when asked for.
    pub gid: Option<u32>,
    pub pid: Option<u32>,
}

pub(crate) struct PeerEntry {
    pub(crate) outbox: Arc<Outbox>,
    pub(crate) cutter: Arc<Cutter>,
    pub(crate) creds: Credentials,
    pub(crate) hello: bool,
    /// Some once the peer became a monitor: its rules (empty = everything).
    pub(crate) monitor: Option<Vec<MatchRule>>,
    pub(crate) eavesdrop_rules: usize,
    /// Whether anyone asked for `last_activity` (a supervised service's
    /// connection): only those pay for the clock read per message.
    pub(crate) watched: bool,
    /// When a message last went to or from this peer, if watched.
    pub(crate) last_activity: Instant,
}

impl PeerEntry {
    pub(crate) fn new(outbox: Arc<Outbox>, cutter: Arc<Cutter>, creds: Credentials) -> Self {
        PeerEntry {
            outbox,
            cutter,
            creds,
            hello: false,
            monitor: None,
            eavesdrop_rules: 0,
            watched: false,
            last_activity: Instant::now(),
        }
    }

    /// A registered connection that is not a monitor: it has a unique name
    /// others can see and address.
    pub(crate) fn is_addressable(&self) -> bool {
        self.hello && self.monitor.is_none()
    }

    pub(crate) fn touch(&mut self) {
        if self.watched {
            self.last_activity = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_round_trip() {
        assert_eq!(unique_name(0), ":1.0");
        assert_eq!(parse_unique_name(":1.42"), Some(42));
        assert_eq!(parse_unique_name(":2.1"), None);
        assert_eq!(parse_unique_name("org.a.B"), None);
    }
}
