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

use std::cell::OnceCell;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::hash::Hash;

use zbus::message::{Header, Message, Type};

/// Longest match rule text dbus-daemon accepts (`DBUS_MAXIMUM_MATCH_RULE_LENGTH`).
pub const MAX_RULE_LENGTH: usize = 1024;
/// Highest `N` of an `argN` key (`DBUS_MAXIMUM_MATCH_RULE_ARG_NUMBER`).
pub const MAX_ARG_NUMBER: u8 = 63;
/// Most `key='value'` pairs in one rule (dbus-daemon's `MAX_RULE_TOKENS`).
const MAX_RULE_TOKENS: usize = 64;
/// Longest bus name, interface or member (`DBUS_MAXIMUM_NAME_LENGTH`).
const MAX_NAME_LENGTH: usize = 255;

/// Why a match rule was rejected. Its `Display` text is meant for the error reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MatchRuleError {
    /// The rule text is longer than [`MAX_RULE_LENGTH`] bytes. dbus-daemon replies with
    /// `org.freedesktop.DBus.Error.LimitsExceeded` for this one.
    #[error("Match rule text is {0} bytes, maximum is {MAX_RULE_LENGTH}")]
    TooLong(usize),
    /// More `key='value'` pairs than dbus-daemon handles.
    #[error("Match rule has more than {MAX_RULE_TOKENS} keys")]
    TooManyKeys,
    /// A key not followed by `=`.
    #[error("Match rule has a key with no subsequent '=' character")]
    MissingEquals,
    /// An `=` with no key before it.
    #[error("Match rule has a value with no key before its '=' character")]
    EmptyKey,
    /// An opening apostrophe without its closing one.
    #[error("Unbalanced quotation marks in match rule")]
    UnbalancedQuotes,
    /// A key that no match rule has.
    #[error("Unknown key \"{0}\" in match rule")]
    UnknownKey(String),
    /// The same key twice.
    #[error("Key {0} specified twice in match rule")]
    DuplicateKey(String),
    /// Both `path` and `path_namespace`, or one of them twice.
    #[error("path or path_namespace specified twice in match rule")]
    PathTwice,
    /// A `type` that is not a message type.
    #[error("Invalid message type ({0}) in match rule")]
    InvalidType(String),
    /// A value that is not valid for its key.
    #[error("{key}='{value}' is invalid in match rule: {reason}")]
    InvalidValue {
        /// The key.
        key: String,
        /// The value given for it.
        value: String,
        /// What the value should have been.
        reason: &'static str,
    },
    /// `arg` without a number after it.
    #[error(
        "Key '{0}' in match rule starts with 'arg' but lacks an arg number. Should be 'arg0' or 'arg7' for example"
    )]
    ArgNumberMissing(String),
    /// `argN` followed by something other than `path` (or `arg0` by `namespace`).
    #[error(
        "Key '{0}' in match rule contains junk after argument number. Only 'arg<N>path' (for example 'arg0path') or 'arg0namespace' are valid"
    )]
    ArgJunk(String),
    /// `argN` with `N` above [`MAX_ARG_NUMBER`].
    #[error("Key '{0}' in match rule has an arg number above the maximum of {MAX_ARG_NUMBER}")]
    ArgNumberTooBig(String),
    /// Two keys on the same argument (`arg0` and `arg0path`, say).
    #[error("Argument {0} matched more than once in match rule")]
    ArgTwice(u8),
}

impl MatchRuleError {
    /// The D-Bus error name dbus-daemon replies with for this error.
    pub fn dbus_error_name(&self) -> &'static str {
        match self {
            MatchRuleError::TooLong(_) => "org.freedesktop.DBus.Error.LimitsExceeded",
            _ => "org.freedesktop.DBus.Error.MatchRuleInvalid",
        }
    }
}

/// How a rule's `argN`, `argNpath` or `arg0namespace` key compares argument `N`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ArgMatch {
    /// `argN='v'`: the argument is a STRING equal to `v`.
    Str(Box<str>),
    /// `argNpath='v'`: the argument is a STRING or OBJECT_PATH "path-equal" to `v`.
    Path(Box<str>),
    /// `arg0namespace='v'`: the argument is a STRING equal to `v` or starting with `v.`.
    Namespace(Box<str>),
}

impl ArgMatch {
    /// The value given in the rule.
    pub fn value(&self) -> &str {
        match self {
            ArgMatch::Str(v) | ArgMatch::Path(v) | ArgMatch::Namespace(v) => v,
        }
    }

    fn matches(&self, arg: Arg<'_>) -> bool {
        match self {
            ArgMatch::Str(v) => !arg.is_path && arg.value == &**v,
            ArgMatch::Namespace(v) => {
                !arg.is_path
                    && arg.value.strip_prefix(&**v).is_some_and(|rest| {
                        rest.is_empty() || rest.as_bytes().first() == Some(&b'.')
                    })
            }
            ArgMatch::Path(v) => path_arg_matches(v, arg.value),
        }
    }
}

/// `argNpath` comparison, as dbus-daemon does it: equal, or the shorter of the two ends with `/`
/// and is a prefix of the other.
fn path_arg_matches(expected: &str, actual: &str) -> bool {
    use std::cmp::Ordering;
    match expected.len().cmp(&actual.len()) {
        Ordering::Equal => expected == actual,
        Ordering::Less => expected.ends_with('/') && actual.starts_with(expected),
        Ordering::Greater => actual.ends_with('/') && expected.starts_with(actual),
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum PathMatch {
    Exact(Box<str>),
    Namespace(Box<str>),
}

/// A parsed match rule.
///
/// Equality and hashing are on the meaning of the rule, not its text: `eavesdrop='false'` is the
/// same as no `eavesdrop` key, and key order, whitespace and quoting do not matter.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct MatchRule {
    msg_type: Option<Type>,
    sender: Option<Box<str>>,
    interface: Option<Box<str>>,
    member: Option<Box<str>>,
    path: Option<PathMatch>,
    destination: Option<Box<str>>,
    /// Sorted by argument number, at most one per number.
    args: Box<[(u8, ArgMatch)]>,
    eavesdrop: bool,
}

fn is_white(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// Split a rule text into `(key, value)` pairs the way dbus-daemon's `tokenize_rule` does.
fn tokenize(text: &str) -> Result<Vec<(&str, String)>, MatchRuleError> {
    let bytes = text.as_bytes();
    let mut tokens = Vec::new();
    let mut pos = 0;
    loop {
        // find_key
        while pos < bytes.len() && is_white(bytes[pos]) {
            pos += 1;
        }
        let key_start = pos;
        while pos < bytes.len() && bytes[pos] != b'=' && !is_white(bytes[pos]) {
            pos += 1;
        }
        let key_end = pos;
        while pos < bytes.len() && is_white(bytes[pos]) {
            pos += 1;
        }
        if key_start == key_end {
            // Empty rules and trailing whitespace are fine; an `=` without a key is not (where
            // dbus-daemon silently ignores the rest of the rule).
            if pos < bytes.len() {
                return Err(MatchRuleError::EmptyKey);
            }
            return Ok(tokens);
        }
        if bytes.get(pos) != Some(&b'=') {
            return Err(MatchRuleError::MissingEquals);
        }
        pos += 1;
        // Keys end at ASCII bytes, so these are char boundaries.
        let key = text.get(key_start..key_end).unwrap_or_default();

        // find_value
        let mut value = String::new();
        let mut quote: Option<char> = None;
        let rest = text.get(pos..).unwrap_or_default();
        let mut consumed = rest.len();
        for (i, c) in rest.char_indices() {
            match quote {
                None => match c {
                    '\'' => quote = Some('\''),
                    '\\' => quote = Some('\\'),
                    ',' => {
                        consumed = i + 1;
                        break;
                    }
                    _ => value.push(c),
                },
                Some('\\') => {
                    // A backslash only escapes an apostrophe.
                    if c != '\'' {
                        value.push('\\');
                    }
                    value.push(c);
                    quote = None;
                }
                Some(_) => {
                    if c == '\'' {
                        quote = None;
                    } else {
                        value.push(c);
                    }
                }
            }
        }
        match quote {
            Some('\\') => value.push('\\'),
            Some(_) => return Err(MatchRuleError::UnbalancedQuotes),
            None => {}
        }
        pos += consumed;
        if tokens.len() == MAX_RULE_TOKENS {
            return Err(MatchRuleError::TooManyKeys);
        }
        tokens.push((key, value));
    }
}

fn invalid(key: &str, value: &str, reason: &'static str) -> MatchRuleError {
    MatchRuleError::InvalidValue {
        key: key.to_owned(),
        value: value.to_owned(),
        reason,
    }
}

fn set_once<T>(
    slot: &mut Option<T>,
    key: &str,
    value: Result<T, MatchRuleError>,
) -> Result<(), MatchRuleError> {
    if slot.is_some() {
        return Err(MatchRuleError::DuplicateKey(key.to_owned()));
    }
    *slot = Some(value?);
    Ok(())
}

fn checked(
    key: &str,
    value: String,
    valid: fn(&str) -> bool,
    reason: &'static str,
) -> Result<Box<str>, MatchRuleError> {
    if valid(&value) {
        Ok(value.into_boxed_str())
    } else {
        Err(invalid(key, &value, reason))
    }
}

/// Makes the [`ArgMatch`] of one kind of `arg` key from its value.
type ArgKind = fn(Box<str>) -> ArgMatch;

fn parse_arg_key(key: &str) -> Result<(u8, ArgKind), MatchRuleError> {
    let rest = key.get(3..).unwrap_or_default();
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return Err(MatchRuleError::ArgNumberMissing(key.to_owned()));
    }
    let (number, suffix) = rest.split_at(digits);
    let kind: ArgKind = match suffix {
        "" => ArgMatch::Str,
        "path" => ArgMatch::Path,
        _ if key == "arg0namespace" => ArgMatch::Namespace,
        _ => return Err(MatchRuleError::ArgJunk(key.to_owned())),
    };
    let n = number
        .bytes()
        .try_fold(0u32, |n, d| {
            n.checked_mul(10)?.checked_add(u32::from(d - b'0'))
        })
        .and_then(|n| u8::try_from(n).ok())
        .filter(|n| *n <= MAX_ARG_NUMBER)
        .ok_or_else(|| MatchRuleError::ArgNumberTooBig(key.to_owned()))?;
    Ok((n, kind))
}

impl MatchRule {
    /// Parse a match rule as dbus-daemon does.
    pub fn parse(text: &str) -> Result<MatchRule, MatchRuleError> {
        if text.len() > MAX_RULE_LENGTH {
            return Err(MatchRuleError::TooLong(text.len()));
        }
        let mut rule = MatchRule::default();
        let mut eavesdrop: Option<bool> = None;
        let mut args: Vec<(u8, ArgMatch)> = Vec::new();
        for (key, value) in tokenize(text)? {
            match key {
                "type" => {
                    let t = match value.as_str() {
                        "signal" => Ok(Type::Signal),
                        "method_call" => Ok(Type::MethodCall),
                        "method_return" => Ok(Type::MethodReturn),
                        "error" => Ok(Type::Error),
                        _ => Err(MatchRuleError::InvalidType(value.clone())),
                    };
                    set_once(&mut rule.msg_type, key, t)?;
                }
                "sender" | "destination" => {
                    let slot = if key == "sender" {
                        &mut rule.sender
                    } else {
                        &mut rule.destination
                    };
                    let v = checked(key, value, valid_bus_name, "not a valid bus name");
                    set_once(slot, key, v)?;
                }
                "interface" => {
                    let v = checked(key, value, valid_interface, "not a valid interface name");
                    set_once(&mut rule.interface, key, v)?;
                }
                "member" => {
                    let v = checked(key, value, valid_member, "not a valid member name");
                    set_once(&mut rule.member, key, v)?;
                }
                "path" | "path_namespace" => {
                    if rule.path.is_some() {
                        return Err(MatchRuleError::PathTwice);
                    }
                    let v = checked(key, value, valid_path, "not a valid object path")?;
                    rule.path = Some(if key == "path" {
                        PathMatch::Exact(v)
                    } else {
                        PathMatch::Namespace(v)
                    });
                }
                "eavesdrop" => {
                    let v = match value.as_str() {
                        "true" => Ok(true),
                        "false" => Ok(false),
                        _ => Err(invalid(key, &value, "it should be 'true' or 'false'")),
                    };
                    set_once(&mut eavesdrop, key, v)?;
                }
                _ if key.starts_with("arg") => {
                    let (n, kind) = parse_arg_key(key)?;
                    if args.iter().any(|(m, _)| *m == n) {
                        return Err(MatchRuleError::ArgTwice(n));
                    }
                    let value = value.into_boxed_str();
                    let m = kind(value);
                    if let ArgMatch::Namespace(v) = &m
                        && !valid_bus_name_full(v, true)
                    {
                        return Err(invalid(key, v, "not a valid prefix of a bus name"));
                    }
                    args.push((n, m));
                }
                _ => return Err(MatchRuleError::UnknownKey(key.to_owned())),
            }
        }
        args.sort_by_key(|(n, _)| *n);
        rule.args = args.into_boxed_slice();
        rule.eavesdrop = eavesdrop.unwrap_or(false);
        Ok(rule)
    }

    /// Whether the rule has `eavesdrop='true'`.
    pub fn eavesdrop(&self) -> bool {
        self.eavesdrop
    }

    /// The `type` key.
    pub fn msg_type(&self) -> Option<Type> {
        self.msg_type
    }

    /// The `sender` key.
    pub fn sender(&self) -> Option<&str> {
        self.sender.as_deref()
    }

    /// The `interface` key.
    pub fn interface(&self) -> Option<&str> {
        self.interface.as_deref()
    }

    /// The `member` key.
    pub fn member(&self) -> Option<&str> {
        self.member.as_deref()
    }

    /// The `destination` key.
    pub fn destination(&self) -> Option<&str> {
        self.destination.as_deref()
    }

    /// The `path` key.
    pub fn path(&self) -> Option<&str> {
        match &self.path {
            Some(PathMatch::Exact(p)) => Some(p),
            _ => None,
        }
    }

    /// The `path_namespace` key.
    pub fn path_namespace(&self) -> Option<&str> {
        match &self.path {
            Some(PathMatch::Namespace(p)) => Some(p),
            _ => None,
        }
    }

    /// The `arg0` key (a plain string match on argument 0), not `arg0path` or `arg0namespace`.
    pub fn arg0(&self) -> Option<&str> {
        match self.args.first() {
            Some((0, ArgMatch::Str(v))) => Some(v),
            _ => None,
        }
    }

    /// The `argN`, `argNpath` and `arg0namespace` keys, by increasing `N`.
    pub fn args(&self) -> impl Iterator<Item = (u8, &ArgMatch)> {
        self.args.iter().map(|(n, m)| (*n, m))
    }

    /// Whether `info`'s message matches every key of this rule but `eavesdrop`, which is for the
    /// bus to apply.
    pub fn matches(&self, info: &MessageInfo<'_>, owners: &dyn Owners) -> bool {
        let headers = self.msg_type.is_none_or(|t| t == info.msg_type)
            && self
                .member
                .as_deref()
                .is_none_or(|m| info.member() == Some(m))
            && self
                .interface
                .as_deref()
                .is_none_or(|i| info.interface() == Some(i))
            && match &self.path {
                None => true,
                Some(PathMatch::Exact(p)) => info.path() == Some(&**p),
                Some(PathMatch::Namespace(ns)) => {
                    info.path().is_some_and(|path| path_in_namespace(path, ns))
                }
            };
        if !headers {
            return false;
        }
        // The bus's answers cost more than comparing strings, and arguments need decoding.
        let names = self
            .destination
            .as_deref()
            .is_none_or(|d| info.destination().is_some() && owners.destination_is(d))
            && self.sender.as_deref().is_none_or(|s| owners.sender_is(s));
        names
            && self
                .args
                .iter()
                .all(|(n, m)| info.arg(usize::from(*n)).is_some_and(|arg| m.matches(arg)))
    }
}

fn path_in_namespace(path: &str, ns: &str) -> bool {
    ns == "/"
        || path
            .strip_prefix(ns)
            .is_some_and(|rest| rest.is_empty() || rest.as_bytes().first() == Some(&b'/'))
}

/// Writes a value so that [`MatchRule::parse`] reads it back: quoted, with each apostrophe as
/// `'\''`.
fn write_value(f: &mut fmt::Formatter<'_>, value: &str) -> fmt::Result {
    f.write_str("'")?;
    let mut parts = value.split('\'');
    if let Some(first) = parts.next() {
        f.write_str(first)?;
    }
    for part in parts {
        f.write_str("'\\''")?;
        f.write_str(part)?;
    }
    f.write_str("'")
}

impl fmt::Display for MatchRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        let mut key = |f: &mut fmt::Formatter<'_>, k: &dyn fmt::Display| -> fmt::Result {
            if !std::mem::take(&mut first) {
                f.write_str(",")?;
            }
            write!(f, "{k}=")
        };
        if let Some(t) = self.msg_type {
            key(f, &"type")?;
            write_value(
                f,
                match t {
                    Type::Signal => "signal",
                    Type::MethodCall => "method_call",
                    Type::MethodReturn => "method_return",
                    Type::Error => "error",
                },
            )?;
        }
        let strings = [
            ("sender", self.sender()),
            ("interface", self.interface()),
            ("member", self.member()),
            ("path", self.path()),
            ("path_namespace", self.path_namespace()),
            ("destination", self.destination()),
        ];
        for (k, v) in strings {
            if let Some(v) = v {
                key(f, &k)?;
                write_value(f, v)?;
            }
        }
        if self.eavesdrop {
            key(f, &"eavesdrop")?;
            write_value(f, "true")?;
        }
        for (n, m) in self.args.iter() {
            let suffix = match m {
                ArgMatch::Str(_) => "",
                ArgMatch::Path(_) => "path",
                ArgMatch::Namespace(_) => "namespace",
            };
            key(f, &format_args!("arg{n}{suffix}"))?;
            write_value(f, m.value())?;
        }
        Ok(())
    }
}

impl std::str::FromStr for MatchRule {
    type Err = MatchRuleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        MatchRule::parse(s)
    }
}

// Name validation, as dbus-daemon's dbus-marshal-validate.c does it.

fn is_initial_name_char(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_'
}

fn is_name_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

fn is_initial_bus_name_char(b: u8) -> bool {
    is_initial_name_char(b) || b == b'-'
}

fn is_bus_name_char(b: u8) -> bool {
    is_name_char(b) || b == b'-'
}

/// `_dbus_validate_bus_name_full`: with `is_namespace`, a name of a single element is valid.
fn valid_bus_name_full(name: &str, is_namespace: bool) -> bool {
    let b = name.as_bytes();
    if b.is_empty() || b.len() > MAX_NAME_LENGTH {
        return false;
    }
    if let Some(unique) = b.strip_prefix(b":") {
        // Elements of a unique name may start with a digit.
        return unique
            .split(|c| *c == b'.')
            .enumerate()
            .all(|(i, e)| (i == 0 || !e.is_empty()) && e.iter().all(|c| is_bus_name_char(*c)));
    }
    let mut elements = 0;
    for e in b.split(|c| *c == b'.') {
        match e.split_first() {
            Some((first, rest)) if is_initial_bus_name_char(*first) => {
                if !rest.iter().all(|c| is_bus_name_char(*c)) {
                    return false;
                }
            }
            _ => return false,
        }
        elements += 1;
    }
    is_namespace || elements > 1
}

fn valid_bus_name(name: &str) -> bool {
    valid_bus_name_full(name, false)
}

fn valid_interface(name: &str) -> bool {
    let b = name.as_bytes();
    if b.is_empty() || b.len() > MAX_NAME_LENGTH {
        return false;
    }
    let mut elements = 0;
    for e in b.split(|c| *c == b'.') {
        match e.split_first() {
            Some((first, rest))
                if is_initial_name_char(*first) && rest.iter().all(|c| is_name_char(*c)) => {}
            _ => return false,
        }
        elements += 1;
    }
    elements > 1
}

fn valid_member(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() <= MAX_NAME_LENGTH
        && b.split_first().is_some_and(|(first, rest)| {
            is_initial_name_char(*first) && rest.iter().all(|c| is_name_char(*c))
        })
}

fn valid_path(path: &str) -> bool {
    if path == "/" {
        return true;
    }
    match path.strip_prefix('/') {
        Some(rest) => rest
            .split('/')
            .all(|e| !e.is_empty() && e.bytes().all(is_name_char)),
        None => false,
    }
}

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

/// A top-level body argument that a rule can match: a STRING or an OBJECT_PATH.
#[derive(Clone, Copy, Debug)]
struct Arg<'m> {
    value: &'m str,
    is_path: bool,
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

    /// The message.
    pub fn message(&self) -> &'m Message {
        self.msg
    }

    /// The message type.
    pub fn msg_type(&self) -> Type {
        self.msg_type
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

    /// Top-level argument `n` if it is a STRING or an OBJECT_PATH (and `n` is at most 63), and
    /// whether it is an OBJECT_PATH.
    pub fn arg_str(&self, n: usize) -> Option<(&'m str, bool)> {
        self.arg(n).map(|a| (a.value, a.is_path))
    }

    fn arg(&self, n: usize) -> Option<Arg<'m>> {
        self.args
            .get_or_init(|| decode_args(self.msg))
            .get(n)
            .copied()
            .flatten()
    }
}

/// The deepest nesting of variants and structures followed while skipping over values.
const MAX_DEPTH: u32 = 64;

/// Reads D-Bus-marshalled values from a message's bytes, never panicking on bad data.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    big_endian: bool,
}

impl<'a> Reader<'a> {
    fn align(&mut self, n: usize) -> Option<()> {
        let p = self.pos.checked_next_multiple_of(n)?;
        if p > self.buf.len() {
            return None;
        }
        self.pos = p;
        Some(())
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let bytes = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(bytes)
    }

    fn byte(&mut self) -> Option<u8> {
        self.take(1)?.first().copied()
    }

    fn u32(&mut self) -> Option<u32> {
        self.align(4)?;
        let b: [u8; 4] = self.take(4)?.try_into().ok()?;
        Some(if self.big_endian {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        })
    }

    /// A STRING or OBJECT_PATH, with its terminating 0.
    fn string(&mut self) -> Option<&'a str> {
        let len = usize::try_from(self.u32()?).ok()?;
        let bytes = self.take(len)?;
        if self.byte()? != 0 {
            return None;
        }
        std::str::from_utf8(bytes).ok()
    }

    /// A SIGNATURE, with its terminating 0.
    fn signature(&mut self) -> Option<&'a [u8]> {
        let len = usize::from(self.byte()?);
        let bytes = self.take(len)?;
        if self.byte()? != 0 {
            return None;
        }
        Some(bytes)
    }

    /// Skips one value of the first complete type of `sig`; returns the rest of `sig`.
    fn skip<'s>(&mut self, sig: &'s [u8], depth: u32) -> Option<&'s [u8]> {
        let (&code, rest) = sig.split_first()?;
        match code {
            b'y' => {
                self.take(1)?;
            }
            b'n' | b'q' => {
                self.align(2)?;
                self.take(2)?;
            }
            b'b' | b'i' | b'u' | b'h' => {
                self.align(4)?;
                self.take(4)?;
            }
            b'x' | b't' | b'd' => {
                self.align(8)?;
                self.take(8)?;
            }
            b's' | b'o' => {
                let len = usize::try_from(self.u32()?).ok()?;
                self.take(len.checked_add(1)?)?;
            }
            b'g' => {
                self.signature()?;
            }
            b'v' => {
                if depth >= MAX_DEPTH {
                    return None;
                }
                let inner = self.signature()?;
                if !self.skip(inner, depth + 1)?.is_empty() {
                    return None;
                }
            }
            b'a' => {
                let len = usize::try_from(self.u32()?).ok()?;
                let elem_len = complete_type_len(rest, 0)?;
                self.align(alignment(*rest.first()?)?)?;
                self.take(len)?;
                return rest.get(elem_len..);
            }
            b'(' | b'{' => {
                if depth >= MAX_DEPTH {
                    return None;
                }
                let close = if code == b'(' { b')' } else { b'}' };
                self.align(8)?;
                let mut fields = rest;
                loop {
                    match fields.split_first() {
                        Some((&c, after)) if c == close => return Some(after),
                        Some(_) => fields = self.skip(fields, depth + 1)?,
                        None => return None,
                    }
                }
            }
            _ => return None,
        }
        Some(rest)
    }
}

fn alignment(code: u8) -> Option<usize> {
    Some(match code {
        b'y' | b'g' | b'v' => 1,
        b'n' | b'q' => 2,
        b'b' | b'i' | b'u' | b'h' | b's' | b'o' | b'a' => 4,
        b'x' | b't' | b'd' | b'(' | b'{' => 8,
        _ => return None,
    })
}

/// Length of the first complete type of `sig`.
fn complete_type_len(sig: &[u8], depth: u32) -> Option<usize> {
    if depth > 2 * MAX_DEPTH {
        return None;
    }
    match *sig.first()? {
        b'a' => complete_type_len(sig.get(1..)?, depth + 1)?.checked_add(1),
        open @ (b'(' | b'{') => {
            let close = if open == b'(' { b')' } else { b'}' };
            let mut i = 1;
            loop {
                if *sig.get(i)? == close {
                    return Some(i + 1);
                }
                i += complete_type_len(sig.get(i..)?, depth + 1)?;
            }
        }
        c => alignment(c).map(|_| 1),
    }
}

/// Header field code of the body signature.
const FIELD_SIGNATURE: u8 = 8;

/// The top-level STRING and OBJECT_PATH arguments of the body of `msg`, up to the 64th.
fn decode_args(msg: &Message) -> Vec<Option<Arg<'_>>> {
    let mut args = Vec::new();
    // A bad message yields the arguments read before the bad data.
    let _ = decode_args_into(msg, &mut args);
    args
}

/// Reads past the header fields; returns the reader at their end and the
/// body signature as written (empty when there is none).
fn read_header(msg: &Message) -> Option<(Reader<'_>, &[u8])> {
    let bytes = msg.data().bytes();
    let mut r = Reader {
        buf: bytes,
        pos: 12,
        big_endian: bytes.first() == Some(&b'B'),
    };
    // The header fields, an array of (BYTE code, VARIANT value) from offset 12, to find the body
    // signature as it is written: zbus's parsed `Signature` doesn't tell "(ss)" from "ss".
    let fields_len = usize::try_from(r.u32()?).ok()?;
    r.align(8)?;
    let fields_end = r.pos.checked_add(fields_len)?;
    let mut body_sig: &[u8] = &[];
    while r.pos < fields_end {
        r.align(8)?;
        let code = r.byte()?;
        let sig = r.signature()?;
        if code == FIELD_SIGNATURE && sig == b"g" {
            body_sig = r.signature()?;
        } else if !r.skip(sig, 0)?.is_empty() {
            return None;
        }
    }
    if r.pos != fields_end {
        return None;
    }
    Some((r, body_sig))
}

/// The body signature exactly as the header carries it ("" for no body):
/// the form D-Bus error messages and signature checks use.
pub fn body_signature(msg: &Message) -> &str {
    read_header(msg)
        .and_then(|(_, sig)| std::str::from_utf8(sig).ok())
        .unwrap_or("")
}

fn decode_args_into<'m>(msg: &'m Message, args: &mut Vec<Option<Arg<'m>>>) -> Option<()> {
    let bytes = msg.data().bytes();
    let body_len = usize::try_from(msg.primary_header().body_len()).ok()?;
    let (mut r, body_sig) = read_header(msg)?;
    if body_sig.is_empty() {
        return None;
    }
    r.align(8)?;
    let body_end = r.pos.checked_add(body_len)?;
    r.buf = bytes.get(..body_end)?;

    let mut sig = body_sig;
    while let Some(&code) = sig.first() {
        if args.len() > usize::from(MAX_ARG_NUMBER) {
            break;
        }
        if code == b's' || code == b'o' {
            let value = r.string()?;
            args.push(Some(Arg {
                value,
                is_path: code == b'o',
            }));
            sig = sig.get(1..)?;
        } else {
            sig = r.skip(sig, 0)?;
            args.push(None);
        }
    }
    Some(())
}

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

    /// How many rules `key` holds, duplicates included.
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
    use zbus::wire::{Endian, ObjectPath};

    /// Owners for tests: the message's sender and destination, and well-known names they own.
    #[derive(Default)]
    struct TestOwners {
        sender: Option<String>,
        destination: Option<String>,
        names: HashMap<String, String>,
        list_names: bool,
    }

    impl TestOwners {
        fn for_msg(msg: &Message) -> Self {
            let h = msg.header();
            TestOwners {
                sender: h.sender().map(|s| s.to_string()),
                destination: h.destination().map(|d| d.to_string()),
                ..Default::default()
            }
        }

        fn owns(mut self, unique: &str, name: &str) -> Self {
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

    fn rule(s: &str) -> MatchRule {
        match MatchRule::parse(s) {
            Ok(r) => r,
            Err(e) => panic!("{s:?} should parse: {e}"),
        }
    }

    fn signal<B>(path: &str, iface: &str, member: &str, body: &B) -> Message
    where
        B: zbus::export::serde::ser::Serialize + zbus::wire::DynamicType,
    {
        Message::signal(path, iface, member)
            .sender(":1.7")
            .build(body)
            .expect("signal")
    }

    fn matches(r: &str, msg: &Message) -> bool {
        let owners = TestOwners::for_msg(msg);
        rule(r).matches(&MessageInfo::new(msg), &owners)
    }

    fn sig0(arg0: &str) -> Message {
        signal("/a/b", "org.x.Iface", "Sig", &(arg0,))
    }

    #[test]
    fn parse_basic_and_accessors() {
        let r = rule(
            " type='signal', sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',\
             member='NameOwnerChanged',path='/org/freedesktop/DBus',arg0='org.foo.N',\
             destination=':1.5',eavesdrop='true'",
        );
        assert_eq!(r.msg_type(), Some(Type::Signal));
        assert_eq!(r.sender(), Some("org.freedesktop.DBus"));
        assert_eq!(r.interface(), Some("org.freedesktop.DBus"));
        assert_eq!(r.member(), Some("NameOwnerChanged"));
        assert_eq!(r.path(), Some("/org/freedesktop/DBus"));
        assert_eq!(r.path_namespace(), None);
        assert_eq!(r.destination(), Some(":1.5"));
        assert_eq!(r.arg0(), Some("org.foo.N"));
        assert!(r.eavesdrop());
        assert_eq!(rule("").msg_type(), None);
        assert_eq!(rule("   "), MatchRule::default());
        assert_eq!(rule("path_namespace='/a'").path_namespace(), Some("/a"));
        assert_eq!(rule("arg0path='/a/'").arg0(), None);
        assert_eq!(rule("type=signal").msg_type(), Some(Type::Signal));
        for (t, ty) in [
            ("method_call", Type::MethodCall),
            ("method_return", Type::MethodReturn),
            ("error", Type::Error),
        ] {
            assert_eq!(rule(&format!("type='{t}'")).msg_type(), Some(ty));
        }
    }

    #[test]
    fn parse_quoting() {
        // Outside quotes, \' is an apostrophe; inside, a backslash is literal.
        assert_eq!(rule(r"arg0='it'\''s'").arg0(), Some("it's"));
        assert_eq!(rule(r"arg0='a\b'").arg0(), Some(r"a\b"));
        assert_eq!(rule(r"arg0='a\'").arg0(), Some(r"a\"));
        assert_eq!(rule(r"arg0=\'").arg0(), Some("'"));
        assert_eq!(rule(r"arg0=a\b").arg0(), Some(r"a\b"));
        assert_eq!(rule(r"arg0=a\").arg0(), Some(r"a\"));
        assert_eq!(rule("arg0=''").arg0(), Some(""));
        assert_eq!(rule("arg0='a,b'").arg0(), Some("a,b"));
        assert_eq!(rule("arg0='é ü'").arg0(), Some("é ü"));
        assert!(rule("arg0='x',").arg0().is_some());
    }

    #[test]
    fn parse_errors() {
        let bad = [
            "type='signal",
            "arg0='x",
            "type",
            "type 'signal'",
            "ty pe='signal'",
            "='x'",
            "foo='bar'",
            "type='signal',,member='x'",
            "type='sig'",
            "type='signal ' ,member='Foo'",
            "type='signal' ,member='Foo'",
            "member= 'Foo'",
            "type='signal',type='signal'",
            "member='a',member='a'",
            "path='/a',path_namespace='/a'",
            "path='/a',path='/a'",
            "path='a'",
            "path='/a/'",
            "path='/a//b'",
            "path_namespace='/a/'",
            "member='1abc'",
            "member='a.b'",
            "member=''",
            "interface='foo'",
            "interface='org..foo'",
            "interface='org.1foo'",
            "sender='foo'",
            "sender='org.foo.'",
            "destination='1org.foo'",
            "eavesdrop='yes'",
            "eavesdrop='true',eavesdrop='true'",
            "arg64='x'",
            "arg99999999999999999999='x'",
            "arg='x'",
            "argx='x'",
            "arg0junk='x'",
            "arg1namespace='x'",
            "arg00namespace='x'",
            "arg0namespace='org..x'",
            "arg0namespace=''",
            "arg0namespace='1org'",
            "arg0='a',arg0='b'",
            "arg0='a',arg0path='/b'",
            "arg0namespace='a',arg0='a'",
            "arg3='a',arg03='b'",
        ];
        for s in bad {
            assert!(MatchRule::parse(s).is_err(), "{s:?} should not parse");
        }
        let long = format!("arg0='{}'", "x".repeat(MAX_RULE_LENGTH));
        let err = MatchRule::parse(&long).unwrap_err();
        assert_eq!(
            err.dbus_error_name(),
            "org.freedesktop.DBus.Error.LimitsExceeded"
        );
        let err = MatchRule::parse("foo='bar'").unwrap_err();
        assert_eq!(err.to_string(), "Unknown key \"foo\" in match rule");
        assert_eq!(
            err.dbus_error_name(),
            "org.freedesktop.DBus.Error.MatchRuleInvalid"
        );
        assert!(
            MatchRule::parse("member='1x'")
                .unwrap_err()
                .to_string()
                .contains("member='1x'")
        );
    }

    #[test]
    fn parse_valid_edge_cases() {
        for s in [
            "arg63='x'",
            "arg0path='/aa/'",
            "arg0path='/org/gnome/'",
            "arg0path=''",
            "arg0path='not a path'",
            "arg0namespace='org'",
            "arg0namespace='org.gnome'",
            "arg0namespace=':1'",
            "arg0namespace='org.gnome-foo._x'",
            "sender=':1.42'",
            "sender='org.freedesktop.DBus'",
            "sender='org.foo-bar._9'",
            "destination=':1.1'",
            "path='/'",
            "path_namespace='/'",
            "eavesdrop='false'",
            "interface='_a.b_1'",
            "arg1='a',arg0='b',arg2path='/c/'",
        ] {
            rule(s);
        }
    }

    #[test]
    fn equality_and_display() {
        let a = rule("type='signal',member='Foo',arg1='x',arg0path='/a/'");
        let b = rule("  arg0path='/a/',\targ1=x,member='Foo',\n type='signal'");
        assert_eq!(a, b);
        let hash = |r: &MatchRule| {
            use std::hash::{BuildHasher, RandomState};
            RandomState::new().hash_one(r)
        };
        let _ = hash(&a);
        assert_eq!(rule("eavesdrop='false'"), rule(""));
        assert_ne!(rule("eavesdrop='true'"), rule(""));
        assert_ne!(rule("arg0='a'"), rule("arg0path='a'"));
        assert_ne!(rule("path='/a'"), rule("path_namespace='/a'"));
        assert_eq!(rule("arg00='a'"), rule("arg0='a'"));

        for s in [
            "type='signal',sender=':1.2',interface='a.b',member='M',path='/p',destination='x.y',eavesdrop='true',arg0='q',arg1path='/r/',arg5='it'\\''s'",
            "path_namespace='/a',arg0namespace='org.x'",
            r"arg0='a\b\'",
            "arg0='''",
            "",
        ] {
            let Ok(r) = MatchRule::parse(s) else {
                continue;
            };
            let text = r.to_string();
            assert_eq!(rule(&text), r, "{s:?} -> {text:?}");
        }
        assert_eq!(
            rule("member='M',type='signal',arg2='x',arg0='y'").to_string(),
            "type='signal',member='M',arg0='y',arg2='x'"
        );
        assert_eq!(rule(r"arg0=\'").to_string(), r"arg0=''\'''");
    }

    #[test]
    fn match_header_keys() {
        let msg = Message::signal("/a/b", "org.x.Iface", "Sig")
            .sender(":1.7")
            .destination(":1.9")
            .build(&())
            .unwrap();
        assert!(matches("", &msg));
        assert!(matches("type='signal'", &msg));
        assert!(!matches("type='method_call'", &msg));
        assert!(matches("interface='org.x.Iface'", &msg));
        assert!(!matches("interface='org.x.Other'", &msg));
        assert!(matches("member='Sig'", &msg));
        assert!(!matches("member='Sig2'", &msg));
        assert!(matches("path='/a/b'", &msg));
        assert!(!matches("path='/a'", &msg));
        assert!(matches("sender=':1.7'", &msg));
        assert!(!matches("sender=':1.8'", &msg));
        assert!(matches("destination=':1.9'", &msg));
        assert!(!matches("destination=':1.7'", &msg));
        assert!(matches(
            "type='signal',sender=':1.7',interface='org.x.Iface',member='Sig',path='/a/b',destination=':1.9'",
            &msg
        ));
        // eavesdrop is for the bus to decide.
        assert!(matches("eavesdrop='true'", &msg));

        let owners = TestOwners::for_msg(&msg)
            .owns(":1.7", "org.x.Sender")
            .owns(":1.9", "org.x.Dest");
        let info = MessageInfo::new(&msg);
        assert!(rule("sender='org.x.Sender'").matches(&info, &owners));
        assert!(rule("destination='org.x.Dest'").matches(&info, &owners));
        assert!(!rule("destination='org.x.Sender'").matches(&info, &owners));

        // A broadcast signal has no destination.
        let bcast = sig0("x");
        assert!(!matches("destination=':1.9'", &bcast));

        let call = Message::method_call("/p", "Ping")
            .interface("org.x.Iface")
            .sender(":1.7")
            .destination("org.x.Service")
            .build(&())
            .unwrap();
        assert!(matches("type='method_call',member='Ping'", &call));
        assert!(!matches("type='signal'", &call));
        let reply = Message::method_return(&call.header())
            .sender(":1.3")
            .build(&("ok",))
            .unwrap();
        assert!(matches("type='method_return',arg0='ok'", &reply));
        assert!(!matches("member='Ping'", &reply));
        assert!(!matches("path='/p'", &reply));
        assert!(!matches("path_namespace='/'", &reply));
        let err = Message::error(&call.header(), "org.x.Error.Failed")
            .build(&("boom",))
            .unwrap();
        assert!(matches("type='error',arg0='boom'", &err));
        assert!(!matches("type='method_return'", &err));
    }

    #[test]
    fn match_path_namespace() {
        let at = |p: &str| signal(p, "org.x.I", "S", &());
        assert!(matches("path_namespace='/a/b'", &at("/a/b")));
        assert!(matches("path_namespace='/a/b'", &at("/a/b/c")));
        assert!(matches("path_namespace='/a/b'", &at("/a/b/c/d")));
        assert!(!matches("path_namespace='/a/b'", &at("/a/bc")));
        assert!(!matches("path_namespace='/a/b'", &at("/a")));
        assert!(!matches("path_namespace='/a/b'", &at("/")));
        for p in ["/", "/a", "/a/b/c", "/zzz"] {
            assert!(matches("path_namespace='/'", &at(p)));
        }
        assert!(matches("path='/'", &at("/")));
        assert!(!matches("path='/'", &at("/a")));
    }

    #[test]
    fn match_arg_path_spec_table() {
        let r = "arg0path='/aa/bb/'";
        for yes in ["/", "/aa/", "/aa/bb/", "/aa/bb/cc/", "/aa/bb/cc"] {
            assert!(matches(r, &sig0(yes)), "{yes} should match");
        }
        for no in ["/aa/b", "/aa", "/aa/bb"] {
            assert!(!matches(r, &sig0(no)), "{no} should not match");
        }
        let r = "arg0path='/aa/'";
        for yes in ["/aa/bb", "/aa/", "/", "/aa/bb/cc"] {
            assert!(matches(r, &sig0(yes)), "{yes} should match");
        }
        for no in ["/aa", "/a", "/aab", "", "/bb/"] {
            assert!(!matches(r, &sig0(no)), "{no} should not match");
        }
        assert!(matches("arg0path='/aa'", &sig0("/aa")));
        assert!(!matches("arg0path='/aa'", &sig0("/aa/bb")));
        assert!(matches("arg0path=''", &sig0("")));
        assert!(!matches("arg0path=''", &sig0("/")));

        // OBJECT_PATH arguments too.
        let op = |p: &'static str| {
            signal(
                "/x",
                "org.x.I",
                "S",
                &(ObjectPath::from_static_str(p).unwrap(),),
            )
        };
        assert!(matches("arg0path='/aa/'", &op("/aa/bb")));
        assert!(matches("arg0path='/aa/bb'", &op("/aa/bb")));
        assert!(matches("arg0path='/aa/bb/cc'", &op("/")));
        assert!(!matches("arg0path='/aa/bb'", &op("/aa")));
        // argN is for STRING only.
        assert!(!matches("arg0='/aa/bb'", &op("/aa/bb")));
        assert!(!matches("arg0namespace='aa'", &sig0("/aa")));
        // argNpath on other arguments, and a non-string.
        let m = signal("/x", "org.x.I", "S", &(1u32, "/a/b/", "x"));
        assert!(matches("arg1path='/a/b/c'", &m));
        assert!(matches("arg1path='/a/'", &m));
        assert!(!matches("arg0path='/'", &m));
        assert!(!matches("arg0='1'", &m));
    }

    #[test]
    fn match_arg_strings() {
        let m = signal("/x", "org.x.I", "S", &("a", 5i32, "c", vec!["d"], "e"));
        assert!(matches("arg0='a'", &m));
        assert!(!matches("arg0='A'", &m));
        assert!(!matches("arg1='5'", &m));
        assert!(matches("arg2='c'", &m));
        assert!(!matches("arg3='d'", &m));
        assert!(matches("arg4='e'", &m));
        assert!(matches("arg0='a',arg2='c',arg4='e'", &m));
        assert!(!matches("arg0='a',arg2='c',arg4='x'", &m));
        assert!(!matches("arg5=''", &m));
        assert!(!matches("arg63=''", &m));
        let empty = signal("/x", "org.x.I", "S", &());
        assert!(!matches("arg0=''", &empty));
        assert!(matches("arg0=''", &sig0("")));

        // arg63 is reachable.
        let mut b = zbus::wire::StructureBuilder::new();
        for i in 0..64 {
            b = b.add_field(format!("s{i}"));
        }
        let many = signal("/x", "org.x.I", "S", &b.build().unwrap());
        assert!(matches("arg63='s63',arg0='s0',arg31='s31'", &many));
        assert!(!matches("arg63='s62'", &many));
    }

    #[test]
    fn match_arg0namespace() {
        let r = "arg0namespace='org.gnome'";
        assert!(matches(r, &sig0("org.gnome")));
        assert!(matches(r, &sig0("org.gnome.Foo")));
        assert!(matches(r, &sig0("org.gnome.Foo.Bar")));
        assert!(!matches(r, &sig0("org.gnomeFoo")));
        assert!(!matches(r, &sig0("org")));
        assert!(!matches(r, &sig0("org.gnom")));
        assert!(!matches(r, &sig0("")));
        let m = signal(
            "/x",
            "org.x.I",
            "S",
            &(ObjectPath::from_static_str("/org").unwrap(),),
        );
        assert!(!matches("arg0namespace='org'", &m));
    }

    #[test]
    fn decode_structs_variants_and_big_endian() {
        use zbus::wire::Variant;
        // A body that is a single structure: arg0 is the structure, not its first field.
        let m = signal("/x", "org.x.I", "S", &(("a", "b"),));
        assert!(!matches("arg0='a'", &m));
        assert!(!matches("arg1='b'", &m));
        let m = signal(
            "/x",
            "org.x.I",
            "S",
            &(
                Variant::Variant(Box::new(Variant::from("nested"))),
                vec![(1u8, 2u64)],
                HashMap::from([("k", Variant::from(1.5f64))]),
                (7u16, "in", (true,)),
                "tail",
                ObjectPath::from_static_str("/p").unwrap(),
            ),
        );
        assert!(matches("arg4='tail'", &m));
        assert!(matches("arg5path='/p'", &m));
        assert!(!matches("arg0='nested'", &m));
        let big = Message::signal("/x", "org.x.I", "S")
            .endian(Endian::Big)
            .build(&(3u8, "big", vec![1u32, 2], "end"))
            .unwrap();
        assert!(matches("arg1='big',arg3='end'", &big));
        let info = MessageInfo::new(&big);
        assert_eq!(info.arg_str(1), Some(("big", false)));
        assert_eq!(info.arg_str(0), None);
        assert_eq!(info.arg_str(1000), None);
    }

    #[test]
    fn reader_survives_garbage() {
        // Random bodies under random signatures must not panic.
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let sigs: [&[u8]; 8] = [
            b"s",
            b"as",
            b"a{sv}s",
            b"v",
            b"(sa(yv))o",
            b"ayxs",
            b"a(",
            b"((((((((((((((((((((((((((((((((s))))))))))))))))))))))))))))))))",
        ];
        for _ in 0..2000 {
            let len = (next() % 64) as usize;
            let buf: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            for sig in sigs {
                let mut r = Reader {
                    buf: &buf,
                    pos: (next() % 8) as usize,
                    big_endian: next() % 2 == 0,
                };
                let _ = r.skip(sig, 0);
            }
        }
        // Deeply nested variants stop at the depth limit.
        let mut buf = Vec::new();
        for _ in 0..200 {
            buf.extend_from_slice(&[1, b'v', 0]);
        }
        let mut r = Reader {
            buf: &buf,
            pos: 0,
            big_endian: false,
        };
        assert!(r.skip(b"v", 0).is_none());
        assert_eq!(complete_type_len(b"a{sv}x", 0), Some(5));
        assert_eq!(complete_type_len(b"(", 0), None);
        assert_eq!(complete_type_len(b"", 0), None);
    }

    /// GLib gdbus-subscribe style: NameOwnerChanged watches, sender filtering by well-known names.
    #[test]
    fn gdbus_subscribe_cases() {
        let noc = |name: &str, old: &str, new: &str| {
            Message::signal(
                "/org/freedesktop/DBus",
                "org.freedesktop.DBus",
                "NameOwnerChanged",
            )
            .sender("org.freedesktop.DBus")
            .build(&(name, old, new))
            .unwrap()
        };
        let watch = "type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',\
                     member='NameOwnerChanged',path='/org/freedesktop/DBus',arg0='com.example.Foo'";
        assert!(matches(watch, &noc("com.example.Foo", "", ":1.5")));
        assert!(!matches(watch, &noc("com.example.Bar", "", ":1.5")));
        // A fake NameOwnerChanged from a peer does not match the bus's sender.
        let fake = signal(
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "NameOwnerChanged",
            &("com.example.Foo", "", ":1.5"),
        );
        assert!(!matches(watch, &fake));

        // Subscribing by well-known name follows ownership.
        let m = signal("/org/example", "com.example.Iface", "Sig", &("x",));
        let info = MessageInfo::new(&m);
        let r = rule("sender='com.example.Owned',member='Sig'");
        let owned = TestOwners::for_msg(&m).owns(":1.7", "com.example.Owned");
        let other = TestOwners::for_msg(&m).owns(":1.99", "com.example.Owned");
        assert!(r.matches(&info, &owned));
        assert!(!r.matches(&info, &other));
        // path_namespace and arg0path combinations, as GDBusObjectManager uses.
        assert!(matches(
            "type='signal',sender=':1.7',path_namespace='/org/example',arg0='x'",
            &m
        ));
        assert!(matches("arg0path='x'", &m));
    }

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
        // Filter sees the rule and is asked again for another rule of the same key.
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
