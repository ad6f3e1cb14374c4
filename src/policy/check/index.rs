//! Where a check looks: the rules of a client policy by the name they are
//! about, so that a check tests only the rules that could match, not all of
//! them. A system bus's policy is hundreds of rules, almost all naming one
//! service (`send_destination`, `receive_sender`, `own`); a message concerns
//! the few names of its receiver or sender.
//!
//! The answer is dbus-daemon's linear one: every rule that can match is in
//! exactly one bucket, every bucket a message could hit is tested in full,
//! and the matching rule with the highest position in the flat list wins.
//! So the count of matched rules (the AccessDenied text) is exact too.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};

use super::MessageCheck;

/// The send or receive rules of a client policy, by bucket. Each bucket
/// holds positions in the policy's list, ascending.
#[derive(Debug, Default)]
pub(super) struct MessageIndex {
    /// Rules naming one well-known name (`send_destination`,
    /// `receive_sender`), by that name: they can match only when the
    /// receiver (sender) owns or is queued for it.
    by_name: HashMap<Box<str>, Box<[u32]>, Fx>,
    /// Rules naming no name but an interface, by the interface.
    by_interface: HashMap<Box<str>, Box<[u32]>, Fx>,
    /// The deny rules of `by_interface`: a message without an interface
    /// matches deny rules that name one (allow rules, never).
    interface_denies: Box<[u32]>,
    /// Rules naming no name and no interface, tested one by one.
    rest: Box<[u32]>,
    /// Rules naming a name prefix or a unique name, tested one by one: a
    /// connection's unique name is not among the names
    /// [`super::Names::each_name`] must list, and rules naming one are
    /// rare (names the bus gives cannot be known in advance).
    rest_named: Box<[u32]>,
}

/// The outcome of testing candidates: the highest matching position and
/// how many matched.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Fold {
    pub(super) last: Option<u32>,
    pub(super) count: usize,
}

impl Fold {
    fn test(&mut self, bucket: &[u32], mut matches: impl FnMut(u32) -> bool) {
        for &i in bucket {
            if matches(i) {
                self.count += 1;
                // Buckets are ascending: the last match of one is its highest.
                self.last = self.last.max(Some(i));
            }
        }
    }
}

impl MessageIndex {
    pub(super) fn new(rules: &[MessageCheck]) -> Self {
        let mut by_name: HashMap<&str, Vec<u32>> = HashMap::new();
        let mut by_interface: HashMap<&str, Vec<u32>> = HashMap::new();
        let (mut interface_denies, mut rest, mut rest_named) = (Vec::new(), Vec::new(), Vec::new());
        for (i, c) in rules.iter().enumerate() {
            let i = u32::try_from(i).expect("fewer than 2^32 rules");
            let r = &c.rule;
            match (r.name.as_deref(), r.interface.as_deref()) {
                (Some(name), _) if !r.name_is_prefix && !name.starts_with(':') => {
                    by_name.entry(name).or_default().push(i)
                }
                (None, Some(interface)) => {
                    by_interface.entry(interface).or_default().push(i);
                    if !c.allow {
                        interface_denies.push(i);
                    }
                }
                (Some(_), _) => rest_named.push(i),
                (None, None) => rest.push(i),
            }
        }
        let boxed = |m: HashMap<&str, Vec<u32>>| {
            m.into_iter()
                .map(|(k, v)| (Box::from(k), v.into_boxed_slice()))
                .collect()
        };
        MessageIndex {
            by_name: boxed(by_name),
            by_interface: boxed(by_interface),
            interface_denies: interface_denies.into(),
            rest: rest.into(),
            rest_named: rest_named.into(),
        }
    }

    /// Tests the rules that name no counterpart and could match a message
    /// with `interface`: `hit(i)` tests rule `i`. Their answer is the same
    /// for every recipient of a broadcast.
    pub(super) fn unnamed(
        &self,
        interface: Option<&str>,
        mut hit: impl FnMut(u32) -> bool,
    ) -> Fold {
        let mut fold = Fold::default();
        let by_interface = match interface {
            Some(interface) => self.by_interface.get(interface).map(AsRef::as_ref),
            None => Some(&*self.interface_denies),
        };
        fold.test(by_interface.unwrap_or_default(), &mut hit);
        fold.test(&self.rest, hit);
        fold
    }

    /// Adds to `fold` (the [`Self::unnamed`] part) the rules naming a
    /// counterpart known by the names `each_name` lists (each once): `hit`
    /// tests a rule of those names, `named_hit` a rule of `rest_named`.
    pub(super) fn named(
        &self,
        mut fold: Fold,
        each_name: impl FnOnce(&mut dyn FnMut(&str)),
        mut hit: impl FnMut(u32) -> bool,
        named_hit: impl FnMut(u32) -> bool,
    ) -> Fold {
        if !self.by_name.is_empty() {
            each_name(&mut |name| {
                if let Some(bucket) = self.by_name.get(name) {
                    fold.test(bucket, &mut hit);
                }
            });
        }
        fold.test(&self.rest_named, named_hit);
        fold
    }

    /// Whether [`Self::named`] can add anything for a counterpart known by
    /// the names `each_name` lists: some rule names one of them, or a
    /// prefix or a unique name.
    pub(super) fn names_matter(&self, each_name: impl FnOnce(&mut dyn FnMut(&str))) -> bool {
        let mut any = !self.rest_named.is_empty();
        if !any && !self.by_name.is_empty() {
            each_name(&mut |name| any |= self.by_name.contains_key(name));
        }
        any
    }
}

/// The `own` rules of a client policy: the last `own` of each name, and the
/// `own_prefix` and `own="*"` rules.
#[derive(Debug, Default)]
pub(super) struct OwnIndex {
    /// For each name of an `own` rule, its last position: any later rule
    /// of that name would match the same requests.
    exact: HashMap<Box<str>, u32, Fx>,
    /// `own_prefix` and `own="*"`, ascending.
    rest: Box<[u32]>,
}

impl OwnIndex {
    pub(super) fn new<'r>(names: impl Iterator<Item = (Option<&'r str>, bool)>) -> Self {
        let mut index = OwnIndex::default();
        let mut rest = Vec::new();
        for (i, rule) in names.enumerate() {
            let i = u32::try_from(i).expect("fewer than 2^32 rules");
            match rule {
                (Some(name), false) => {
                    index.exact.insert(name.into(), i);
                }
                _ => rest.push(i),
            }
        }
        index.rest = rest.into();
        index
    }

    /// The position of the last rule that matches a request for `name`;
    /// `matches` tests a rule of `rest`.
    pub(super) fn last(&self, name: &str, matches: impl Fn(u32) -> bool) -> Option<u32> {
        let exact = self.exact.get(name).copied();
        let later = self.rest.iter().rev().take_while(|&&i| Some(i) > exact);
        later.copied().find(|&i| matches(i)).or(exact)
    }
}

/// FxHash (rustc's): the keys are short names, and SipHash costs more than
/// the rest of a check. Flooding is no concern: the keys come from the
/// configuration, so an adversary's lookup costs at most a probe through
/// the table, never more than testing every rule would.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Fx;

impl BuildHasher for Fx {
    type Hasher = FxHasher;
    fn build_hasher(&self) -> FxHasher {
        FxHasher(0)
    }
}

pub(super) struct FxHasher(u64);

impl FxHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        for w in &mut words {
            self.add(u64::from_le_bytes(w.try_into().expect("8 bytes")));
        }
        let tail = words.remainder();
        if !tail.is_empty() {
            let mut w = [0u8; 8];
            w[..tail.len()].copy_from_slice(tail);
            self.add(u64::from_le_bytes(w));
        }
    }

    fn write_u8(&mut self, b: u8) {
        self.add(u64::from(b));
    }

    fn finish(&self) -> u64 {
        self.0
    }
}
