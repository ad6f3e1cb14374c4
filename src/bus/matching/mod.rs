//! D-Bus match rules, as the D-Bus specification ("Match Rules") defines them and as
//! dbus-daemon 1.14 (`bus/signals.c`) parses and applies them.
//!
//! * [`MatchRule`] is a parsed rule: [`MatchRule::parse`] accepts what dbus-daemon accepts, and two
//!   rules that differ only in how they are written (key order, whitespace, quoting) are equal.
//! * [`MessageInfo`] is a view of one message to test against many rules; it decodes the body
//!   arguments lazily, once, and only when a rule with an `argN*` key is tested.
//! * [`Owners`] is how the bus answers "is the sender/destination known by this name".
//! * [`MatchIndex`] holds the rules of all connections and finds the subscribers of a message
//!   without testing every rule.
//!
//! Rules are in `rule.rs` and the index in `index.rs`; the body decoder and the name validators
//! they use are in `crate::wire`.

mod index;
mod rule;

use std::cell::OnceCell;
use std::fmt;

use crate::wire::{Header, Message, Type};

use crate::wire::args::{Arg, decode_args};

pub use crate::wire::args::body_signature;
pub use index::MatchIndex;
pub use rule::{MAX_ARG_NUMBER, MAX_RULE_LENGTH, MatchRule};

/// How the bus tells whether a message's sender or destination is known by a name.
pub trait Owners {
    /// Whether the sender of the message is `name`: its unique name, or a well-known name it is
    /// the primary owner of. For messages from the bus itself, `org.freedesktop.DBus`.
    fn sender_is(&self, name: &str) -> bool;

    /// Whether the addressed recipient of the message is `name`, as for [`Owners::sender_is`].
    /// For messages to the bus itself, `org.freedesktop.DBus`.
    fn destination_is(&self, name: &str) -> bool;

    /// Optional, for [`MatchIndex::for_each_match`] to find rules on the sender's well-known names
    /// without asking about each: call `f` with every name other than the sender header's own for
    /// which [`Owners::sender_is`] is true, and return `true`. The default returns `false` and
    /// the index then asks [`Owners::sender_is`] about each well-known name rules mention.
    fn for_each_sender_name(&self, f: &mut dyn FnMut(&str)) -> bool {
        let _ = f;
        false
    }
}

/// A view of one message for testing it against many rules.
pub struct MessageInfo<'m> {
    msg: &'m Message,
    header: Header<'m>,
    msg_type: Type,
    /// Top-level arguments, up to the 64th: `None` for those that are neither STRING nor
    /// OBJECT_PATH. Shorter than the body's argument list if decoding stopped at bad data.
    args: OnceCell<Vec<Option<Arg<'m>>>>,
}

impl fmt::Debug for MessageInfo<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MessageInfo")
            .field("msg_type", &self.msg_type)
            .field("path", &self.path())
            .field("interface", &self.interface())
            .field("member", &self.member())
            .field("sender", &self.sender())
            .field("destination", &self.destination())
            .finish_non_exhaustive()
    }
}

impl<'m> MessageInfo<'m> {
    /// Reads the header of `msg`; the body is only read if a rule needs its arguments.
    pub fn new(msg: &'m Message) -> Self {
        MessageInfo {
            msg,
            header: msg.header(),
            msg_type: msg.message_type(),
            args: OnceCell::new(),
        }
    }

    /// The path header field.
    pub fn path(&self) -> Option<&str> {
        self.header.path().map(|p| p.as_str())
    }

    /// The interface header field.
    pub fn interface(&self) -> Option<&str> {
        self.header.interface().map(|i| i.as_str())
    }

    /// The member header field.
    pub fn member(&self) -> Option<&str> {
        self.header.member().map(|m| m.as_str())
    }

    /// The sender header field.
    pub fn sender(&self) -> Option<&str> {
        self.header.sender().map(|s| s.as_str())
    }

    /// The destination header field.
    pub fn destination(&self) -> Option<&str> {
        self.header.destination().map(|d| d.as_str())
    }

    #[cfg(test)]
    /// Top-level argument `n` if it is a STRING or an OBJECT_PATH (and `n` is at most 63), and
    /// whether it is an OBJECT_PATH.
    pub fn arg_str(&self, n: usize) -> Option<(&'m str, bool)> {
        self.arg(n).map(|a| (a.value, a.is_path))
    }

    fn arg(&self, n: usize) -> Option<Arg<'m>> {
        self.args
            .get_or_init(|| decode_args(self.msg, usize::from(MAX_ARG_NUMBER) + 1))
            .get(n)
            .copied()
            .flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use zbus::wire::Endian;

    /// Owners for tests: the message's sender and destination, and well-known names they own.
    #[derive(Default)]
    pub(super) struct TestOwners {
        pub(super) sender: Option<String>,
        pub(super) destination: Option<String>,
        pub(super) names: HashMap<String, String>,
        pub(super) list_names: bool,
    }

    impl TestOwners {
        pub(super) fn for_msg(msg: &Message) -> Self {
            let h = msg.header();
            TestOwners {
                sender: h.sender().map(|s| s.to_string()),
                destination: h.destination().map(|d| d.to_string()),
                ..Default::default()
            }
        }

        pub(super) fn owns(mut self, unique: &str, name: &str) -> Self {
            self.names.insert(name.to_owned(), unique.to_owned());
            self
        }

        fn resolves(&self, who: Option<&String>, name: &str) -> bool {
            let Some(who) = who else {
                return name == "org.freedesktop.DBus";
            };
            who == name || self.names.get(name) == Some(who)
        }
    }

    impl Owners for TestOwners {
        fn sender_is(&self, name: &str) -> bool {
            self.resolves(self.sender.as_ref(), name)
        }

        fn destination_is(&self, name: &str) -> bool {
            self.resolves(self.destination.as_ref(), name)
        }

        fn for_each_sender_name(&self, f: &mut dyn FnMut(&str)) -> bool {
            if !self.list_names {
                return false;
            }
            for (name, owner) in &self.names {
                if Some(owner) == self.sender.as_ref() {
                    f(name);
                }
            }
            true
        }
    }

    pub(super) fn rule(s: &str) -> MatchRule {
        match MatchRule::parse(s) {
            Ok(r) => r,
            Err(e) => panic!("{s:?} should parse: {e}"),
        }
    }

    pub(super) fn signal<B>(path: &str, iface: &str, member: &str, body: &B) -> Message
    where
        B: zbus::export::serde::ser::Serialize + zbus::wire::DynamicType,
    {
        Message::signal(path, iface, member)
            .sender(":1.7")
            .build(body)
            .expect("signal")
    }

    pub(super) fn matches(r: &str, msg: &Message) -> bool {
        let owners = TestOwners::for_msg(msg);
        rule(r).matches(&MessageInfo::new(msg), &owners)
    }

    pub(super) fn sig0(arg0: &str) -> Message {
        signal("/a/b", "org.x.Iface", "Sig", &(arg0,))
    }

    #[test]
    fn message_info_args() {
        let big = Message::signal("/x", "org.x.I", "S")
            .endian(Endian::Big)
            .build(&(3u8, "big", vec![1u32, 2], "end"))
            .unwrap();
        let info = MessageInfo::new(&big);
        assert_eq!(info.arg_str(1), Some(("big", false)));
        assert_eq!(info.arg_str(3), Some(("end", false)));
        assert_eq!(info.arg_str(0), None);
        assert_eq!(info.arg_str(4), None);
        assert_eq!(info.arg_str(1000), None);
        assert!(format!("{info:?}").contains("member: Some(\"S\")"));
    }
}
