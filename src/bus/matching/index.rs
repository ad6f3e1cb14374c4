//! [`MatchIndex`]: the rules of all connections, bucketed so that finding a message's
//! subscribers tests few of them.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;

use super::{MatchRule, MessageInfo, Owners};
use crate::wire::args::Arg;

/// The rules of many subscribers, indexed so that finding the subscribers of a message tests few
/// of them.
///
/// Each rule goes in one bucket, by the most selective key it has: `member`, else `interface`,
/// else `sender`, else the wildcard bucket; within a bucket, rules with an `arg0` string match
/// are indexed by it. Identical rules of different subscribers are stored (and tested) once.
#[derive(Debug)]
pub struct MatchIndex<K: Copy + Eq + Hash> {
    entries: Vec<Option<Entry<K>>>,
    free: Vec<usize>,
    by_rule: HashMap<MatchRule, usize>,
    keys: HashMap<K, KeyRules>,
    members: HashMap<Box<str>, Bucket>,
    interfaces: HashMap<Box<str>, Bucket>,
    senders: HashMap<Box<str>, Bucket>,
    /// How many keys of `senders` are not unique names.
    well_known_senders: usize,
    wildcard: Bucket,
}

/// Below this many slots the index never compacts.
const ROOM: usize = 64;

#[derive(Debug)]
struct Entry<K> {
    rule: MatchRule,
    /// Subscribers holding this rule, and how many times each added it.
    subs: Vec<(K, usize)>,
}

#[derive(Debug, Default)]
struct KeyRules {
    /// Rules held, duplicates included.
    total: usize,
    /// Entries holding this key.
    slots: Vec<usize>,
}

#[derive(Debug, Default)]
struct Bucket {
    by_arg0: HashMap<Box<str>, Vec<usize>>,
    rest: Vec<usize>,
}

impl Bucket {
    fn insert(&mut self, slot: usize, arg0: Option<&str>) {
        match arg0 {
            Some(a) => self.by_arg0.entry(a.into()).or_default().push(slot),
            None => self.rest.push(slot),
        }
    }

    fn remove(&mut self, slot: usize, arg0: Option<&str>) {
        let list = match arg0 {
            Some(a) => match self.by_arg0.get_mut(a) {
                Some(list) => list,
                None => return,
            },
            None => &mut self.rest,
        };
        if let Some(i) = list.iter().position(|s| *s == slot) {
            list.swap_remove(i);
        }
        if let Some(a) = arg0
            && list.is_empty()
        {
            self.by_arg0.remove(a);
        }
    }

    fn is_empty(&self) -> bool {
        self.by_arg0.is_empty() && self.rest.is_empty()
    }
}

#[derive(Clone, Copy)]
enum Place<'r> {
    Member(&'r str),
    Interface(&'r str),
    Sender(&'r str),
    Wildcard,
}

fn place(rule: &MatchRule) -> Place<'_> {
    if let Some(m) = rule.member() {
        Place::Member(m)
    } else if let Some(i) = rule.interface() {
        Place::Interface(i)
    } else if let Some(s) = rule.sender() {
        Place::Sender(s)
    } else {
        Place::Wildcard
    }
}

/// Keys already visited during one [`MatchIndex::for_each_match`]: a few inline, then a set.
struct Seen<K> {
    inline: [Option<K>; 16],
    len: usize,
    spill: Option<HashSet<K>>,
}

impl<K: Copy + Eq + Hash> Seen<K> {
    fn new() -> Self {
        Seen {
            inline: [None; 16],
            len: 0,
            spill: None,
        }
    }

    fn contains(&self, k: K) -> bool {
        self.inline
            .get(..self.len)
            .is_some_and(|s| s.contains(&Some(k)))
            || self.spill.as_ref().is_some_and(|s| s.contains(&k))
    }

    fn insert(&mut self, k: K) {
        if let Some(slot) = self.inline.get_mut(self.len) {
            *slot = Some(k);
            self.len += 1;
        } else {
            self.spill.get_or_insert_with(HashSet::new).insert(k);
        }
    }
}

struct Search<'a, 'm, K, F, V> {
    entries: &'a [Option<Entry<K>>],
    info: &'a MessageInfo<'m>,
    owners: &'a dyn Owners,
    filter: F,
    visit: V,
    seen: Seen<K>,
}

impl<K, F, V> Search<'_, '_, K, F, V>
where
    K: Copy + Eq + Hash,
    F: FnMut(K, &MatchRule) -> bool,
    V: FnMut(K),
{
    fn bucket(&mut self, bucket: &Bucket) {
        self.slots(&bucket.rest);
        if !bucket.by_arg0.is_empty()
            && let Some(Arg {
                value,
                is_path: false,
            }) = self.info.arg(0)
            && let Some(slots) = bucket.by_arg0.get(value)
        {
            self.slots(slots);
        }
    }

    fn slots(&mut self, slots: &[usize]) {
        for &slot in slots {
            let Some(Some(entry)) = self.entries.get(slot) else {
                continue;
            };
            if entry.subs.iter().all(|(k, _)| self.seen.contains(*k)) {
                continue;
            }
            if !entry.rule.matches(self.info, self.owners) {
                continue;
            }
            for &(k, _) in &entry.subs {
                if !self.seen.contains(k) && (self.filter)(k, &entry.rule) {
                    self.seen.insert(k);
                    (self.visit)(k);
                }
            }
        }
    }
}

impl<K: Copy + Eq + Hash> Default for MatchIndex<K> {
    fn default() -> Self {
        MatchIndex {
            entries: Vec::new(),
            free: Vec::new(),
            by_rule: HashMap::new(),
            keys: HashMap::new(),
            members: HashMap::new(),
            interfaces: HashMap::new(),
            senders: HashMap::new(),
            well_known_senders: 0,
            wildcard: Bucket::default(),
        }
    }
}

impl<K: Copy + Eq + Hash> MatchIndex<K> {
    #[cfg(test)]
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    fn bucket_mut(&mut self, place: Place<'_>, create: bool) -> Option<&mut Bucket> {
        let (map, name) = match place {
            Place::Member(n) => (&mut self.members, n),
            Place::Interface(n) => (&mut self.interfaces, n),
            Place::Sender(n) => (&mut self.senders, n),
            Place::Wildcard => return Some(&mut self.wildcard),
        };
        if create && !map.contains_key(name) {
            if matches!(place, Place::Sender(_)) && !name.starts_with(':') {
                self.well_known_senders += 1;
            }
            return Some(map.entry(name.into()).or_default());
        }
        map.get_mut(name)
    }

    fn drop_bucket_if_empty(&mut self, place: Place<'_>) {
        let (map, name) = match place {
            Place::Member(n) => (&mut self.members, n),
            Place::Interface(n) => (&mut self.interfaces, n),
            Place::Sender(n) => (&mut self.senders, n),
            Place::Wildcard => return,
        };
        if map.get(name).is_some_and(Bucket::is_empty) {
            map.remove(name);
            if matches!(place, Place::Sender(_)) && !name.starts_with(':') {
                self.well_known_senders -= 1;
            }
        }
    }

    /// Adds `rule` for `key`. Adding the same rule again for the same key needs one more
    /// [`MatchIndex::remove`] to remove it.
    pub fn add(&mut self, key: K, rule: MatchRule) {
        let slot = match self.by_rule.get(&rule) {
            Some(&slot) => slot,
            None => {
                let entry = Entry {
                    rule: rule.clone(),
                    subs: Vec::new(),
                };
                let slot = match self.free.pop() {
                    Some(slot) => {
                        if let Some(e) = self.entries.get_mut(slot) {
                            *e = Some(entry);
                        }
                        slot
                    }
                    None => {
                        self.entries.push(Some(entry));
                        self.entries.len() - 1
                    }
                };
                if let Some(bucket) = self.bucket_mut(place(&rule), true) {
                    bucket.insert(slot, rule.arg0());
                }
                self.by_rule.insert(rule, slot);
                slot
            }
        };
        let Some(Some(entry)) = self.entries.get_mut(slot) else {
            return;
        };
        let key_rules = self.keys.entry(key).or_default();
        key_rules.total += 1;
        match entry.subs.iter_mut().find(|(k, _)| *k == key) {
            Some((_, n)) => *n += 1,
            None => {
                entry.subs.push((key, 1));
                key_rules.slots.push(slot);
            }
        }
    }

    /// Removes one instance of `rule` (or an equal one) from `key`'s rules; `false` if `key`
    /// holds no such rule.
    pub fn remove(&mut self, key: K, rule: &MatchRule) -> bool {
        let Some(&slot) = self.by_rule.get(rule) else {
            return false;
        };
        let Some(Some(entry)) = self.entries.get_mut(slot) else {
            return false;
        };
        let Some(i) = entry.subs.iter().position(|(k, _)| *k == key) else {
            return false;
        };
        let mut last_of_key = false;
        if let Some((_, n)) = entry.subs.get_mut(i) {
            *n -= 1;
            if *n == 0 {
                entry.subs.swap_remove(i);
                last_of_key = true;
            }
        }
        if let Some(key_rules) = self.keys.get_mut(&key) {
            key_rules.total -= 1;
            if last_of_key {
                key_rules.slots.retain(|s| *s != slot);
            }
            if key_rules.total == 0 {
                self.keys.remove(&key);
            }
        }
        if last_of_key {
            self.release_if_unused(slot);
            self.give_back_room();
        }
        true
    }

    /// Removes every rule of `key`, as when its connection goes away.
    pub fn remove_all(&mut self, key: K) {
        let Some(key_rules) = self.keys.remove(&key) else {
            return;
        };
        for slot in key_rules.slots {
            if let Some(Some(entry)) = self.entries.get_mut(slot) {
                entry.subs.retain(|(k, _)| *k != key);
            }
            self.release_if_unused(slot);
        }
        self.give_back_room();
    }

    fn release_if_unused(&mut self, slot: usize) {
        let Some(e) = self.entries.get_mut(slot) else {
            return;
        };
        if !e.as_ref().is_some_and(|entry| entry.subs.is_empty()) {
            return;
        }
        let Some(entry) = e.take() else {
            return;
        };
        self.by_rule.remove(&entry.rule);
        let place = place(&entry.rule);
        if let Some(bucket) = self.bucket_mut(place, false) {
            bucket.remove(slot, entry.rule.arg0());
        }
        self.drop_bucket_if_empty(place);
        self.free.push(slot);
    }

    /// Room left by a crowd of rules that came and went is given back. Not
    /// while slots are held outside the index (`remove_all`'s list).
    fn give_back_room(&mut self) {
        if self.entries.len() > ROOM && self.free.len() * 4 > self.entries.len() * 3 {
            self.compact();
        }
    }

    /// Renumbers the live entries into the lowest slots, in their order,
    /// and lets every table shrink to what it holds. O(entries), once less
    /// than a quarter of the slots is live: amortised over the removals
    /// that freed them.
    fn compact(&mut self) {
        let mut to = vec![usize::MAX; self.entries.len()];
        let mut entries = Vec::with_capacity(self.entries.len() - self.free.len());
        for (old, e) in std::mem::take(&mut self.entries).into_iter().enumerate() {
            if let Some(e) = e {
                to[old] = entries.len();
                entries.push(Some(e));
            }
        }
        self.entries = entries;
        self.free = Vec::new();
        let renumber = |slots: &mut Vec<usize>| {
            for s in slots.iter_mut() {
                *s = to[*s];
            }
        };
        for slot in self.by_rule.values_mut() {
            *slot = to[*slot];
        }
        for k in self.keys.values_mut() {
            renumber(&mut k.slots);
        }
        let buckets = self
            .members
            .values_mut()
            .chain(self.interfaces.values_mut())
            .chain(self.senders.values_mut())
            .chain(std::iter::once(&mut self.wildcard));
        for b in buckets {
            renumber(&mut b.rest);
            b.rest.shrink_to_fit();
            b.by_arg0.values_mut().for_each(renumber);
            b.by_arg0.shrink_to_fit();
        }
        self.by_rule.shrink_to_fit();
        self.keys.shrink_to_fit();
        self.members.shrink_to_fit();
        self.interfaces.shrink_to_fit();
        self.senders.shrink_to_fit();
    }

    /// How many rules `key` holds, duplicates included.
    /// Every subscriber's rules, each as many times as it added it.
    pub fn rules_by_key(&self) -> HashMap<K, Vec<&MatchRule>> {
        let mut out: HashMap<K, Vec<&MatchRule>> = HashMap::new();
        for entry in self.entries.iter().flatten() {
            for (k, n) in &entry.subs {
                let rules = out.entry(*k).or_default();
                rules.extend(std::iter::repeat_n(&entry.rule, *n));
            }
        }
        out
    }

    /// Rules held by all keys, duplicates included.
    pub fn total(&self) -> usize {
        self.keys.values().map(|k| k.total).sum()
    }

    pub fn count(&self, key: K) -> usize {
        self.keys.get(&key).map_or(0, |k| k.total)
    }

    /// Whether the index holds no rule.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether any rule could match a message with these header fields whose
    /// first argument is the string `arg0`, judged by the buckets alone:
    /// `for_each_match` would find nothing when this is false. The bus asks
    /// before building a signal of its own that nobody may want.
    pub fn may_match(&self, member: &str, interface: &str, sender: &str, arg0: &str) -> bool {
        let hit = |b: &Bucket| !b.rest.is_empty() || b.by_arg0.contains_key(arg0);
        self.members.get(member).is_some_and(hit)
            || self.interfaces.get(interface).is_some_and(hit)
            || self.senders.get(sender).is_some_and(hit)
            // Rules on other well-known names the sender may own.
            || (self.well_known_senders > 0
                && self
                    .senders
                    .iter()
                    .any(|(name, b)| !name.starts_with(':') && hit(b)))
            || hit(&self.wildcard)
    }

    /// Calls `visit` once for each key that has a rule matching the message and for which
    /// `filter(key, rule)` is true (the bus decides about eavesdropping there).
    pub fn for_each_match(
        &self,
        info: &MessageInfo<'_>,
        owners: &dyn Owners,
        filter: impl FnMut(K, &MatchRule) -> bool,
        visit: impl FnMut(K),
    ) {
        let mut search = Search {
            entries: &self.entries,
            info,
            owners,
            filter,
            visit,
            seen: Seen::new(),
        };
        if let Some(bucket) = info.member().and_then(|m| self.members.get(m)) {
            search.bucket(bucket);
        }
        if let Some(bucket) = info.interface().and_then(|i| self.interfaces.get(i)) {
            search.bucket(bucket);
        }
        if !self.senders.is_empty() {
            match info.sender() {
                Some(sender) => {
                    if let Some(bucket) = self.senders.get(sender) {
                        search.bucket(bucket);
                    }
                    if self.well_known_senders > 0 {
                        let listed = owners.for_each_sender_name(&mut |name| {
                            if name != sender
                                && !name.starts_with(':')
                                && let Some(bucket) = self.senders.get(name)
                            {
                                search.bucket(bucket);
                            }
                        });
                        if !listed {
                            for (name, bucket) in &self.senders {
                                if !name.starts_with(':')
                                    && **name != *sender
                                    && owners.sender_is(name)
                                {
                                    search.bucket(bucket);
                                }
                            }
                        }
                    }
                }
                None => {
                    for (name, bucket) in &self.senders {
                        if owners.sender_is(name) {
                            search.bucket(bucket);
                        }
                    }
                }
            }
        }
        search.bucket(&self.wildcard);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::matching::tests::{TestOwners, rule, sig0};
    use zbus::message::Message;

    fn visited(idx: &MatchIndex<u32>, msg: &Message, owners: &TestOwners) -> Vec<u32> {
        let mut v = Vec::new();
        idx.for_each_match(&MessageInfo::new(msg), owners, |_, _| true, |k| v.push(k));
        v.sort_unstable();
        v
    }

    #[test]
    fn index_add_remove_refcount() {
        let mut idx = MatchIndex::new();
        let r = rule("type='signal',member='Sig'");
        idx.add(1u32, r.clone());
        idx.add(1, r.clone());
        idx.add(2, r.clone());
        assert_eq!(idx.count(1), 2);
        assert_eq!(idx.count(2), 1);
        assert_eq!(idx.count(3), 0);
        let m = sig0("x");
        let o = TestOwners::for_msg(&m);
        assert_eq!(visited(&idx, &m, &o), [1, 2]);
        // Equal but differently written.
        assert!(idx.remove(1, &rule(" member ='Sig', type=signal")));
        assert_eq!(visited(&idx, &m, &o), [1, 2]);
        assert!(idx.remove(1, &r));
        assert!(!idx.remove(1, &r));
        assert_eq!(idx.count(1), 0);
        assert_eq!(visited(&idx, &m, &o), [2]);
        assert!(!idx.remove(3, &r));
        assert!(!idx.remove(2, &rule("member='Other'")));
        idx.add(2, rule("arg0='x'"));
        idx.add(2, rule("interface='org.x.Iface'"));
        idx.add(3, rule("interface='org.x.Iface'"));
        assert_eq!(idx.count(2), 3);
        idx.remove_all(2);
        assert_eq!(idx.count(2), 0);
        assert_eq!(visited(&idx, &m, &o), [3]);
        idx.remove_all(3);
        assert!(idx.is_empty());
        assert!(idx.members.is_empty() && idx.interfaces.is_empty());
        assert!(idx.wildcard.is_empty());
        assert_eq!(visited(&idx, &m, &o), Vec::<u32>::new());
        // Slots are reused.
        idx.add(4, rule("member='Sig'"));
        assert_eq!(
            idx.entries.len(),
            idx.entries.iter().filter(|e| e.is_some()).count() + idx.free.len()
        );
        assert_eq!(visited(&idx, &m, &o), [4]);
    }

    /// A crowd of subscribers that came and went leaves the index no bigger
    /// than what stays, and what stays still matches.
    #[test]
    fn room_is_given_back_after_a_crowd_leaves() {
        let mut idx = MatchIndex::new();
        idx.add(0u32, rule("type='signal',member='Sig'"));
        for k in 1..1000u32 {
            idx.add(k, rule(&format!("type='signal',member='Nope{k}'")));
            idx.add(k, rule(&format!("type='signal',arg0='a{k}'")));
            idx.add(k, rule(&format!("interface='org.x.I{k}'")));
        }
        // One that stays in a high slot, in a bucket shared with the crowd.
        idx.add(5000, rule("type='signal',arg0='x'"));
        let m = sig0("x");
        let o = TestOwners::for_msg(&m);
        assert_eq!(visited(&idx, &m, &o), [0, 5000]);
        for k in 1..1000u32 {
            idx.remove_all(k);
        }
        let live = idx.entries.iter().flatten().count();
        assert_eq!(live, 2);
        assert!(
            idx.entries.len() <= ROOM,
            "{} slots left",
            idx.entries.len()
        );
        assert!(idx.entries.capacity() <= ROOM && idx.by_rule.capacity() < 64);
        assert!(idx.members.capacity() < 64 && idx.interfaces.capacity() < 64);
        assert!(idx.wildcard.by_arg0.capacity() < 64);
        assert_eq!(visited(&idx, &m, &o), [0, 5000]);
        assert_eq!(idx.count(0) + idx.count(5000), 2);
        assert!(idx.keys.capacity() < 64);
        // The renumbered index takes and drops rules as before.
        idx.add(7, rule("type='signal',member='Sig'"));
        assert_eq!(visited(&idx, &m, &o), [0, 7, 5000]);
        assert!(idx.remove(5000, &rule("type='signal',arg0='x'")));
        idx.remove_all(0);
        assert_eq!(visited(&idx, &m, &o), [7]);
        idx.remove_all(7);
        assert!(idx.is_empty() && idx.wildcard.is_empty());
    }

    /// Random adds and removals, with crowds that come and go (so that
    /// slots are reused and the index compacts many times), against a plain
    /// list of every key's rules: the index finds exactly the keys the list
    /// does.
    #[test]
    fn index_equals_a_plain_list_through_compactions() {
        let pool: Vec<MatchRule> = [
            "type='signal',member='Sig'",
            "type='signal',member='Other'",
            "type='signal',arg0='x'",
            "member='Sig',arg0='y'",
            "interface='org.x.Iface'",
            "interface='org.x.Iface',arg0='x'",
            "sender=':1.7'",
            "type='signal'",
            "path='/a/b'",
            "member='Nope'",
        ]
        .iter()
        .map(|r| rule(r))
        .collect();
        let msgs = [sig0("x"), sig0("y"), sig0("z")];
        let mut idx = MatchIndex::new();
        let mut list: HashMap<u32, Vec<MatchRule>> = HashMap::new();
        let (mut compactions, mut slots) = (0, 0);
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for round in 0..3000u32 {
            // A crowd comes (mostly adds), then leaves (mostly removals).
            let coming = round % 600 < 300;
            let key = next(30) as u32;
            let op = next(10);
            if (coming && op < 8) || (!coming && op < 1) {
                // Many rules of their own too, so the crowd takes many slots.
                let r = if next(2) == 0 {
                    pool[next(pool.len() as u64) as usize].clone()
                } else {
                    rule(&format!("type='signal',member='M{round}'"))
                };
                idx.add(key, r.clone());
                list.entry(key).or_default().push(r);
            } else if (coming && op < 9) || (!coming && op < 4) {
                let held = list.entry(key).or_default();
                if let Some(r) = held.pop() {
                    assert!(idx.remove(key, &r));
                }
            } else {
                idx.remove_all(key);
                list.remove(&key);
            }
            for m in &msgs {
                let o = TestOwners::for_msg(m);
                let info = MessageInfo::new(m);
                let mut want: Vec<u32> = list
                    .iter()
                    .filter(|(_, rules)| rules.iter().any(|r| r.matches(&info, &o)))
                    .map(|(k, _)| *k)
                    .collect();
                want.sort_unstable();
                assert_eq!(visited(&idx, m, &o), want, "round {round}");
            }
            let held: usize = list.values().map(Vec::len).sum();
            assert_eq!(idx.total(), held, "round {round}");
            // Only a compaction takes slots away.
            compactions += usize::from(idx.entries.len() < slots);
            slots = idx.entries.len();
        }
        assert!(compactions >= 3, "{compactions} compactions");
    }

    /// `may_match` is false only where `for_each_match` finds nothing, and
    /// false for the rules a bus typically holds about other names.
    #[test]
    fn may_match_agrees_with_the_search() {
        let noc = |name: &str| {
            Message::signal(
                "/org/freedesktop/DBus",
                "org.freedesktop.DBus",
                "NameOwnerChanged",
            )
            .sender("org.freedesktop.DBus")
            .build(&(name, "", ":1.5"))
            .unwrap()
        };
        let rules_and_names = [
            ("member='NameOwnerChanged',arg0='org.x.Watched'", false),
            ("member='NameAcquired'", false),
            ("interface='org.x.Other'", false),
            ("sender='org.x.Other',arg0='org.x.Watched'", false),
            ("member='NameOwnerChanged'", true),
            ("interface='org.freedesktop.DBus'", true),
            ("sender='org.freedesktop.DBus'", true),
            ("sender='org.x.Other'", true),
            ("type='signal'", true),
            ("arg0='org.x.Watched'", false),
            ("arg0=':1.5'", true),
            ("arg0namespace='org.x'", true),
        ];
        // The rule, and whether a unique name's signal may match it.
        for (r, unique_may) in rules_and_names {
            let mut idx = MatchIndex::new();
            idx.add(1u32, rule(r));
            for name in [":1.5", "org.x.Watched", "org.y.Other"] {
                let m = noc(name);
                let o = TestOwners::for_msg(&m);
                let found = !visited(&idx, &m, &o).is_empty();
                let may = idx.may_match(
                    "NameOwnerChanged",
                    "org.freedesktop.DBus",
                    "org.freedesktop.DBus",
                    name,
                );
                assert!(
                    may || !found,
                    "{r}: {name} matched though may_match said no"
                );
                if name == ":1.5" {
                    assert_eq!(may, unique_may, "{r}: may_match for a unique name");
                }
            }
        }
    }

    #[test]
    fn index_visits_once_and_filters() {
        let mut idx = MatchIndex::new();
        let m = Message::signal("/a/b", "org.x.Iface", "Sig")
            .sender(":1.7")
            .build(&("name",))
            .unwrap();
        let owners = TestOwners::for_msg(&m).owns(":1.7", "org.x.Name");
        // Key 1 matches through every kind of bucket.
        for r in [
            "member='Sig'",
            "member='Sig',arg0='name'",
            "interface='org.x.Iface'",
            "interface='org.x.Iface',arg0='name'",
            "sender=':1.7'",
            "sender='org.x.Name'",
            "",
            "arg0='name'",
            "path_namespace='/a'",
        ] {
            idx.add(1u32, rule(r));
        }
        // Key 2 matches only with an eavesdropping rule.
        idx.add(2, rule("member='Sig',eavesdrop='true'"));
        // Keys that must not be visited.
        idx.add(3, rule("member='Other'"));
        idx.add(3, rule("member='Sig',arg0='other'"));
        idx.add(3, rule("interface='org.x.Other'"));
        idx.add(3, rule("sender=':1.8'"));
        idx.add(3, rule("sender='org.x.NotOwned'"));
        idx.add(3, rule("arg0='other'"));
        idx.add(3, rule("path='/a'"));
        idx.add(3, rule("member='Sig',arg0path='/x/'"));
        for k in 4..40 {
            idx.add(k, rule("type='signal'"));
        }
        let mut got = Vec::new();
        idx.for_each_match(
            &MessageInfo::new(&m),
            &owners,
            |_, r| !r.eavesdrop(),
            |k| got.push(k),
        );
        got.sort_unstable();
        let mut want: Vec<u32> = vec![1];
        want.extend(4..40);
        assert_eq!(got, want);
        assert_eq!(visited(&idx, &m, &owners), {
            let mut w = vec![1, 2];
            w.extend(4..40);
            w
        });
        // With the sender's names listed by the bus.
        let listing = TestOwners {
            list_names: true,
            ..TestOwners::for_msg(&m).owns(":1.7", "org.x.Name")
        };
        idx.remove_all(1);
        idx.add(1, rule("sender='org.x.Name'"));
        assert!(visited(&idx, &m, &listing).contains(&1));
        assert!(visited(&idx, &m, &owners).contains(&1));
        let not_owner = TestOwners::for_msg(&m).owns(":1.8", "org.x.Name");
        assert!(!visited(&idx, &m, &not_owner).contains(&1));
    }

    /// The filter sees the rule, and is asked again for another rule of the same key.
    #[test]
    fn index_asks_the_filter_per_rule() {
        let m = sig0("name");
        let owners = TestOwners::for_msg(&m);
        let mut idx = MatchIndex::new();
        idx.add(9u32, rule("member='Sig',eavesdrop='true'"));
        idx.add(9, rule("interface='org.x.Iface'"));
        let mut asked = 0;
        let mut got = Vec::new();
        idx.for_each_match(
            &MessageInfo::new(&m),
            &owners,
            |_, r| {
                asked += 1;
                !r.eavesdrop()
            },
            |k| got.push(k),
        );
        assert_eq!(got, [9]);
        assert_eq!(asked, 2);
    }

    /// Fan-out cost with 1,000 subscribers holding non-matching rules. Prints timings; asserts
    /// only that few rules were tested.
    #[test]
    fn index_fanout_is_flat() {
        struct Counting<'a>(&'a TestOwners, std::cell::Cell<usize>);
        impl Owners for Counting<'_> {
            fn sender_is(&self, name: &str) -> bool {
                self.1.set(self.1.get() + 1);
                self.0.sender_is(name)
            }
            fn destination_is(&self, name: &str) -> bool {
                self.0.destination_is(name)
            }
        }
        let mut idx = MatchIndex::new();
        for k in 0..1000u32 {
            idx.add(
                k,
                rule(&format!("type='signal',interface='org.x.Iface{k}'")),
            );
            idx.add(k, rule(&format!("type='signal',sender=':1.{}'", k + 1000)));
            idx.add(
                k,
                rule(&format!(
                    "type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',\
                     member='NameOwnerChanged',path='/org/freedesktop/DBus',arg0='org.foo.N{k}'"
                )),
            );
            idx.add(k, rule(&format!("type='signal',member='Changed{k}'")));
        }
        let noc = Message::signal(
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "NameOwnerChanged",
        )
        .sender("org.freedesktop.DBus")
        .build(&("org.foo.N500", "", ":1.5"))
        .unwrap();
        let other = Message::signal("/a", "org.y.Iface", "Sig")
            .sender(":1.5")
            .build(&("z",))
            .unwrap();
        for (msg, want) in [(&noc, vec![500u32]), (&other, vec![])] {
            let base = TestOwners::for_msg(msg);
            let owners = Counting(&base, std::cell::Cell::new(0));
            let mut got = Vec::new();
            let start = std::time::Instant::now();
            let rounds = 1000;
            for _ in 0..rounds {
                got.clear();
                let info = MessageInfo::new(msg);
                idx.for_each_match(&info, &owners, |_, _| true, |k| got.push(k));
            }
            let per = start.elapsed() / rounds;
            eprintln!("fan-out over 4000 rules: {per:?} per message");
            assert_eq!(got, want);
            assert!(
                owners.1.get() <= rounds as usize,
                "sender_is asked too often"
            );
        }
    }
}
