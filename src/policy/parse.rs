//! From the attributes of `<policy>`, `<allow>` and `<deny>` to a
//! [`Policy`], with dbus-daemon 1.14's validation and error texts
//! (bus/config-parser.c: `start_busconfig_child`, its `ELEMENT_POLICY`
//! branch, and `append_rule_from_element`).
//!
//! The XML parser (`crate::config::xml`) hands over each element's
//! attributes as it read them, entities resolved:
//!
//! 1. [`parse_policy`] turns a `<policy>` start tag into a
//!    [`PolicyContext`];
//! 2. [`parse_rule`] turns an `<allow>` or `<deny>` into a [`Rule`];
//! 3. [`Policy::add_rule`] files the rule under its policy's context.
//!
//! Errors are the message of dbus-daemon's `DBusError`, without file or
//! line (the caller adds them). An unknown user or group is no error: the
//! element is [`Parsed::Dropped`] with dbus-daemon's warning, as dbus-daemon
//! drops the whole `<policy>` or the one rule.
//!
//! One deliberate difference: for a bad `eavesdrop`, `send_requested_reply`
//! or `receive_requested_reply` value, dbus-daemon 1.14.10 swaps the
//! arguments of its message (`Bad value "eavesdrop" for maybe attribute`);
//! we say `Bad value "maybe" for eavesdrop attribute`, the format dbus-daemon
//! itself uses for `send_broadcast`.

use nix::unistd::{Gid, Group, Uid, User};

use super::{MessageRule, MessageType, Policy, Rule, RuleKind};

/// `DBUS_MAXIMUM_MESSAGE_UNIX_FDS` (dbus/dbus-protocol.h): the largest
/// `min_fds`/`max_fds` dbus-daemon accepts.
pub(crate) const MAX_MESSAGE_UNIX_FDS: u32 = 33_554_432;

/// The attributes of `<policy>`.
pub(crate) const POLICY_ATTRIBUTES: &[&str] = &["context", "user", "group", "at_console"];

/// The attributes of `<allow>` and `<deny>`, as `append_rule_from_element`
/// lists them.
pub(crate) const RULE_ATTRIBUTES: &[&str] = &[
    "send_interface",
    "send_member",
    "send_error",
    "send_destination",
    "send_destination_prefix",
    "send_path",
    "send_type",
    "send_broadcast",
    "receive_interface",
    "receive_member",
    "receive_error",
    "receive_sender",
    "receive_path",
    "receive_type",
    "eavesdrop",
    "max_fds",
    "min_fds",
    "send_requested_reply",
    "receive_requested_reply",
    "own",
    "own_prefix",
    "user",
    "group",
    "log",
];

/// Where the rules of one `<policy>` go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum PolicyContext {
    /// `context="default"`.
    Default,
    /// `context="mandatory"`.
    Mandatory,
    /// `user="..."`, resolved.
    User(u32),
    /// `group="..."`, resolved.
    Group(u32),
    /// `at_console="true"` or `"false"`.
    AtConsole(bool),
}

/// An element that yields a value, or one dbus-daemon drops with a warning
/// (an unknown user or group).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Parsed<T> {
    Value(T),
    Dropped { warning: String },
}

/// User and group names (or numbers) to ids, looked up when the
/// configuration is parsed, as dbus-daemon does.
pub(crate) trait Accounts {
    fn user_id(&self, user: &str) -> Option<u32>;
    fn group_id(&self, group: &str) -> Option<u32>;
}

/// The system's user database (NSS). As in dbus-daemon
/// (`_dbus_user_database_lookup`), a number is an id, which must exist too.
pub(crate) struct SystemAccounts;

impl Accounts for SystemAccounts {
    fn user_id(&self, user: &str) -> Option<u32> {
        let found = match id_number(user) {
            Some(uid) => User::from_uid(Uid::from_raw(uid)),
            None => User::from_name(user),
        };
        found.ok().flatten().map(|u| u.uid.as_raw())
    }

    fn group_id(&self, group: &str) -> Option<u32> {
        let found = match id_number(group) {
            Some(gid) => Group::from_gid(Gid::from_raw(gid)),
            None => Group::from_name(group),
        };
        found.ok().flatten().map(|g| g.gid.as_raw())
    }
}

#[derive(Debug, Clone, Copy)]
enum Account {
    User,
    Group,
}

/// The id of a user or group, or the start of dbus-daemon's warning
/// (`Unknown username "x"`, `Unknown group "x"`).
fn account_id(accounts: &dyn Accounts, account: Account, name: &str) -> Result<u32, String> {
    let (id, what) = match account {
        Account::User => (accounts.user_id(name), "username"),
        Account::Group => (accounts.group_id(name), "group"),
    };
    id.ok_or_else(|| format!("Unknown {what} \"{name}\""))
}

/// `_dbus_is_a_number`: the whole string is a number for C's
/// `strtoul(s, &end, 0)`. Negative numbers and numbers beyond `u32` are
/// taken as names (which no account has) instead of wrapping.
fn id_number(s: &str) -> Option<u32> {
    match c_strtol(s) {
        Some((false, n, "")) => u32::try_from(n).ok(),
        _ => None,
    }
}

/// C's `strtol`/`strtoul` with base 0, as dbus uses them: leading white
/// space, a sign, then a `0x` (hex), `0` (octal) or decimal number. Returns
/// (negative, magnitude, what follows the number); `None` when no digit was
/// read or the magnitude overflows `u64`.
fn c_strtol(s: &str) -> Option<(bool, u64, &str)> {
    let s = s.trim_start_matches([' ', '\t', '\n', '\x0b', '\x0c', '\r']);
    let (negative, s) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let hex_digits = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .filter(|rest| rest.starts_with(|c: char| c.is_ascii_hexdigit()));
    let (radix, digits) = match hex_digits {
        Some(rest) => (16, rest),
        None if s.starts_with('0') => (8, s),
        None => (10, s),
    };
    let end = digits
        .find(|c: char| !c.is_digit(radix))
        .unwrap_or(digits.len());
    if end == 0 {
        return None;
    }
    let magnitude = u64::from_str_radix(&digits[..end], radix).ok()?;
    Some((negative, magnitude, &digits[end..]))
}

/// `parse_int_attribute` for `min_fds`/`max_fds`: `_dbus_string_parse_int`
/// (`strtol`, anything after the number ignored), then the range check.
fn fds_attribute(name: &str, value: Option<&str>, default: u32) -> Result<u32, String> {
    let Some(value) = value else {
        return Ok(default);
    };
    let parsed = match c_strtol(value) {
        Some((false, n, _)) => u32::try_from(n).ok(),
        // Only "-0" is in range.
        Some((true, 0, _)) => Some(0),
        _ => None,
    };
    parsed
        .filter(|&n| n <= MAX_MESSAGE_UNIX_FDS)
        .ok_or_else(|| {
            format!(
                "Bad value \"{value}\" for {name} attribute, must be an integer in range 0 to \
             {MAX_MESSAGE_UNIX_FDS} inclusive"
            )
        })
}

/// An element's attributes, checked as dbus-daemon's `locate_attributes`
/// checks them: each one known and given once.
struct Attributes<'a> {
    list: &'a [(String, String)],
}

impl<'a> Attributes<'a> {
    fn locate(element: &str, list: &'a [(String, String)], known: &[&str]) -> Result<Self, String> {
        for (i, (name, _)) in list.iter().enumerate() {
            if !known.contains(&name.as_str()) {
                return Err(format!(
                    "Attribute \"{name}\" is invalid on <{element}> element in this context"
                ));
            }
            if list[..i].iter().any(|(earlier, _)| earlier == name) {
                return Err(format!(
                    "Attribute \"{name}\" repeated twice on the same <{element}> element"
                ));
            }
        }
        Ok(Attributes { list })
    }

    fn get(&self, name: &str) -> Option<&'a str> {
        self.list
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn has(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// The value, `None` for `*` (dbus-daemon's `IS_WILDCARD`) or absent.
    fn pattern(&self, name: &str) -> Option<&'a str> {
        self.get(name).filter(|v| *v != "*")
    }

    /// A `true`/`false` attribute; `None` when absent.
    fn boolean(&self, name: &str) -> Result<Option<bool>, String> {
        match self.get(name) {
            None => Ok(None),
            Some("true") => Ok(Some(true)),
            Some("false") => Ok(Some(false)),
            Some(other) => Err(format!(
                "Bad value \"{other}\" for {name} attribute, must be true or false"
            )),
        }
    }
}

/// A `<policy>` start tag.
pub(crate) fn parse_policy(
    attributes: &[(String, String)],
    accounts: &dyn Accounts,
) -> Result<Parsed<PolicyContext>, String> {
    let a = Attributes::locate("policy", attributes, POLICY_ATTRIBUTES)?;
    let given: Vec<&str> = POLICY_ATTRIBUTES
        .iter()
        .copied()
        .filter(|k| a.has(k))
        .collect();
    let [key] = given.as_slice() else {
        return Err(
            "<policy> element must have exactly one of (context|user|group|at_console) \
             attributes"
                .to_owned(),
        );
    };
    let value = a.get(key).unwrap_or_default();
    let context = match (*key, value) {
        ("context", "default") => PolicyContext::Default,
        ("context", "mandatory") => PolicyContext::Mandatory,
        ("context", other) => {
            return Err(format!(
                "context attribute on <policy> must have the value \"default\" or \
                 \"mandatory\", not \"{other}\""
            ));
        }
        ("user" | "group", name) => {
            let (account, context): (_, fn(u32) -> PolicyContext) = match *key {
                "user" => (Account::User, PolicyContext::User),
                _ => (Account::Group, PolicyContext::Group),
            };
            match account_id(accounts, account, name) {
                Ok(id) => context(id),
                Err(unknown) => {
                    return Ok(Parsed::Dropped {
                        warning: format!("{unknown} in message bus configuration file"),
                    });
                }
            }
        }
        ("at_console", "true") => PolicyContext::AtConsole(true),
        ("at_console", "false") => PolicyContext::AtConsole(false),
        (_, other) => {
            return Err(format!(
                "Unknown value \"{other}\" for at_console in message bus configuration file"
            ));
        }
    };
    Ok(Parsed::Value(context))
}

/// The attribute names of one side of a message rule.
struct MessageKeys {
    /// `send_*`: also `send_broadcast`, `send_destination_prefix`, `log`.
    send: bool,
    message_type: &'static str,
    path: &'static str,
    interface: &'static str,
    member: &'static str,
    error: &'static str,
    /// `send_destination` / `receive_sender`.
    name: &'static str,
    requested_reply: &'static str,
}

const SEND: MessageKeys = MessageKeys {
    send: true,
    message_type: "send_type",
    path: "send_path",
    interface: "send_interface",
    member: "send_member",
    error: "send_error",
    name: "send_destination",
    requested_reply: "send_requested_reply",
};

const RECEIVE: MessageKeys = MessageKeys {
    send: false,
    message_type: "receive_type",
    path: "receive_path",
    interface: "receive_interface",
    member: "receive_member",
    error: "receive_error",
    name: "receive_sender",
    requested_reply: "receive_requested_reply",
};

/// `dbus_message_type_from_string`.
fn message_type(name: &str) -> Option<MessageType> {
    Some(match name {
        "method_call" => MessageType::MethodCall,
        "method_return" => MessageType::MethodReturn,
        "signal" => MessageType::Signal,
        "error" => MessageType::Error,
        _ => return None,
    })
}

/// An `<allow>` (`allow` true) or `<deny>`.
pub(crate) fn parse_rule(
    allow: bool,
    attributes: &[(String, String)],
    accounts: &dyn Accounts,
) -> Result<Parsed<Rule>, String> {
    let element = if allow { "allow" } else { "deny" };
    let a = Attributes::locate(element, attributes, RULE_ATTRIBUTES)?;
    let any_send = [
        "send_destination",
        "send_destination_prefix",
        "send_broadcast",
        "send_path",
        "send_type",
        "send_interface",
        "send_member",
        "send_error",
        "send_requested_reply",
    ]
    .iter()
    .any(|k| a.has(k));
    // `<allow eavesdrop="true"/>` alone is a receive rule.
    let any_receive = [
        "receive_sender",
        "receive_path",
        "receive_type",
        "receive_interface",
        "receive_member",
        "receive_error",
        "receive_requested_reply",
    ]
    .iter()
    .any(|k| a.has(k))
        || (!any_send && a.has("eavesdrop"));
    let any_message =
        any_send || any_receive || ["eavesdrop", "max_fds", "min_fds"].iter().any(|k| a.has(k));
    let (own, own_prefix, user, group) = (
        a.get("own"),
        a.get("own_prefix"),
        a.get("user"),
        a.get("group"),
    );
    let others = [own, own_prefix, user, group]
        .iter()
        .filter(|v| v.is_some())
        .count();

    if !any_send && !any_receive && others == 0 {
        return Err(format!(
            "Element <{element}> must have one or more attributes"
        ));
    }
    for keys in [&SEND, &RECEIVE] {
        if a.has(keys.member) && !a.has(keys.interface) && !a.has(keys.path) {
            return Err(format!(
                "On element <{element}>, if you specify a member you must specify an interface \
                 or a path. Keep in mind that not all messages have an interface field."
            ));
        }
    }
    let invalid =
        |what: &str| format!("Invalid combination of attributes on element <{element}>: {what}");
    if usize::from(any_message) + others > 1 {
        return Err(invalid(
            "own, own_prefix, user, group and the message-related attributes cannot be combined",
        ));
    }
    if any_send && any_receive {
        return Err(invalid("send and receive attributes cannot be combined"));
    }
    if (a.has("send_member") || a.has("send_interface")) && a.has("send_error") {
        return Err(invalid(
            "send_error cannot be combined with send_member or send_interface",
        ));
    }
    if a.has("send_destination") && a.has("send_destination_prefix") {
        return Err(invalid(
            "send_destination cannot be combined with send_destination_prefix",
        ));
    }
    if (a.has("receive_member") || a.has("receive_interface")) && a.has("receive_error") {
        return Err(invalid(
            "receive_error cannot be combined with receive_member or receive_interface",
        ));
    }

    let kind = if any_send {
        RuleKind::Send(message_rule(&a, &SEND, allow)?)
    } else if any_receive {
        RuleKind::Receive(message_rule(&a, &RECEIVE, allow)?)
    } else if let Some(own) = own {
        RuleKind::Own {
            name: (own != "*").then(|| own.to_owned()),
            prefix: false,
        }
    } else if let Some(prefix) = own_prefix {
        // No wildcard: `own_prefix="*"` is the literal prefix "*".
        RuleKind::Own {
            name: Some(prefix.to_owned()),
            prefix: true,
        }
    } else {
        // The first check above leaves `user` or `group`.
        let (account, name, kind): (_, _, fn(Option<u32>) -> RuleKind) = match user {
            Some(user) => (Account::User, user, RuleKind::User),
            None => (Account::Group, group.unwrap_or("*"), RuleKind::Group),
        };
        if name == "*" {
            kind(None)
        } else {
            match account_id(accounts, account, name) {
                Ok(id) => kind(Some(id)),
                Err(unknown) => {
                    return Ok(Parsed::Dropped {
                        warning: format!("{unknown} on element <{element}>"),
                    });
                }
            }
        }
    };
    Ok(Parsed::Value(Rule { allow, kind }))
}

/// The send or receive half of `append_rule_from_element`, checks in
/// dbus-daemon's order.
fn message_rule(
    a: &Attributes<'_>,
    keys: &MessageKeys,
    allow: bool,
) -> Result<MessageRule, String> {
    let message_type = match a.pattern(keys.message_type) {
        None => None,
        Some(name) => {
            Some(message_type(name).ok_or_else(|| format!("Bad message type \"{name}\""))?)
        }
    };
    let eavesdrop = a.boolean("eavesdrop")?.unwrap_or(false);
    let mut rule = MessageRule {
        message_type,
        path: a.pattern(keys.path).map(str::to_owned),
        interface: a.pattern(keys.interface).map(str::to_owned),
        member: a.pattern(keys.member).map(str::to_owned),
        error: a.pattern(keys.error).map(str::to_owned),
        name: a.pattern(keys.name).map(str::to_owned),
        eavesdrop,
        ..MessageRule::unset(allow)
    };
    if keys.send {
        rule.broadcast = a.boolean("send_broadcast")?;
        // After the wildcard: `send_destination="*"` goes with a broadcast.
        if let (Some(true), Some(destination)) = (rule.broadcast, &rule.name) {
            return Err(format!(
                "Rule with send_broadcast=\"true\" and send_destination=\"{destination}\" \
                 cannot match anything"
            ));
        }
        if let Some(prefix) = a.get("send_destination_prefix") {
            rule.name = Some(prefix.to_owned());
            rule.name_is_prefix = true;
        }
        rule.log = a.get("log") == Some("true");
    }
    if let Some(requested_reply) = a.boolean(keys.requested_reply)? {
        rule.requested_reply = requested_reply;
    }
    rule.max_fds = fds_attribute("max_fds", a.get("max_fds"), u32::MAX)?;
    rule.min_fds = fds_attribute("min_fds", a.get("min_fds"), 0)?;
    Ok(rule)
}

impl MessageRule {
    /// The message rule of an `<allow>` (`allow` true) or `<deny>` that
    /// names no message field: any message, `requested_reply` at
    /// dbus-daemon's default (true for allow, false for deny).
    pub(crate) fn unset(allow: bool) -> MessageRule {
        MessageRule {
            requested_reply: allow,
            ..MessageRule::default()
        }
    }
}

impl Policy {
    /// File a parsed rule under its `<policy>`'s context, in order. `user`
    /// and `group` rules are connect-time, bus-global rules: dbus-daemon
    /// refuses them in a `user=` or `group=` policy.
    pub(crate) fn add_rule(&mut self, context: PolicyContext, rule: Rule) -> Result<(), String> {
        let global = matches!(rule.kind, RuleKind::User(_) | RuleKind::Group(_));
        let element = if rule.allow { "allow" } else { "deny" };
        let list = match context {
            PolicyContext::Default => &mut self.default,
            PolicyContext::Mandatory => &mut self.mandatory,
            PolicyContext::User(_) | PolicyContext::Group(_) if global => {
                let per = if matches!(context, PolicyContext::User(_)) {
                    "per-user"
                } else {
                    "per-group"
                };
                return Err(format!(
                    "<{element}> rule cannot be {per} because it has bus-global semantics"
                ));
            }
            PolicyContext::User(uid) => self.by_user.entry(uid).or_default(),
            PolicyContext::Group(gid) => self.by_group.entry(gid).or_default(),
            PolicyContext::AtConsole(true) => &mut self.at_console,
            PolicyContext::AtConsole(false) => &mut self.not_at_console,
        };
        list.push(rule);
        Ok(())
    }

    /// What dbus-daemon's `session.conf` allows: everybody sends, receives
    /// and eavesdrops on everything and owns any name. The policy of
    /// busvisor's own (TOML) configuration.
    pub(crate) fn allow_all() -> Policy {
        let everything = MessageRule {
            eavesdrop: true,
            ..MessageRule::unset(true)
        };
        let allow = |kind| Rule { allow: true, kind };
        Policy {
            default: vec![
                allow(RuleKind::Send(everything.clone())),
                allow(RuleKind::Receive(everything)),
                allow(RuleKind::Own {
                    name: None,
                    prefix: false,
                }),
            ],
            ..Policy::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Users root (0) and alice (1000); groups root (0) and wheel (10).
    struct FakeAccounts;

    fn lookup(s: &str, table: &[(&str, u32)]) -> Option<u32> {
        match id_number(s) {
            Some(n) => table.iter().any(|&(_, id)| id == n).then_some(n),
            None => table.iter().find(|&&(k, _)| k == s).map(|&(_, id)| id),
        }
    }

    impl Accounts for FakeAccounts {
        fn user_id(&self, user: &str) -> Option<u32> {
            lookup(user, &[("root", 0), ("alice", 1000)])
        }
        fn group_id(&self, group: &str) -> Option<u32> {
            lookup(group, &[("root", 0), ("wheel", 10)])
        }
    }

    /// `a="1" b="two words"` as the XML parser hands it over.
    fn attrs(text: &str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut rest = text.trim();
        while !rest.is_empty() {
            let (key, after) = rest.split_once("=\"").expect(text);
            let (value, after) = after.split_once('"').expect(text);
            out.push((key.trim().to_owned(), value.to_owned()));
            rest = after.trim_start();
        }
        out
    }

    fn rule(allow: bool, text: &str) -> Result<Parsed<Rule>, String> {
        parse_rule(allow, &attrs(text), &FakeAccounts)
    }

    fn ok_rule(allow: bool, text: &str) -> Rule {
        match rule(allow, text) {
            Ok(Parsed::Value(r)) => r,
            other => panic!("{text}: {other:?}"),
        }
    }

    fn message(allow: bool, text: &str) -> MessageRule {
        match ok_rule(allow, text).kind {
            RuleKind::Send(m) | RuleKind::Receive(m) => m,
            other => panic!("{text}: {other:?}"),
        }
    }

    /// A message rule as `<allow>`/`<deny>` with nothing but `f` gives it.
    fn expected(allow: bool, f: impl FnOnce(&mut MessageRule)) -> MessageRule {
        let mut m = MessageRule::unset(allow);
        f(&mut m);
        m
    }

    #[test]
    fn send_and_receive_fields_and_wildcards() {
        type Field = fn(&MessageRule) -> Option<&str>;
        let fields: &[(&str, &str, Field)] = &[
            ("send_interface", "", |m| m.interface.as_deref()),
            ("send_member", "send_path=\"/\"", |m| m.member.as_deref()),
            ("send_error", "", |m| m.error.as_deref()),
            ("send_destination", "", |m| m.name.as_deref()),
            ("send_path", "", |m| m.path.as_deref()),
            ("receive_interface", "", |m| m.interface.as_deref()),
            ("receive_member", "receive_interface=\"i\"", |m| {
                m.member.as_deref()
            }),
            ("receive_error", "", |m| m.error.as_deref()),
            ("receive_sender", "", |m| m.name.as_deref()),
            ("receive_path", "", |m| m.path.as_deref()),
        ];
        for &(attr, with, field) in fields {
            for allow in [true, false] {
                let m = message(allow, &format!("{attr}=\"a.b\" {with}"));
                assert_eq!(field(&m), Some("a.b"), "{attr}");
                assert!(!m.name_is_prefix, "{attr}");
                assert_eq!(m.requested_reply, allow, "{attr}");
                let m = message(allow, &format!("{attr}=\"*\" {with}"));
                assert_eq!(field(&m), None, "{attr}=\"*\"");
                // Only a lone `*` is a wildcard.
                let m = message(allow, &format!("{attr}=\"a.*\" {with}"));
                assert_eq!(field(&m), Some("a.*"), "{attr}");
            }
        }
        let send = ok_rule(true, "send_path=\"/x\"");
        assert!(matches!(send.kind, RuleKind::Send(_)));
        let receive = ok_rule(true, "receive_path=\"/x\"");
        assert!(matches!(receive.kind, RuleKind::Receive(_)));
        assert_eq!(
            message(
                false,
                "send_destination=\"a\" send_interface=\"i\" send_type=\"signal\""
            ),
            expected(false, |m| {
                m.name = Some("a".into());
                m.interface = Some("i".into());
                m.message_type = Some(MessageType::Signal);
            })
        );
    }

    #[test]
    fn message_types() {
        for (name, t) in [
            ("method_call", Some(MessageType::MethodCall)),
            ("method_return", Some(MessageType::MethodReturn)),
            ("signal", Some(MessageType::Signal)),
            ("error", Some(MessageType::Error)),
            ("*", None),
        ] {
            for attr in ["send_type", "receive_type"] {
                let m = message(true, &format!("{attr}=\"{name}\""));
                assert_eq!(m.message_type, t, "{attr}={name}");
            }
        }
        for bad in ["bogus", "", "Signal", "method-call"] {
            for attr in ["send_type", "receive_type"] {
                assert_eq!(
                    rule(true, &format!("{attr}=\"{bad}\"")),
                    Err(format!("Bad message type \"{bad}\"")),
                );
            }
        }
    }

    #[test]
    fn prefixes_take_no_wildcard() {
        let m = message(true, "send_destination_prefix=\"*\"");
        assert_eq!(
            m,
            expected(true, |m| {
                m.name = Some("*".into());
                m.name_is_prefix = true;
            })
        );
        let m = message(false, "send_destination_prefix=\"com.example\"");
        assert_eq!(
            (m.name.as_deref(), m.name_is_prefix),
            (Some("com.example"), true)
        );
        for (text, name, prefix) in [
            ("own=\"*\"", None, false),
            ("own=\"com.example.A\"", Some("com.example.A"), false),
            ("own_prefix=\"*\"", Some("*"), true),
            ("own_prefix=\"com.example\"", Some("com.example"), true),
        ] {
            assert_eq!(
                ok_rule(false, text),
                Rule {
                    allow: false,
                    kind: RuleKind::Own {
                        name: name.map(str::to_owned),
                        prefix
                    }
                },
                "{text}"
            );
        }
    }

    #[test]
    fn requested_reply_defaults() {
        for (allow, text, want) in [
            (true, "send_type=\"*\"", true),
            (false, "send_type=\"*\"", false),
            (true, "receive_type=\"*\"", true),
            (false, "receive_type=\"*\"", false),
            (true, "send_requested_reply=\"false\"", false),
            (false, "send_requested_reply=\"true\"", true),
            (true, "receive_requested_reply=\"false\"", false),
            (false, "receive_requested_reply=\"true\"", true),
            (false, "eavesdrop=\"true\"", false),
        ] {
            assert_eq!(message(allow, text).requested_reply, want, "{allow} {text}");
        }
        // A *_requested_reply alone makes a rule of its side.
        assert!(matches!(
            ok_rule(true, "send_requested_reply=\"true\"").kind,
            RuleKind::Send(_)
        ));
        assert!(matches!(
            ok_rule(true, "receive_requested_reply=\"true\"").kind,
            RuleKind::Receive(_)
        ));
    }

    #[test]
    fn eavesdrop() {
        // Alone it is a receive rule matching everything.
        for (text, on) in [("eavesdrop=\"true\"", true), ("eavesdrop=\"false\"", false)] {
            let r = ok_rule(true, text);
            let want = expected(true, |m| m.eavesdrop = on);
            assert_eq!(r.kind, RuleKind::Receive(want), "{text}");
        }
        // With send attributes it stays a send rule.
        let r = ok_rule(true, "send_destination=\"*\" eavesdrop=\"true\"");
        assert_eq!(
            r.kind,
            RuleKind::Send(expected(true, |m| m.eavesdrop = true))
        );
        let m = message(false, "receive_sender=\"a\" eavesdrop=\"true\"");
        assert!(m.eavesdrop);
        assert!(!message(true, "receive_sender=\"a\"").eavesdrop);
    }

    #[test]
    fn broadcast_and_log() {
        for (text, want) in [
            ("send_broadcast=\"true\"", Some(true)),
            ("send_broadcast=\"false\"", Some(false)),
            ("send_type=\"signal\"", None),
            // `*` is no destination: a broadcast can match.
            ("send_destination=\"*\" send_broadcast=\"true\"", Some(true)),
            (
                "send_destination=\"a\" send_broadcast=\"false\"",
                Some(false),
            ),
            // dbus-daemon checks send_destination only.
            (
                "send_destination_prefix=\"a\" send_broadcast=\"true\"",
                Some(true),
            ),
        ] {
            assert_eq!(message(true, text).broadcast, want, "{text}");
        }
        for (text, want) in [
            ("send_type=\"*\" log=\"true\"", true),
            ("send_type=\"*\" log=\"false\"", false),
            ("send_type=\"*\" log=\"yes\"", false),
            ("send_type=\"*\"", false),
            // Receive rules do not log.
            ("receive_type=\"*\" log=\"true\"", false),
        ] {
            assert_eq!(message(true, text).log, want, "{text}");
        }
        // `log` counts for nothing else: an own rule takes it, and it is no
        // attribute of its own.
        assert_eq!(
            ok_rule(true, "own=\"a\" log=\"true\""),
            ok_rule(true, "own=\"a\"")
        );
        assert_eq!(
            rule(true, "log=\"true\""),
            Err("Element <allow> must have one or more attributes".into())
        );
    }

    #[test]
    fn fd_ranges() {
        let m = message(true, "send_type=\"*\"");
        assert_eq!((m.min_fds, m.max_fds), (0, u32::MAX));
        for (value, want) in [
            ("0", 0),
            ("1", 1),
            ("33554432", MAX_MESSAGE_UNIX_FDS),
            // strtol(…, 0): hex, octal, white space, a sign, trailing text.
            ("0x10", 16),
            ("010", 8),
            ("08", 0),
            (" 7", 7),
            ("+3", 3),
            ("-0", 0),
            ("12abc", 12),
            ("0x", 0),
        ] {
            for side in ["send_type=\"*\"", "receive_type=\"*\""] {
                let m = message(
                    false,
                    &format!("{side} min_fds=\"{value}\" max_fds=\"{value}\""),
                );
                assert_eq!((m.min_fds, m.max_fds), (want, want), "{value}");
            }
        }
        for value in ["33554433", "-1", "", "abc", " ", "99999999999999999999999"] {
            for attr in ["min_fds", "max_fds"] {
                assert_eq!(
                    rule(true, &format!("receive_sender=\"*\" {attr}=\"{value}\"")),
                    Err(format!(
                        "Bad value \"{value}\" for {attr} attribute, must be an integer in \
                         range 0 to 33554432 inclusive"
                    )),
                );
            }
        }
    }

    #[test]
    fn users_and_groups() {
        for (text, kind) in [
            ("user=\"*\"", RuleKind::User(None)),
            ("user=\"root\"", RuleKind::User(Some(0))),
            ("user=\"1000\"", RuleKind::User(Some(1000))),
            ("user=\"alice\"", RuleKind::User(Some(1000))),
            ("group=\"*\"", RuleKind::Group(None)),
            ("group=\"wheel\"", RuleKind::Group(Some(10))),
            ("group=\"0\"", RuleKind::Group(Some(0))),
        ] {
            assert_eq!(ok_rule(true, text).kind, kind, "{text}");
        }
        for (allow, text, warning) in [
            (
                true,
                "user=\"bob\"",
                "Unknown username \"bob\" on element <allow>",
            ),
            // A number must be an existing id too.
            (
                false,
                "user=\"4242\"",
                "Unknown username \"4242\" on element <deny>",
            ),
            (
                true,
                "group=\"staff\"",
                "Unknown group \"staff\" on element <allow>",
            ),
            (
                true,
                "group=\"-1\"",
                "Unknown group \"-1\" on element <allow>",
            ),
        ] {
            assert_eq!(
                rule(allow, text),
                Ok(Parsed::Dropped {
                    warning: warning.into()
                }),
                "{text}"
            );
        }
    }

    #[test]
    fn rule_errors() {
        let combination =
            |what: &str| format!("Invalid combination of attributes on element <allow>: {what}");
        let own_etc = combination(
            "own, own_prefix, user, group and the message-related attributes cannot be combined",
        );
        let send_receive = combination("send and receive attributes cannot be combined");
        let member = "On element <allow>, if you specify a member you must specify an interface \
                      or a path. Keep in mind that not all messages have an interface field.";
        let cases: &[(&str, String)] = &[
            (
                "",
                "Element <allow> must have one or more attributes".into(),
            ),
            (
                "max_fds=\"1\"",
                "Element <allow> must have one or more attributes".into(),
            ),
            (
                "min_fds=\"1\" log=\"true\"",
                "Element <allow> must have one or more attributes".into(),
            ),
            ("send_member=\"M\"", member.into()),
            ("receive_member=\"M\"", member.into()),
            ("send_member=\"M\" receive_interface=\"i\"", member.into()),
            ("own=\"a\" user=\"root\"", own_etc.clone()),
            ("own=\"a\" own_prefix=\"b\"", own_etc.clone()),
            ("user=\"*\" group=\"*\"", own_etc.clone()),
            ("own=\"a\" send_destination=\"a\"", own_etc.clone()),
            ("group=\"*\" eavesdrop=\"true\"", own_etc.clone()),
            ("own=\"a\" max_fds=\"1\"", own_etc.clone()),
            ("user=\"nobody-at-all\" min_fds=\"1\"", own_etc.clone()),
            ("send_path=\"/\" receive_path=\"/\"", send_receive.clone()),
            (
                "send_destination=\"a\" receive_sender=\"b\"",
                send_receive.clone(),
            ),
            (
                "receive_type=\"signal\" send_requested_reply=\"true\"",
                send_receive.clone(),
            ),
            (
                "send_error=\"e\" send_interface=\"i\"",
                combination("send_error cannot be combined with send_member or send_interface"),
            ),
            (
                "send_error=\"e\" send_member=\"m\" send_path=\"/\"",
                combination("send_error cannot be combined with send_member or send_interface"),
            ),
            (
                "receive_error=\"e\" receive_interface=\"*\"",
                combination(
                    "receive_error cannot be combined with receive_member or receive_interface",
                ),
            ),
            (
                "send_destination=\"a\" send_destination_prefix=\"b\"",
                combination("send_destination cannot be combined with send_destination_prefix"),
            ),
            (
                "send_broadcast=\"true\" send_destination=\"com.example.Bees\"",
                "Rule with send_broadcast=\"true\" and send_destination=\"com.example.Bees\" \
                 cannot match anything"
                    .into(),
            ),
            (
                "send_path=\"/\" eavesdrop=\"maybe\"",
                "Bad value \"maybe\" for eavesdrop attribute, must be true or false".into(),
            ),
            (
                "eavesdrop=\"TRUE\"",
                "Bad value \"TRUE\" for eavesdrop attribute, must be true or false".into(),
            ),
            (
                "send_broadcast=\"1\"",
                "Bad value \"1\" for send_broadcast attribute, must be true or false".into(),
            ),
            (
                "send_requested_reply=\"yes\"",
                "Bad value \"yes\" for send_requested_reply attribute, must be true or false"
                    .into(),
            ),
            (
                "receive_requested_reply=\"\"",
                "Bad value \"\" for receive_requested_reply attribute, must be true or false"
                    .into(),
            ),
            // dbus-daemon's order: the type before the booleans, the
            // booleans before the fds.
            (
                "send_type=\"bogus\" eavesdrop=\"maybe\"",
                "Bad message type \"bogus\"".into(),
            ),
            (
                "receive_type=\"*\" max_fds=\"x\" eavesdrop=\"maybe\"",
                "Bad value \"maybe\" for eavesdrop attribute, must be true or false".into(),
            ),
            (
                "species=\"stoat\"",
                "Attribute \"species\" is invalid on <allow> element in this context".into(),
            ),
            (
                "own=\"a\" own=\"b\"",
                "Attribute \"own\" repeated twice on the same <allow> element".into(),
            ),
        ];
        for (text, want) in cases {
            assert_eq!(rule(true, text).as_ref(), Err(want), "{text}");
        }
        assert_eq!(
            rule(false, ""),
            Err("Element <deny> must have one or more attributes".into())
        );
    }

    fn policy(text: &str) -> Result<Parsed<PolicyContext>, String> {
        parse_policy(&attrs(text), &FakeAccounts)
    }

    #[test]
    fn policy_elements() {
        for (text, context) in [
            ("context=\"default\"", PolicyContext::Default),
            ("context=\"mandatory\"", PolicyContext::Mandatory),
            ("user=\"root\"", PolicyContext::User(0)),
            ("user=\"1000\"", PolicyContext::User(1000)),
            ("group=\"wheel\"", PolicyContext::Group(10)),
            ("at_console=\"true\"", PolicyContext::AtConsole(true)),
            ("at_console=\"false\"", PolicyContext::AtConsole(false)),
        ] {
            assert_eq!(policy(text), Ok(Parsed::Value(context)), "{text}");
        }
        for (text, warning) in [
            (
                "user=\"bob\"",
                "Unknown username \"bob\" in message bus configuration file",
            ),
            (
                "user=\"4242\"",
                "Unknown username \"4242\" in message bus configuration file",
            ),
            (
                "group=\"staff\"",
                "Unknown group \"staff\" in message bus configuration file",
            ),
        ] {
            assert_eq!(
                policy(text),
                Ok(Parsed::Dropped {
                    warning: warning.into()
                }),
                "{text}"
            );
        }
        let exactly_one =
            "<policy> element must have exactly one of (context|user|group|at_console) attributes";
        for (text, error) in [
            ("", exactly_one.to_owned()),
            ("user=\"root\" at_console=\"true\"", exactly_one.to_owned()),
            (
                "context=\"default\" group=\"wheel\"",
                exactly_one.to_owned(),
            ),
            // Checked before the user is looked up.
            ("user=\"bob\" group=\"staff\"", exactly_one.to_owned()),
            (
                "context=\"Default\"",
                "context attribute on <policy> must have the value \"default\" or \
                 \"mandatory\", not \"Default\""
                    .to_owned(),
            ),
            (
                "at_console=\"yes\"",
                "Unknown value \"yes\" for at_console in message bus configuration file".to_owned(),
            ),
            (
                "hat=\"top\"",
                "Attribute \"hat\" is invalid on <policy> element in this context".to_owned(),
            ),
            (
                "context=\"default\" context=\"default\"",
                "Attribute \"context\" repeated twice on the same <policy> element".to_owned(),
            ),
        ] {
            assert_eq!(policy(text), Err(error), "{text}");
        }
    }

    #[test]
    fn rules_filed_by_context_in_order() {
        let mut p = Policy::default();
        let own = |name: &str| ok_rule(true, &format!("own=\"{name}\""));
        let contexts = [
            PolicyContext::Default,
            PolicyContext::Mandatory,
            PolicyContext::User(1000),
            PolicyContext::Group(10),
            PolicyContext::AtConsole(true),
            PolicyContext::AtConsole(false),
        ];
        for round in ["a", "b"] {
            for (i, &c) in contexts.iter().enumerate() {
                p.add_rule(c, own(&format!("{round}{i}"))).unwrap();
            }
        }
        let two = |i: usize| vec![own(&format!("a{i}")), own(&format!("b{i}"))];
        assert_eq!(p.default, two(0));
        assert_eq!(p.mandatory, two(1));
        assert_eq!(p.by_user.into_iter().collect::<Vec<_>>(), [(1000, two(2))]);
        assert_eq!(p.by_group.into_iter().collect::<Vec<_>>(), [(10, two(3))]);
        assert_eq!(p.at_console, two(4));
        assert_eq!(p.not_at_console, two(5));
    }

    #[test]
    fn connection_rules_are_bus_global() {
        let mut p = Policy::default();
        for (c, text, error) in [
            (
                PolicyContext::User(0),
                "user=\"root\"",
                "<allow> rule cannot be per-user because it has bus-global semantics",
            ),
            (
                PolicyContext::User(0),
                "group=\"*\"",
                "<allow> rule cannot be per-user because it has bus-global semantics",
            ),
            (
                PolicyContext::Group(10),
                "user=\"*\"",
                "<allow> rule cannot be per-group because it has bus-global semantics",
            ),
        ] {
            assert_eq!(p.add_rule(c, ok_rule(true, text)), Err(error.to_owned()));
        }
        let deny_group = ok_rule(false, "group=\"wheel\"");
        assert_eq!(
            p.add_rule(PolicyContext::Group(0), deny_group.clone()),
            Err("<deny> rule cannot be per-group because it has bus-global semantics".into())
        );
        assert_eq!(p, Policy::default());
        // Accepted (and never used at connect time) in at_console policies.
        for c in [
            PolicyContext::Default,
            PolicyContext::Mandatory,
            PolicyContext::AtConsole(true),
        ] {
            p.add_rule(c, deny_group.clone()).unwrap();
        }
    }

    #[test]
    fn allow_all_is_session_conf() {
        let mut p = Policy::default();
        for text in [
            "send_destination=\"*\" eavesdrop=\"true\"",
            "eavesdrop=\"true\"",
            "own=\"*\"",
        ] {
            p.add_rule(PolicyContext::Default, ok_rule(true, text))
                .unwrap();
        }
        assert_eq!(p, Policy::allow_all());
    }

    #[test]
    fn numbers_as_strtol_reads_them() {
        for (s, want) in [
            ("0", Some((false, 0, ""))),
            ("  42", Some((false, 42, ""))),
            ("-7x", Some((true, 7, "x"))),
            ("0x1F", Some((false, 31, ""))),
            ("0X1f", Some((false, 31, ""))),
            ("0xg", Some((false, 0, "xg"))),
            ("017", Some((false, 15, ""))),
            ("09", Some((false, 0, "9"))),
            ("", None),
            ("-", None),
            ("x1", None),
            ("18446744073709551616", None),
        ] {
            assert_eq!(c_strtol(s), want, "{s:?}");
        }
        assert_eq!(id_number("1000"), Some(1000));
        assert_eq!(id_number("1000 "), None);
        assert_eq!(id_number("4294967296"), None);
        assert_eq!(id_number("-1"), None);
        assert_eq!(id_number("root"), None);
    }
}
