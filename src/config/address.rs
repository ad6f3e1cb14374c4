//! D-Bus server addresses ("Server Addresses" in the D-Bus specification).
//!
//! An address list is `;`-separated; each address is
//! `transport:key=value,key=value`, where values are escaped: the bytes
//! `[-0-9A-Za-z_/.\*]` may appear as themselves, every other byte must be
//! written as `%XX`.

use std::collections::HashSet;
use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

/// One address busvisor can listen on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddress {
    /// `unix:path=PATH`
    Path(PathBuf),
    /// `unix:abstract=NAME` (Linux abstract socket namespace)
    Abstract(String),
    /// `unix:dir=DIR` — a socket with a generated name in `DIR`
    Dir(PathBuf),
    /// `unix:tmpdir=DIR` — like `dir` (dbus-daemon may use the abstract
    /// namespace instead)
    Tmpdir(PathBuf),
    /// `unix:runtime=yes` — `$XDG_RUNTIME_DIR/bus`
    Runtime,
    /// `tcp:host=HOST,port=PORT[,family=ipv4|ipv6]` (parsed only)
    Tcp {
        host: String,
        port: u16,
        family: Option<String>,
    },
}

impl ListenAddress {
    #[cfg(test)]
    /// For [`ListenAddress::Runtime`], the socket path
    /// `$XDG_RUNTIME_DIR/bus`; `None` if `XDG_RUNTIME_DIR` is unset or
    /// relative, or for other kinds of address.
    pub fn runtime_path(&self, env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
        match self {
            ListenAddress::Runtime => env("XDG_RUNTIME_DIR")
                .filter(|d| Path::new(d).is_absolute())
                .map(|d| Path::new(&d).join("bus")),
            _ => None,
        }
    }
}

/// Error in a D-Bus address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("empty D-Bus address")]
    Empty,
    #[error("D-Bus address \"{0}\" does not contain a colon")]
    MissingColon(String),
    #[error("D-Bus address \"{0}\" has an empty transport name")]
    EmptyTransport(String),
    #[error("D-Bus address \"{address}\": \"{pair}\" is not a key=value pair")]
    MissingEquals { address: String, pair: String },
    #[error("D-Bus address \"{0}\" has an empty key")]
    EmptyKey(String),
    #[error("D-Bus address \"{address}\" has key \"{key}\" twice")]
    DuplicateKey { address: String, key: String },
    #[error("in D-Bus address value \"{value}\", {problem}")]
    BadEscape { value: String, problem: String },
    #[error("D-Bus address value \"{0}\" is not valid UTF-8 once unescaped")]
    NotUtf8(String),
    #[error("transport \"{0}\" is not supported")]
    UnsupportedTransport(String),
    #[error("unix address \"{0}\" must have exactly one of path, abstract, dir, tmpdir or runtime")]
    UnixKind(String),
    #[error("unix address \"{0}\": the only value allowed for \"runtime\" is \"yes\"")]
    BadRuntime(String),
    #[error("unix address \"{0}\" has an empty path or name")]
    EmptyPath(String),
    #[error("tcp address \"{address}\": bad port \"{port}\"")]
    BadPort { address: String, port: String },
    #[error("tcp address \"{address}\": unknown family \"{family}\" (expected ipv4 or ipv6)")]
    BadFamily { address: String, family: String },
}

fn is_optionally_escaped(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'/' | b'.' | b'\\' | b'*')
}

/// Escape bytes for use as a D-Bus address value.
pub fn escape_bytes(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if is_optionally_escaped(b) {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
    }
    out
}

/// Escape a string for use as a D-Bus address value
/// (`dbus_address_escape_value`).
pub fn escape_value(s: &str) -> String {
    escape_bytes(s.as_bytes())
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Unescape a D-Bus address value to bytes. Like libdbus, bytes outside the
/// optionally-escaped set must be `%`-escaped.
pub fn unescape_bytes(s: &str) -> Result<Vec<u8>, AddressError> {
    let bad = |problem: String| AddressError::BadEscape {
        value: s.to_owned(),
        problem,
    };
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hi = bytes.get(i + 1).copied().and_then(hex_val);
            let lo = bytes.get(i + 2).copied().and_then(hex_val);
            match (hi, lo) {
                (Some(hi), Some(lo)) => out.push(hi << 4 | lo),
                _ => {
                    return Err(bad(format!(
                        "'%' at byte {i} is not followed by two hex digits"
                    )));
                }
            }
            i += 3;
        } else if is_optionally_escaped(b) {
            out.push(b);
            i += 1;
        } else {
            let ch = s
                .get(i..)
                .and_then(|r| r.chars().next())
                .unwrap_or('\u{fffd}');
            return Err(bad(format!("character '{ch}' should have been escaped")));
        }
    }
    Ok(out)
}

#[cfg(test)]
/// Unescape a D-Bus address value (`dbus_address_unescape_value`).
pub fn unescape_value(s: &str) -> Result<String, AddressError> {
    String::from_utf8(unescape_bytes(s)?).map_err(|_| AddressError::NotUtf8(s.to_owned()))
}

/// The client address of a socket at `p`: `unix:path=<escaped>`.
pub fn client_address_for_path(p: &Path) -> String {
    format!("unix:path={}", escape_bytes(p.as_os_str().as_bytes()))
}

#[cfg(test)]
/// The client address of an abstract socket: `unix:abstract=<escaped>`.
pub fn client_address_for_abstract(name: &str) -> String {
    format!("unix:abstract={}", escape_value(name))
}

/// One parsed (but not interpreted) address: transport and unescaped
/// key/value pairs in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressEntry {
    pub transport: String,
    pub pairs: Vec<(String, Vec<u8>)>,
}

impl AddressEntry {
    fn get(&self, key: &str) -> Option<&[u8]> {
        self.pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_slice())
    }
}

/// Split a `;`-separated address list into entries, unescaping values.
/// Empty entries (e.g. from a trailing `;`) are skipped; a list with no
/// addresses at all is an error.
pub fn parse_address_entries(addrs: &str) -> Result<Vec<AddressEntry>, AddressError> {
    let mut out = Vec::new();
    for addr in addrs.split(';') {
        if addr.is_empty() {
            continue;
        }
        let (transport, rest) = addr
            .split_once(':')
            .ok_or_else(|| AddressError::MissingColon(addr.to_owned()))?;
        if transport.is_empty() {
            return Err(AddressError::EmptyTransport(addr.to_owned()));
        }
        let mut pairs: Vec<(String, Vec<u8>)> = Vec::new();
        let mut seen = HashSet::new();
        for pair in rest.split(',') {
            if pair.is_empty() {
                continue;
            }
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| AddressError::MissingEquals {
                    address: addr.to_owned(),
                    pair: pair.to_owned(),
                })?;
            if key.is_empty() {
                return Err(AddressError::EmptyKey(addr.to_owned()));
            }
            if !seen.insert(key) {
                return Err(AddressError::DuplicateKey {
                    address: addr.to_owned(),
                    key: key.to_owned(),
                });
            }
            pairs.push((key.to_owned(), unescape_bytes(value)?));
        }
        out.push(AddressEntry {
            transport: transport.to_owned(),
            pairs,
        });
    }
    if out.is_empty() {
        return Err(AddressError::Empty);
    }
    Ok(out)
}

fn path_from(bytes: &[u8], addr: &str) -> Result<PathBuf, AddressError> {
    if bytes.is_empty() {
        return Err(AddressError::EmptyPath(addr.to_owned()));
    }
    Ok(PathBuf::from(OsString::from_vec(bytes.to_vec())))
}

fn utf8(bytes: &[u8], addr: &str) -> Result<String, AddressError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| AddressError::NotUtf8(addr.to_owned()))
}

fn interpret(entry: &AddressEntry, addr: &str) -> Result<ListenAddress, AddressError> {
    match entry.transport.as_str() {
        "unix" => {
            let kinds: Vec<&str> = ["path", "abstract", "dir", "tmpdir", "runtime"]
                .into_iter()
                .filter(|k| entry.get(k).is_some())
                .collect();
            let [kind] = kinds.as_slice() else {
                return Err(AddressError::UnixKind(addr.to_owned()));
            };
            let value = entry.get(kind).unwrap_or_default();
            match *kind {
                "path" => Ok(ListenAddress::Path(path_from(value, addr)?)),
                "dir" => Ok(ListenAddress::Dir(path_from(value, addr)?)),
                "tmpdir" => Ok(ListenAddress::Tmpdir(path_from(value, addr)?)),
                "abstract" => {
                    if value.is_empty() {
                        return Err(AddressError::EmptyPath(addr.to_owned()));
                    }
                    Ok(ListenAddress::Abstract(utf8(value, addr)?))
                }
                _ => {
                    if value == b"yes" {
                        Ok(ListenAddress::Runtime)
                    } else {
                        Err(AddressError::BadRuntime(addr.to_owned()))
                    }
                }
            }
        }
        "tcp" => {
            // libdbus defaults: host "localhost", port 0 (any free port).
            let host = match entry.get("host") {
                Some(h) => utf8(h, addr)?,
                None => "localhost".to_owned(),
            };
            let port = match entry.get("port") {
                Some(p) => {
                    let p = utf8(p, addr)?;
                    p.parse::<u16>().map_err(|_| AddressError::BadPort {
                        address: addr.to_owned(),
                        port: p.clone(),
                    })?
                }
                None => 0,
            };
            let family = match entry.get("family") {
                Some(f) => {
                    let f = utf8(f, addr)?;
                    if f != "ipv4" && f != "ipv6" {
                        return Err(AddressError::BadFamily {
                            address: addr.to_owned(),
                            family: f,
                        });
                    }
                    Some(f)
                }
                None => None,
            };
            Ok(ListenAddress::Tcp { host, port, family })
        }
        other => Err(AddressError::UnsupportedTransport(other.to_owned())),
    }
}

/// Parse a `;`-separated list of server addresses. Keys other than the ones
/// that select the socket (e.g. `guid=`) are accepted and ignored.
pub fn parse_listen(addrs: &str) -> Result<Vec<ListenAddress>, AddressError> {
    let entries = parse_address_entries(addrs)?;
    // Keep the original text of each entry for error messages.
    let texts: Vec<&str> = addrs.split(';').filter(|a| !a.is_empty()).collect();
    entries
        .iter()
        .zip(texts)
        .map(|(entry, text)| interpret(entry, text))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_round_trip() {
        for s in [
            "",
            "plain/path-with_dots.and\\star*",
            "with space",
            "semi;colon,comma=equals:colon%percent",
            "ünïcödé ✓",
            "\u{0}\u{1}\u{7f}",
        ] {
            let e = escape_value(s);
            assert!(
                e.bytes().all(|b| is_optionally_escaped(b) || b == b'%'),
                "{e}"
            );
            assert_eq!(unescape_value(&e).as_deref(), Ok(s));
        }
        assert_eq!(escape_value("a b;c"), "a%20b%3bc");
        assert_eq!(escape_value("/tmp/x-1_2.3\\*"), "/tmp/x-1_2.3\\*");
        // all bytes
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(unescape_bytes(&escape_bytes(&all)), Ok(all));
    }

    #[test]
    fn unescape_errors() {
        assert_eq!(unescape_value("%41%4a%4A").as_deref(), Ok("AJJ"));
        assert!(unescape_value("%").is_err());
        assert!(unescape_value("%4").is_err());
        assert!(unescape_value("%zz").is_err());
        assert!(unescape_value("a b").is_err());
        assert!(unescape_value("é").is_err());
        assert!(matches!(
            unescape_value("%ff"),
            Err(AddressError::NotUtf8(_))
        ));
    }

    #[test]
    fn client_addresses() {
        assert_eq!(
            client_address_for_path(Path::new("/run/user/1000/bus")),
            "unix:path=/run/user/1000/bus"
        );
        assert_eq!(
            client_address_for_path(Path::new("/tmp/a b")),
            "unix:path=/tmp/a%20b"
        );
        let weird = PathBuf::from(OsString::from_vec(b"/tmp/\xff".to_vec()));
        let a = client_address_for_path(&weird);
        assert_eq!(a, "unix:path=/tmp/%ff");
        assert_eq!(parse_listen(&a), Ok(vec![ListenAddress::Path(weird)]));
        assert_eq!(
            client_address_for_abstract("/tmp/dbus-XYZ"),
            "unix:abstract=/tmp/dbus-XYZ"
        );
    }

    #[test]
    fn every_form() {
        let l = parse_listen(
            "unix:path=/tmp/a%20b;unix:abstract=/tmp/dbus-1,guid=0123;unix:dir=/run/x;\
             unix:tmpdir=/tmp;unix:runtime=yes;tcp:host=127.0.0.1,port=1234,family=ipv4;\
             tcp:port=0;",
        )
        .unwrap();
        assert_eq!(
            l,
            vec![
                ListenAddress::Path("/tmp/a b".into()),
                ListenAddress::Abstract("/tmp/dbus-1".into()),
                ListenAddress::Dir("/run/x".into()),
                ListenAddress::Tmpdir("/tmp".into()),
                ListenAddress::Runtime,
                ListenAddress::Tcp {
                    host: "127.0.0.1".into(),
                    port: 1234,
                    family: Some("ipv4".into())
                },
                ListenAddress::Tcp {
                    host: "localhost".into(),
                    port: 0,
                    family: None
                },
            ]
        );
        let env = |k: &str| (k == "XDG_RUNTIME_DIR").then(|| "/run/user/5".to_owned());
        assert_eq!(
            ListenAddress::Runtime.runtime_path(&env),
            Some(PathBuf::from("/run/user/5/bus"))
        );
        assert_eq!(ListenAddress::Runtime.runtime_path(&|_| None), None);
    }

    #[test]
    fn errors() {
        use AddressError::*;
        let err = |s: &str| parse_listen(s).unwrap_err();
        assert_eq!(err(""), Empty);
        assert_eq!(err(";;"), Empty);
        assert!(matches!(err("unix"), MissingColon(_)));
        assert!(matches!(err(":path=/x"), EmptyTransport(_)));
        assert!(matches!(err("unix:path"), MissingEquals { .. }));
        assert!(matches!(err("unix:=x"), EmptyKey(_)));
        assert!(matches!(err("unix:path=/a,path=/b"), DuplicateKey { .. }));
        assert!(matches!(err("unix:path=/a,abstract=b"), UnixKind(_)));
        assert!(matches!(err("unix:guid=00"), UnixKind(_)));
        assert!(matches!(err("unix:runtime=no"), BadRuntime(_)));
        assert!(matches!(err("unix:path="), EmptyPath(_)));
        assert!(matches!(err("unix:path=/a b"), BadEscape { .. }));
        assert!(matches!(err("tcp:port=70000"), BadPort { .. }));
        assert!(matches!(err("tcp:port=1,family=ipx"), BadFamily { .. }));
        assert!(matches!(err("systemd:"), UnsupportedTransport(_)));
        assert!(matches!(err("nonce-tcp:port=1"), UnsupportedTransport(_)));
        // The error names the offending address.
        let e = err("unix:path=/ok;unix:runtime=maybe").to_string();
        assert!(e.contains("unix:runtime=maybe"), "{e}");
    }
}
