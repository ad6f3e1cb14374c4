//! The replies the bus expects: which peer may answer which call.
//!
//! A slot belongs to both of its peers, as in dbus-broker's `ReplySlot`:
//! the caller waits for it and the callee owes it. Each peer's own slots are
//! indexed, so a peer that leaves touches only its own entries, and "how
//! many calls wait for this peer" is a lookup, not a scan of the bus.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use super::peer::{IdMap, PeerId};

/// One expected reply: the caller and the serial of its call.
pub(crate) type Slot = (PeerId, u32);

#[derive(Default)]
pub(crate) struct ReplyRegistry {
    /// (caller, serial) -> the callee that may answer, and the slot's
    /// number (which tells a slot from a later one with the same serial).
    slots: HashMap<Slot, (PeerId, u64)>,
    /// Per caller, the serials it waits for.
    waiting: IdMap<HashSet<u32>>,
    /// Per callee, the slots it owes.
    owed: IdMap<HashSet<Slot>>,
    /// `reply_timeout`, when calls time out at all.
    timeout: Option<Duration>,
    /// With a timeout: every slot's deadline, in order (one timeout for all
    /// makes insertion order deadline order). Answered slots stay until
    /// their deadline passes and are skipped then.
    deadlines: VecDeque<(Instant, Slot, u64)>,
    next_number: u64,
}

/// What a leaving peer leaves behind: calls to it that will never be
/// answered, whose callers the bus must tell.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Orphans(pub(crate) Vec<Slot>);

impl ReplyRegistry {
    /// A registry whose calls get NoReply after `timeout` (None: never).
    pub(crate) fn new(timeout: Option<Duration>) -> Self {
        ReplyRegistry {
            timeout,
            ..ReplyRegistry::default()
        }
    }

    /// Calls `caller` still waits for.
    pub(crate) fn waiting_count(&self, caller: PeerId) -> usize {
        self.waiting.get(&caller).map_or(0, HashSet::len)
    }

    /// Calls that wait for `callee` to answer.
    pub(crate) fn owed_count(&self, callee: PeerId) -> usize {
        self.owed.get(&callee).map_or(0, HashSet::len)
    }

    /// Expect a reply from `callee` to `caller`'s call `serial`. A serial
    /// reused while its first call waits keeps one slot, for the new callee.
    /// True when this call's deadline is now the earliest (a timer waiting
    /// for none should wake).
    pub(crate) fn expect(&mut self, caller: PeerId, serial: u32, callee: PeerId) -> bool {
        self.next_number += 1;
        let number = self.next_number;
        if let Some((old, _)) = self.slots.insert((caller, serial), (callee, number)) {
            remove_from(&mut self.owed, old, &(caller, serial));
        }
        let mut earliest = false;
        if let Some(t) = self.timeout {
            earliest = self.deadlines.is_empty();
            let at = Instant::now() + t;
            self.deadlines.push_back((at, (caller, serial), number));
        }
        self.waiting.entry(caller).or_default().insert(serial);
        self.owed
            .entry(callee)
            .or_default()
            .insert((caller, serial));
        earliest
    }

    /// `replier` answers `caller`'s call `serial`: true, and the slot is
    /// gone, when that reply was expected from it.
    pub(crate) fn take(&mut self, caller: PeerId, serial: u32, replier: PeerId) -> bool {
        match self.slots.entry((caller, serial)) {
            Entry::Occupied(e) if e.get().0 == replier => e.remove(),
            _ => return false,
        };
        remove_from(&mut self.waiting, caller, &serial);
        remove_from(&mut self.owed, replier, &(caller, serial));
        true
    }

    /// `peer` leaves: its own calls need no answer any more, and the calls
    /// it owed are returned, to be answered with NoReply.
    pub(crate) fn remove_peer(&mut self, peer: PeerId) -> Orphans {
        for serial in self.waiting.remove(&peer).unwrap_or_default() {
            if let Some((callee, _)) = self.slots.remove(&(peer, serial)) {
                remove_from(&mut self.owed, callee, &(peer, serial));
            }
        }
        let mut orphans: Vec<Slot> = self
            .owed
            .remove(&peer)
            .unwrap_or_default()
            .into_iter()
            .collect();
        for (caller, serial) in &orphans {
            self.slots.remove(&(*caller, *serial));
            remove_from(&mut self.waiting, *caller, serial);
        }
        orphans.sort_unstable();
        Orphans(orphans)
    }

    /// When the earliest pending call times out (it may have been answered
    /// meanwhile: then `expire` finds nothing).
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.front().map(|(at, ..)| *at)
    }

    /// The calls whose reply did not come by `now`: their slots are gone,
    /// and their callers are to be told.
    pub(crate) fn expire(&mut self, now: Instant) -> Vec<Slot> {
        let mut expired = Vec::new();
        while let Some(&(at, slot, number)) = self.deadlines.front() {
            if at > now {
                break;
            }
            self.deadlines.pop_front();
            if let Entry::Occupied(e) = self.slots.entry(slot)
                && e.get().1 == number
            {
                let (callee, _) = e.remove();
                remove_from(&mut self.waiting, slot.0, &slot.1);
                remove_from(&mut self.owed, callee, &slot);
                expired.push(slot);
            }
        }
        expired
    }
}

/// Remove `value` from `key`'s set. An emptied set stays until its peer
/// leaves, so that a peer's next call allocates nothing.
fn remove_from<V: std::hash::Hash + Eq>(map: &mut IdMap<HashSet<V>>, key: PeerId, value: &V) {
    if let Some(set) = map.get_mut(&key) {
        set.remove(value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_is_taken_once_and_only_from_the_callee() {
        let mut r = ReplyRegistry::default();
        r.expect(1, 10, 2);
        assert_eq!((r.waiting_count(1), r.owed_count(2)), (1, 1));
        assert!(!r.take(1, 10, 3), "a third peer may not answer");
        assert!(!r.take(1, 11, 2), "another serial was not asked");
        assert!(r.take(1, 10, 2));
        assert!(!r.take(1, 10, 2), "answered already");
        assert_eq!((r.waiting_count(1), r.owed_count(2)), (0, 0));
    }

    #[test]
    fn a_leaving_callee_orphans_only_its_calls() {
        let mut r = ReplyRegistry::default();
        r.expect(1, 10, 2);
        r.expect(3, 5, 2);
        r.expect(1, 11, 4);
        assert_eq!(r.remove_peer(2), Orphans(vec![(1, 10), (3, 5)]));
        assert_eq!(r.waiting_count(1), 1);
        assert_eq!(r.waiting_count(3), 0);
        assert!(r.take(1, 11, 4), "the call to another peer still stands");
    }

    #[test]
    fn a_leaving_caller_needs_no_answers() {
        let mut r = ReplyRegistry::default();
        r.expect(1, 10, 2);
        r.expect(1, 12, 3);
        assert_eq!(r.remove_peer(1), Orphans(Vec::new()));
        assert_eq!((r.owed_count(2), r.owed_count(3)), (0, 0));
        assert!(!r.take(1, 10, 2));
        assert!(r.slots.is_empty() && !r.waiting.contains_key(&1) && !r.owed.contains_key(&1));
    }

    #[test]
    fn unanswered_calls_expire_in_order_and_answered_ones_do_not() {
        let t = Duration::from_millis(100);
        let mut r = ReplyRegistry::new(Some(t));
        let start = Instant::now();
        r.expect(1, 10, 2);
        r.expect(1, 11, 2);
        r.expect(3, 5, 2);
        assert!(r.take(1, 11, 2));
        assert!(r.next_deadline().is_some_and(|d| d >= start + t));
        assert!(r.expire(start).is_empty(), "nothing is due yet");
        let later = Instant::now() + t;
        assert_eq!(r.expire(later), [(1, 10), (3, 5)]);
        assert_eq!((r.waiting_count(1), r.owed_count(2)), (0, 0));
        assert!(r.next_deadline().is_none());
        // A serial reused after its slot expired gets a deadline of its own.
        r.expect(1, 10, 2);
        assert!(r.expire(later).is_empty());
        assert!(r.take(1, 10, 2));
    }

    #[test]
    fn without_a_timeout_nothing_expires() {
        let mut r = ReplyRegistry::new(None);
        r.expect(1, 10, 2);
        assert!(r.next_deadline().is_none());
        assert!(
            r.expire(Instant::now() + Duration::from_secs(3600))
                .is_empty()
        );
    }

    #[test]
    fn a_reused_serial_moves_to_the_new_callee() {
        let mut r = ReplyRegistry::default();
        r.expect(1, 10, 2);
        r.expect(1, 10, 3);
        assert_eq!(
            (r.waiting_count(1), r.owed_count(2), r.owed_count(3)),
            (1, 0, 1)
        );
        assert!(!r.take(1, 10, 2));
        assert!(r.take(1, 10, 3));
    }
}
