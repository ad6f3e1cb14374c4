//! Match rules: parsing as dbus-daemon does it, testing a message, and writing a rule back out.

use std::fmt;

use crate::wire::Type;

use super::{MessageInfo, Owners};
use crate::wire::args::Arg;
use crate::wire::validate;

/// Longest match rule text dbus-daemon accepts (`DBUS_MAXIMUM_MATCH_RULE_LENGTH`).
pub const MAX_RULE_LENGTH: usize = 1024;
/// Highest `N` of an `argN` key (`DBUS_MAXIMUM_MATCH_RULE_ARG_NUMBER`).
pub const MAX_ARG_NUMBER: u8 = 63;
/// Most `key='value'` pairs in one rule (dbus-daemon's `MAX_RULE_TOKENS`).
const MAX_RULE_TOKENS: usize = 64;

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

/// The error dbus-daemon answers AddMatch, RemoveMatch and BecomeMonitor
/// with: a rule over the length limit is LimitsExceeded, anything else
/// MatchRuleInvalid.
impl From<MatchRuleError> for crate::wire::BusError {
    fn from(e: MatchRuleError) -> Self {
        let name = match e {
            MatchRuleError::TooLong(_) => crate::wire::ErrorName::LimitsExceeded,
            _ => crate::wire::ErrorName::MatchRuleInvalid,
        };
        crate::wire::BusError::new(name, e.to_string())
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

        let (value, consumed) = find_value(text.get(pos..).unwrap_or_default())?;
        pos += consumed;
        if tokens.len() == MAX_RULE_TOKENS {
            return Err(MatchRuleError::TooManyKeys);
        }
        tokens.push((key, value));
    }
}

/// Reads the value at the start of `rest` the way dbus-daemon's `find_value` does; returns it
/// unquoted and how many bytes of `rest` it took, its closing `,` included.
fn find_value(rest: &str) -> Result<(String, usize), MatchRuleError> {
    let mut value = String::new();
    let mut quote: Option<char> = None;
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
    Ok((value, consumed))
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

fn parse_type(value: String) -> Result<Type, MatchRuleError> {
    match value.as_str() {
        "signal" => Ok(Type::Signal),
        "method_call" => Ok(Type::MethodCall),
        "method_return" => Ok(Type::MethodReturn),
        "error" => Ok(Type::Error),
        _ => Err(MatchRuleError::InvalidType(value)),
    }
}

/// An `argN`, `argNpath` or `arg0namespace` key and its value, given the `args` keys before it.
fn parse_arg(
    key: &str,
    value: String,
    args: &[(u8, ArgMatch)],
) -> Result<(u8, ArgMatch), MatchRuleError> {
    let (n, kind) = parse_arg_key(key)?;
    if args.iter().any(|(m, _)| *m == n) {
        return Err(MatchRuleError::ArgTwice(n));
    }
    let m = kind(value.into_boxed_str());
    if let ArgMatch::Namespace(v) = &m
        && !validate::bus_name_namespace(v)
    {
        return Err(invalid(key, v, "not a valid prefix of a bus name"));
    }
    Ok((n, m))
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
                "type" => set_once(&mut rule.msg_type, key, parse_type(value))?,
                "sender" | "destination" => {
                    let slot = if key == "sender" {
                        &mut rule.sender
                    } else {
                        &mut rule.destination
                    };
                    let v = checked(key, value, validate::bus_name, "not a valid bus name");
                    set_once(slot, key, v)?;
                }
                "interface" => {
                    let v = checked(
                        key,
                        value,
                        validate::interface,
                        "not a valid interface name",
                    );
                    set_once(&mut rule.interface, key, v)?;
                }
                "member" => {
                    let v = checked(key, value, validate::member, "not a valid member name");
                    set_once(&mut rule.member, key, v)?;
                }
                "path" | "path_namespace" => {
                    if rule.path.is_some() {
                        return Err(MatchRuleError::PathTwice);
                    }
                    let v = checked(key, value, validate::object_path, "not a valid object path")?;
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
                _ if key.starts_with("arg") => args.push(parse_arg(key, value, &args)?),
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

    /// Whether the rule selects nothing (`''`, or only `eavesdrop`): it
    /// matches every message.
    pub fn is_wildcard(&self) -> bool {
        self.msg_type.is_none()
            && self.sender.is_none()
            && self.interface.is_none()
            && self.member.is_none()
            && self.path.is_none()
            && self.destination.is_none()
            && self.args.is_empty()
    }

    #[cfg(test)]
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::matching::tests::{TestOwners, matches, rule, sig0, signal};
    use zbus::message::Message;
    use zbus::wire::ObjectPath;

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
    fn wildcards_select_nothing() {
        for w in ["", "  ", "eavesdrop=true"] {
            assert!(rule(w).is_wildcard(), "{w:?}");
        }
        for r in [
            "type='signal'",
            "path_namespace='/'",
            "arg0='x'",
            "destination=':1.2'",
        ] {
            assert!(!rule(r).is_wildcard(), "{r:?}");
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
        let err = crate::wire::BusError::from(MatchRule::parse(&long).unwrap_err());
        assert_eq!(err.name, crate::wire::ErrorName::LimitsExceeded);
        let err = MatchRule::parse("foo='bar'").unwrap_err();
        assert_eq!(err.to_string(), "Unknown key \"foo\" in match rule");
        let err = crate::wire::BusError::from(err);
        assert_eq!(err.name, crate::wire::ErrorName::MatchRuleInvalid);
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
}
