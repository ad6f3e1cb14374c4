//! One connected client as the bus knows it: its id, credentials, outbox
//! and the few facts routing needs about it.

use std::sync::Arc;
use std::time::Instant;

use super::outbox::{Cutter, Outbox};
use crate::bus::matching::MatchRule;

/// A connection's number; its unique name is `:1.<id>`.
pub type PeerId = u64;

/// The hasher of maps keyed by `PeerId`. Ids are the bus's own sequence
/// numbers, never chosen by a peer, so SipHash's resistance to keys made to
/// collide buys nothing there and costs about 140 instructions a lookup,
/// several per message; one multiply spreads them over a table's bits.
#[derive(Default, Clone, Copy)]
pub(crate) struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

/// A map keyed by `PeerId`.
pub(crate) type IdMap<V> =
    std::collections::HashMap<PeerId, V, std::hash::BuildHasherDefault<IdHasher>>;

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

/// Who a connection is, as the transport learnt it before the peer joins
/// (so that no lookup happens under the bus lock).
#[derive(Debug, Default, Clone)]
pub(crate) struct Identity {
    pub(crate) creds: Credentials,
    /// The process's groups, sorted: primary and supplementary.
    pub(crate) groups: Box<[u32]>,
    /// `uid=N pid=N comm="..."`, as dbus-daemon logs and quotes a peer.
    pub(crate) loginfo: Box<str>,
}

impl Identity {
    /// dbus-daemon's loginfo: `uid=N pid=N comm="CMDLINE"`, the command
    /// line cut at 50 bytes with non-printable bytes as spaces.
    pub(crate) fn loginfo(creds: &Credentials, cmdline: Option<&[u8]>) -> String {
        let mut parts = Vec::new();
        if let Some(uid) = creds.uid {
            parts.push(format!("uid={uid}"));
        }
        if let Some(pid) = creds.pid {
            let mut cmd = cmdline.unwrap_or_default();
            cmd = &cmd[..cmd.len().min(50)];
            if let Some(stripped) = cmd.strip_suffix(b"\0") {
                cmd = stripped;
            }
            let comm: String = cmd
                .iter()
                .map(|&b| {
                    if (0x20..0x7f).contains(&b) {
                        b as char
                    } else {
                        ' '
                    }
                })
                .collect();
            parts.push(format!("pid={pid} comm=\"{comm}\""));
        }
        parts.join(" ")
    }
}

pub(crate) struct PeerEntry {
    pub(crate) outbox: Arc<Outbox>,
    pub(crate) cutter: Arc<Cutter>,
    pub(crate) creds: Credentials,
    pub(crate) groups: Box<[u32]>,
    pub(crate) loginfo: Box<str>,
    /// Its share of the bus policy, from its Hello on.
    pub(crate) policy: Option<crate::policy::check::ClientPolicy>,
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
    pub(crate) fn new(outbox: Arc<Outbox>, cutter: Arc<Cutter>, who: Identity) -> Self {
        PeerEntry {
            outbox,
            cutter,
            creds: who.creds,
            groups: who.groups,
            loginfo: who.loginfo,
            policy: None,
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
    #[test]
    fn sequential_ids_spread_over_a_table() {
        use std::hash::BuildHasher;
        let build = std::hash::BuildHasherDefault::<IdHasher>::default();
        let hashes: Vec<u64> = (1..=1024u64).map(|id| build.hash_one(id)).collect();
        let distinct: std::collections::HashSet<u64> = hashes.iter().copied().collect();
        assert_eq!(distinct.len(), hashes.len());
        // hashbrown indexes by the low bits and tags by the top 7: both vary.
        let low: std::collections::HashSet<u64> = hashes.iter().map(|h| h & 1023).collect();
        let top: std::collections::HashSet<u64> = hashes.iter().map(|h| h >> 57).collect();
        assert!(
            low.len() > 600 && top.len() > 100,
            "{} {}",
            low.len(),
            top.len()
        );
        let mut map = IdMap::default();
        map.insert(7, "seven");
        assert_eq!(map.get(&7), Some(&"seven"));
    }

    use super::*;

    #[test]
    fn loginfo_as_dbus_daemon_writes_it() {
        let creds = Credentials {
            uid: Some(1000),
            gid: Some(1000),
            pid: Some(42),
        };
        let info = Identity::loginfo(&creds, Some(b"/bin/sleep\x0060\0"));
        assert_eq!(info, "uid=1000 pid=42 comm=\"/bin/sleep 60\"");
        let long = [b'x'; 80];
        let info = Identity::loginfo(&creds, Some(&long));
        assert_eq!(info, format!("uid=1000 pid=42 comm=\"{}\"", "x".repeat(50)));
        assert_eq!(Identity::loginfo(&creds, None), "uid=1000 pid=42 comm=\"\"");
        let no_pid = Credentials { pid: None, ..creds };
        assert_eq!(Identity::loginfo(&no_pid, None), "uid=1000");
    }

    #[test]
    fn unique_names_round_trip() {
        assert_eq!(unique_name(0), ":1.0");
        assert_eq!(parse_unique_name(":1.42"), Some(42));
        assert_eq!(parse_unique_name(":2.1"), None);
        assert_eq!(parse_unique_name("org.a.B"), None);
    }
}
