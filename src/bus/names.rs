//! The well-known name registry: owners, queues and the flags of
//! RequestName, with dbus-daemon's exact rules (bus/services.c).
//!
//! Operations return the [`NameChange`]s they caused, in the order the bus
//! must announce them; the router turns them into NameOwnerChanged,
//! NameLost and NameAcquired messages.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Bound;

use super::peer::PeerId;

pub const ALLOW_REPLACEMENT: u32 = 0x1;
pub const REPLACE_EXISTING: u32 = 0x2;
pub const DO_NOT_QUEUE: u32 = 0x4;

pub const PRIMARY_OWNER: u32 = 1;
pub const IN_QUEUE: u32 = 2;
pub const EXISTS: u32 = 3;
pub const ALREADY_OWNER: u32 = 4;

pub const RELEASED: u32 = 1;
pub const NON_EXISTENT: u32 = 2;
pub const NOT_OWNER: u32 = 3;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameChange {
    OwnerChanged {
        name: String,
        old: Option<PeerId>,
        new: Option<PeerId>,
    },
    Lost {
        peer: PeerId,
        name: String,
    },
    Acquired {
        peer: PeerId,
        name: String,
    },
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    peer: PeerId,
    flags: u32,
}

/// Owners of each well-known name: the first entry is the primary owner.
#[derive(Default)]
pub struct Names {
    queues: HashMap<String, VecDeque<Entry>>,
    /// The names each peer owns or waits for, each with the number of its
    /// joining: a lookup, a change and a prefix search are O(log n) however
    /// many names a peer holds, and a leaving peer's names go in
    /// dbus-daemon's order (the last joined first).
    per_peer: HashMap<PeerId, BTreeMap<String, u64>>,
    joined: u64,
}

/// The well-known names one peer owns or is queued for.
#[derive(Clone, Copy)]
pub struct Owned<'a>(Option<&'a BTreeMap<String, u64>>);

impl<'a> Owned<'a> {
    /// In name order.
    pub fn iter(self) -> impl Iterator<Item = &'a String> {
        self.0.into_iter().flat_map(BTreeMap::keys)
    }

    /// O(log n).
    pub fn contains(self, name: &str) -> bool {
        self.0.is_some_and(|m| m.contains_key(name))
    }

    /// Whether one is `prefix` or below it (`prefix.` and more), as the
    /// policy's prefix rules match: O(log n), plus the names that continue
    /// `prefix` with a '-' (the only character of a bus name that sorts
    /// before '.').
    pub fn any_under(self, prefix: &str) -> bool {
        let Some(m) = self.0 else {
            return false;
        };
        let after = (Bound::Included(prefix), Bound::Unbounded);
        m.range::<str, _>(after)
            .map(|(n, _)| n.as_bytes())
            .take_while(|n| n.starts_with(prefix.as_bytes()) && n.get(prefix.len()) <= Some(&b'.'))
            .any(|n| matches!(n.get(prefix.len()), None | Some(b'.')))
    }

    pub fn len(self) -> usize {
        self.0.map_or(0, BTreeMap::len)
    }
}

impl Names {
    pub fn owner(&self, name: &str) -> Option<PeerId> {
        self.queues
            .get(name)
            .and_then(|q| q.front())
            .map(|e| e.peer)
    }

    pub fn is_primary(&self, name: &str, peer: PeerId) -> bool {
        self.owner(name) == Some(peer)
    }

    /// All names with an owner.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.queues.keys().map(String::as_str)
    }

    /// The primary owner and the queue behind it.
    pub fn queued(&self, name: &str) -> Vec<PeerId> {
        self.queues
            .get(name)
            .map(|q| q.iter().map(|e| e.peer).collect())
            .unwrap_or_default()
    }

    /// The well-known names a peer owns or is queued for.
    pub fn of(&self, peer: PeerId) -> Owned<'_> {
        Owned(self.per_peer.get(&peer))
    }

    /// Names a peer owns or is queued for.
    pub fn count_for(&self, peer: PeerId) -> usize {
        self.of(peer).len()
    }

    fn link(&mut self, peer: PeerId, name: &str) {
        let v = self.per_peer.entry(peer).or_default();
        if !v.contains_key(name) {
            self.joined += 1;
            v.insert(name.to_owned(), self.joined);
        }
    }

    fn unlink(&mut self, peer: PeerId, name: &str) {
        if let Some(v) = self.per_peer.get_mut(&peer) {
            v.remove(name);
            if v.is_empty() {
                self.per_peer.remove(&peer);
            }
        }
    }

    /// RequestName; the name has been validated by the caller.
    pub fn request(&mut self, name: &str, peer: PeerId, flags: u32) -> (u32, Vec<NameChange>) {
        let mut changes = Vec::new();
        let Some(queue) = self.queues.get_mut(name) else {
            self.queues
                .insert(name.to_owned(), VecDeque::from([Entry { peer, flags }]));
            self.link(peer, name);
            changes.push(NameChange::OwnerChanged {
                name: name.to_owned(),
                old: None,
                new: Some(peer),
            });
            changes.push(NameChange::Acquired {
                peer,
                name: name.to_owned(),
            });
            return (PRIMARY_OWNER, changes);
        };
        let primary = queue[0];
        if primary.peer == peer {
            queue[0].flags = flags;
            return (ALREADY_OWNER, changes);
        }
        let allow_replacement = primary.flags & ALLOW_REPLACEMENT != 0;
        let do_not_queue = flags & DO_NOT_QUEUE != 0;
        let replace = flags & REPLACE_EXISTING != 0;
        let position = queue.iter().position(|e| e.peer == peer);
        if do_not_queue && (!allow_replacement || !replace) {
            // Asked not to wait and cannot replace: leave any old place in the queue.
            if let Some(i) = position {
                queue.remove(i);
                self.unlink(peer, name);
            }
            return (EXISTS, changes);
        }
        if !do_not_queue && (!replace || !allow_replacement) {
            match position {
                Some(i) => queue[i].flags = flags,
                // A would-be replacer waits right behind the owner (dbus-daemon's order).
                None if replace => {
                    queue.insert(1, Entry { peer, flags });
                    self.link(peer, name);
                }
                None => {
                    queue.push_back(Entry { peer, flags });
                    self.link(peer, name);
                }
            }
            return (IN_QUEUE, changes);
        }
        // Replace the primary owner.
        if let Some(i) = position {
            queue.remove(i);
        }
        let old = queue.pop_front().expect("queue has a primary owner");
        queue.push_front(Entry { peer, flags });
        let old_dropped = old.flags & DO_NOT_QUEUE != 0;
        if !old_dropped {
            queue.insert(1, old);
        }
        if old_dropped {
            self.unlink(old.peer, name);
        }
        self.link(peer, name);
        changes.push(NameChange::OwnerChanged {
            name: name.to_owned(),
            old: Some(old.peer),
            new: Some(peer),
        });
        changes.push(NameChange::Lost {
            peer: old.peer,
            name: name.to_owned(),
        });
        changes.push(NameChange::Acquired {
            peer,
            name: name.to_owned(),
        });
        (PRIMARY_OWNER, changes)
    }

    /// ReleaseName.
    pub fn release(&mut self, name: &str, peer: PeerId) -> (u32, Vec<NameChange>) {
        let Some(queue) = self.queues.get(name) else {
            return (NON_EXISTENT, Vec::new());
        };
        if !queue.iter().any(|e| e.peer == peer) {
            return (NOT_OWNER, Vec::new());
        }
        (RELEASED, self.remove_from(name, peer))
    }

    fn remove_from(&mut self, name: &str, peer: PeerId) -> Vec<NameChange> {
        let mut changes = Vec::new();
        let Some(queue) = self.queues.get_mut(name) else {
            return changes;
        };
        let Some(i) = queue.iter().position(|e| e.peer == peer) else {
            return changes;
        };
        queue.remove(i);
        let next = queue.front().map(|e| e.peer);
        if queue.is_empty() {
            self.queues.remove(name);
        }
        self.unlink(peer, name);
        if i == 0 {
            // dbus-daemon's order when an owner goes (bus_service_remove_owner):
            // NameLost, then NameOwnerChanged, then the next owner's
            // NameAcquired.
            changes.push(NameChange::Lost {
                peer,
                name: name.to_owned(),
            });
            changes.push(NameChange::OwnerChanged {
                name: name.to_owned(),
                old: Some(peer),
                new: next,
            });
            if let Some(next) = next {
                changes.push(NameChange::Acquired {
                    peer: next,
                    name: name.to_owned(),
                });
            }
        }
        changes
    }

    /// Drop a peer from every name it owns or waits for (disconnect, or
    /// becoming a monitor).
    pub fn remove_peer(&mut self, peer: PeerId) -> Vec<NameChange> {
        let Some(names) = self.per_peer.remove(&peer) else {
            return Vec::new();
        };
        // dbus-daemon's order: the name joined last goes first.
        let mut names: Vec<(u64, String)> = names.into_iter().map(|(n, j)| (j, n)).collect();
        names.sort_unstable_by_key(|(j, _)| std::cmp::Reverse(*j));
        let mut changes = Vec::new();
        for (_, name) in names {
            changes.extend(self.remove_from(&name, peer));
        }
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_request_owns() {
        let mut n = Names::default();
        let (r, c) = n.request("a.b", 1, 0);
        assert_eq!(r, PRIMARY_OWNER);
        assert_eq!(c.len(), 2);
        assert_eq!(n.owner("a.b"), Some(1));
        assert_eq!(n.request("a.b", 1, 0).0, ALREADY_OWNER);
    }

    #[test]
    fn queueing_and_release_hands_over() {
        let mut n = Names::default();
        n.request("a.b", 1, 0);
        assert_eq!(n.request("a.b", 2, 0).0, IN_QUEUE);
        assert_eq!(n.queued("a.b"), vec![1, 2]);
        let (r, c) = n.release("a.b", 1);
        assert_eq!(r, RELEASED);
        // dbus-daemon's order: NameLost, NameOwnerChanged, NameAcquired.
        assert_eq!(
            c,
            [
                NameChange::Lost {
                    peer: 1,
                    name: "a.b".into()
                },
                NameChange::OwnerChanged {
                    name: "a.b".into(),
                    old: Some(1),
                    new: Some(2)
                },
                NameChange::Acquired {
                    peer: 2,
                    name: "a.b".into()
                },
            ]
        );
        assert_eq!(n.owner("a.b"), Some(2));
        assert_eq!(n.release("a.b", 1).0, NOT_OWNER);
        assert_eq!(n.release("x.y", 1).0, NON_EXISTENT);
    }

    #[test]
    fn replacement_rules() {
        let mut n = Names::default();
        n.request("a.b", 1, 0);
        n.request("a.b", 4, 0);
        // Owner does not allow replacement: queued right behind it.
        assert_eq!(n.request("a.b", 2, REPLACE_EXISTING).0, IN_QUEUE);
        assert_eq!(n.queued("a.b"), vec![1, 2, 4]);
        assert_eq!(
            n.request("a.b", 3, REPLACE_EXISTING | DO_NOT_QUEUE).0,
            EXISTS
        );
        // Owner allows it now.
        n.request("a.b", 1, ALLOW_REPLACEMENT);
        assert_eq!(n.request("a.b", 3, REPLACE_EXISTING).0, PRIMARY_OWNER);
        // Old owner moved to second place.
        assert_eq!(n.queued("a.b"), vec![3, 1, 2, 4]);
    }

    #[test]
    fn replaced_do_not_queue_owner_is_dropped() {
        let mut n = Names::default();
        n.request("a.b", 1, ALLOW_REPLACEMENT | DO_NOT_QUEUE);
        assert_eq!(n.request("a.b", 2, REPLACE_EXISTING).0, PRIMARY_OWNER);
        assert_eq!(n.queued("a.b"), vec![2]);
        assert_eq!(n.count_for(1), 0);
    }

    #[test]
    fn do_not_queue_leaves_queue() {
        let mut n = Names::default();
        n.request("a.b", 1, 0);
        n.request("a.b", 2, 0);
        assert_eq!(n.request("a.b", 2, DO_NOT_QUEUE).0, EXISTS);
        assert_eq!(n.queued("a.b"), vec![1]);
    }

    #[test]
    fn remove_peer_cleans_everything() {
        let mut n = Names::default();
        n.request("a.b", 1, 0);
        n.request("c.d", 1, 0);
        n.request("c.d", 2, 0);
        let c = n.remove_peer(1);
        assert!(c.contains(&NameChange::Acquired {
            peer: 2,
            name: "c.d".into()
        }));
        assert_eq!(n.owner("a.b"), None);
        assert_eq!(n.owner("c.d"), Some(2));
        assert_eq!(n.count_for(1), 0);
    }

    #[test]
    fn a_peers_names_are_looked_up_not_scanned() {
        let mut n = Names::default();
        for name in ["a.b", "a.b-c.d", "a.bc", "a.b.c.d", "x.y"] {
            n.request(name, 1, 0);
        }
        let of = n.of(1);
        assert_eq!(of.len(), 5);
        assert!(of.contains("a.bc") && !of.contains("a"));
        assert!(of.any_under("a.b") && of.any_under("a") && of.any_under("a.b.c"));
        assert!(!of.any_under("a.b-c.d.e") && !of.any_under("a.bcd") && !of.any_under("z"));
        assert!(of.any_under("a.b-c") && !n.of(2).any_under("a"));
        n.release("a.b", 1);
        n.release("a.b.c.d", 1);
        assert!(!n.of(1).any_under("a.b"));
        assert_eq!(
            n.of(1).iter().collect::<Vec<_>>(),
            ["a.b-c.d", "a.bc", "x.y"]
        );
    }

    #[test]
    fn a_leaving_peers_names_go_last_joined_first() {
        let mut n = Names::default();
        for name in ["c.c", "a.a", "b.b"] {
            n.request(name, 1, 0);
        }
        let lost: Vec<String> = n
            .remove_peer(1)
            .into_iter()
            .filter_map(|c| match c {
                NameChange::Lost { name, .. } => Some(name),
                _ => None,
            })
            .collect();
        assert_eq!(lost, ["b.b", "a.a", "c.c"]);
    }
}
