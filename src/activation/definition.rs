//! Service definitions: busvisor's own TOML files and dbus-daemon's
//! `[D-BUS Service]` files, unified as [`ServiceDef`], and the directory
//! scan that builds the [`Catalog`] of activatable names.
//!
//! # TOML format
//!
//! One service per file, `services.d/ID.toml`; the file stem is the id:
//!
//! ```toml
//! names = ["org.busvisor.Echo"]        # or: name = "org.busvisor.Echo"
//! exec = ["python3", "/path/echo.py"]  # argv; argv[0] absolute, or bare for PATH lookup
//! working_directory = "/tmp"           # absolute
//! environment = { FOO = "bar" }
//! restart = "on-failure"               # "no" | "on-failure" | "always"
//! restart_delay = "100ms"
//! restart_delay_max = "30s"
//! start_limit = { burst = 5, interval = "10s" }
//! start_timeout = "25s"
//! stop_timeout = "10s"
//! stop_signal = "SIGTERM"              # also "TERM", "15" or 15
//! idle_timeout = "60s"
//! ```
//!
//! Durations are strings such as `"250ms"`, `"2s"`, `"1.5s"`, `"5m"`,
//! `"1h"`, `"1m30s"` (units `us`, `ms`, `s`, `m`/`min`, `h`, `d`; a bare
//! number is seconds) or TOML numbers of seconds (`2`, `0.25`).
//!
//! Unknown keys and invalid values are errors whose message names the file,
//! line, column and key, e.g.
//! ``services.d/echo.toml:3:1: unknown field `restrat`, expected one of …``.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};

use super::desktop::{DesktopError, ServiceFile};
use super::exec::ExecError;
use crate::wire::validate;

/// Where a definition came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// A busvisor `*.toml` file.
    Toml,
    /// A dbus-daemon `[D-BUS Service]` `*.service` file.
    DBusService,
}

/// When a service that exited is started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Never restart; the next activation request starts it again.
    No,
    /// Restart after an unclean exit (non-zero status or killed by a signal).
    OnFailure,
    /// Restart after any exit that busvisor did not ask for.
    Always,
}

/// Default [`ServiceDef::restart_delay`] (systemd's `RestartSec`).
pub const DEFAULT_RESTART_DELAY: Duration = Duration::from_millis(100);
/// Default [`ServiceDef::restart_delay_max`].
pub const DEFAULT_RESTART_DELAY_MAX: Duration = Duration::from_secs(30);
/// Default [`ServiceDef::start_limit_burst`] (systemd).
pub const DEFAULT_START_LIMIT_BURST: u32 = 5;
/// Default [`ServiceDef::start_limit_interval`] (systemd).
pub const DEFAULT_START_LIMIT_INTERVAL: Duration = Duration::from_secs(10);
/// Default [`ServiceDef::stop_timeout`].
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Default [`ServiceDef::stop_signal`].
pub const DEFAULT_STOP_SIGNAL: Signal = Signal::SIGTERM;
/// Default [`ServiceDef::log_lines`].
pub const DEFAULT_LOG_LINES: u32 = 1000;
/// The most [`ServiceDef::log_lines`] may be.
pub const MAX_LOG_LINES: u32 = 100_000;
/// The output buffer's bytes per kept line, on average (1000 lines: 256 KiB).
pub const LOG_BYTES_PER_LINE: usize = 256;
/// Largest TOML definition file read by [`Catalog::scan`].
pub const MAX_TOML_FILE_SIZE: usize = 1024 * 1024;

/// A service busvisor can start on demand, from either kind of file.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceDef {
    /// TOML: the file stem; `.service`: the `Name=`.
    pub id: String,
    /// Well-known bus names the service provides (at least one, no
    /// duplicates).
    pub names: Vec<String>,
    /// TOML: `exec` as given; `.service`: `Exec=` split like dbus-daemon.  An
    /// `Err` is reported as `InvalidArgs` when activation is attempted.
    pub argv: Result<Vec<String>, ExecError>,
    /// The program `argv[0]` names, as busvisor runs it: a path as given, a
    /// bare name (TOML only) looked up in busvisor's own PATH when the
    /// definition was read (never in the activation environment's, which
    /// clients set). None: not found, or no valid `argv`.
    pub exec_path: Option<PathBuf>,
    /// Extra environment variables.  TOML: sorted by name (the toml crate
    /// does not keep document order); `.service`: none.
    pub env: Vec<(String, String)>,
    pub working_dir: Option<PathBuf>,
    /// `.service` default: `No` (dbus-daemon semantics); TOML default:
    /// `OnFailure`.
    pub restart: RestartPolicy,
    /// Delay before the first restart (default 100ms).
    pub restart_delay: Duration,
    /// The delay doubles per consecutive failure up to this cap (default
    /// 30s).  Never less than `restart_delay`.
    pub restart_delay_max: Duration,
    /// More than `start_limit_burst` starts within `start_limit_interval`
    /// mark the service failed (defaults 5 and 10s).  Always at least 1.
    pub start_limit_burst: u32,
    /// A zero interval disables the start limit (as in systemd).
    pub start_limit_interval: Duration,
    /// `None`: the bus's `service_start_timeout`.  Never zero.
    pub start_timeout: Option<Duration>,
    /// Time between `stop_signal` and SIGKILL (default 10s).  Never zero.
    pub stop_timeout: Duration,
    /// Default SIGTERM.
    pub stop_signal: Signal,
    /// Stop the service after it has been idle this long.  Never zero.
    pub idle_timeout: Option<Duration>,
    /// The file the definition was read from.
    pub file: PathBuf,
    pub source: Source,
    /// `SystemdService=` of a `[D-BUS Service]` file: with
    /// `--systemd-activation`, systemd starts this unit instead.
    pub systemd_service: Option<String>,
    /// Lines of output kept for `busvisor logs` (TOML `log_lines`, default
    /// 1000); the buffer holds at most [`LOG_BYTES_PER_LINE`] bytes a line
    /// on average.
    pub log_lines: u32,
    /// The user the service runs as (`User=`; TOML `user`). Required on the
    /// system bus; on a session bus every service runs as the bus's user.
    pub user: Option<String>,
    /// `user` names no account: looked up when the definition was read on
    /// the system bus (off the lock), so that starting it is refused as
    /// dbus-daemon's launch helper refuses it (see `system.rs`).
    pub unknown_user: bool,
}

impl ServiceDef {
    /// A definition with every optional setting at its default for `source`.
    pub fn with_defaults(
        id: String,
        names: Vec<String>,
        argv: Result<Vec<String>, ExecError>,
        file: PathBuf,
        source: Source,
    ) -> ServiceDef {
        ServiceDef {
            id,
            names,
            argv,
            exec_path: None,
            env: Vec::new(),
            working_dir: None,
            restart: match source {
                Source::Toml => RestartPolicy::OnFailure,
                Source::DBusService => RestartPolicy::No,
            },
            restart_delay: DEFAULT_RESTART_DELAY,
            restart_delay_max: DEFAULT_RESTART_DELAY_MAX,
            start_limit_burst: DEFAULT_START_LIMIT_BURST,
            start_limit_interval: DEFAULT_START_LIMIT_INTERVAL,
            start_timeout: None,
            stop_timeout: DEFAULT_STOP_TIMEOUT,
            stop_signal: DEFAULT_STOP_SIGNAL,
            idle_timeout: None,
            file,
            source,
            systemd_service: None,
            log_lines: DEFAULT_LOG_LINES,
            user: None,
            unknown_user: false,
        }
    }
}

/// An error in a TOML definition, located in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TomlError {
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
    /// Dotted path of the key concerned, when known (`start_limit.burst`).
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for TomlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file.display(), self.line, self.column)?;
        match &self.key {
            Some(key) if !self.message.contains(&format!("`{key}`")) => {
                write!(f, "key `{key}`: {}", self.message)
            }
            _ => f.write_str(&self.message),
        }
    }
}

/// Why a definition file could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DefinitionError {
    /// A TOML definition is invalid.
    Toml(TomlError),
    /// A `.service` file is invalid.
    Desktop(DesktopError),
    /// The file could not be read, or has no usable name.
    File { file: PathBuf, message: String },
}

impl DefinitionError {
    #[cfg(test)]
    /// The file concerned.
    pub fn file(&self) -> &Path {
        match self {
            DefinitionError::Toml(e) => &e.file,
            DefinitionError::Desktop(e) => &e.file,
            DefinitionError::File { file, .. } => file,
        }
    }

    #[cfg(test)]
    /// The 1-based line concerned, when known.
    pub fn line(&self) -> Option<usize> {
        match self {
            DefinitionError::Toml(e) => Some(e.line),
            DefinitionError::Desktop(e) => e.line,
            DefinitionError::File { .. } => None,
        }
    }
}

impl fmt::Display for DefinitionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DefinitionError::Toml(e) => e.fmt(f),
            DefinitionError::Desktop(e) => e.fmt(f),
            DefinitionError::File { file, message } => {
                write!(f, "{}: {message}", file.display())
            }
        }
    }
}

impl std::error::Error for DefinitionError {}

impl From<TomlError> for DefinitionError {
    fn from(e: TomlError) -> Self {
        DefinitionError::Toml(e)
    }
}

impl From<DesktopError> for DefinitionError {
    fn from(e: DesktopError) -> Self {
        DefinitionError::Desktop(e)
    }
}

// ---------------------------------------------------------------------------
// Value parsing shared by the TOML schema

/// Parses a duration string: one or more `NUMBER[UNIT]` parts, optionally
/// separated by blanks, summed (`"1.5s"`, `"250ms"`, `"1m30s"`, `"2"`).
/// Units: `us`, `ms`, `s`/`sec`, `m`/`min`, `h`/`hr`, `d`; none means
/// seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    const NS_PER_SEC: u128 = 1_000_000_000;
    let invalid = || {
        format!(
            "invalid duration {s:?} (expected e.g. \"250ms\", \"2s\", \"1.5s\", \"5m\", \"1h\")"
        )
    };
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(invalid());
    }
    let mut total_ns: u128 = 0;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (num, after) = rest.split_at(num_end);
        let unit_end = after
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_end);
        let unit_ns: u128 = match unit {
            "us" => 1_000,
            "ms" | "msec" => 1_000_000,
            "" | "s" | "sec" => NS_PER_SEC,
            "m" | "min" => 60 * NS_PER_SEC,
            "h" | "hr" => 3_600 * NS_PER_SEC,
            "d" => 86_400 * NS_PER_SEC,
            _ => return Err(invalid()),
        };
        let (int_part, frac_part) = num.split_once('.').unwrap_or((num, ""));
        if (int_part.is_empty() && frac_part.is_empty())
            || frac_part.contains('.')
            || int_part.len() > 12
        {
            return Err(invalid());
        }
        let int: u128 = if int_part.is_empty() {
            0
        } else {
            int_part.parse().map_err(|_| invalid())?
        };
        // Up to 18 fractional digits are significant; ignore the rest.
        let frac_digits = frac_part.get(..frac_part.len().min(18)).unwrap_or("");
        let frac: u128 = if frac_digits.is_empty() {
            0
        } else {
            frac_digits.parse().map_err(|_| invalid())?
        };
        let scale = 10u128.pow(frac_digits.len() as u32);
        total_ns = total_ns
            .saturating_add(int.saturating_mul(unit_ns))
            .saturating_add(frac.saturating_mul(unit_ns) / scale);
        rest = after.trim_start();
    }
    let secs = u64::try_from(total_ns / NS_PER_SEC).map_err(|_| invalid())?;
    let nanos = u32::try_from(total_ns % NS_PER_SEC).map_err(|_| invalid())?;
    Ok(Duration::new(secs, nanos))
}

/// Parses a signal given as `"SIGTERM"`, `"TERM"` (any case) or a number
/// (`"15"`).
pub fn parse_signal(s: &str) -> Result<Signal, String> {
    let t = s.trim();
    if let Ok(n) = t.parse::<i32>() {
        return Signal::try_from(n).map_err(|_| format!("invalid signal number {n}"));
    }
    let upper = t.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    Signal::from_str(&name).map_err(|_| format!("unknown signal {s:?}"))
}

// Newtypes whose Deserialize impls validate, so that toml attaches the
// value's position to every error.

struct BusName(String);

impl<'de> Deserialize<'de> for BusName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        validate::well_known_name(&name)
            .map_err(|e| de::Error::custom(format!("invalid bus name {name:?}: {e}")))?;
        Ok(BusName(name))
    }
}

struct Dur<const NONZERO: bool>(Duration);

impl<'de, const NONZERO: bool> Deserialize<'de> for Dur<NONZERO> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Duration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "a duration such as \"250ms\", \"2s\", \"1.5s\", \"5m\" or a number of seconds",
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
                parse_duration(v).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
                Ok(Duration::from_secs(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
                u64::try_from(v)
                    .map(Duration::from_secs)
                    .map_err(|_| E::custom(format!("negative duration {v}")))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Duration, E> {
                Duration::try_from_secs_f64(v)
                    .map_err(|_| E::custom(format!("invalid duration {v} seconds")))
            }
        }
        let dur = d.deserialize_any(V)?;
        if NONZERO && dur.is_zero() {
            return Err(de::Error::custom("duration must be greater than zero"));
        }
        Ok(Dur(dur))
    }
}

struct Sig(Signal);

impl<'de> Deserialize<'de> for Sig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Signal;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a signal name such as \"SIGTERM\" or \"TERM\", or a signal number")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Signal, E> {
                parse_signal(v).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Signal, E> {
                i32::try_from(v)
                    .ok()
                    .and_then(|n| Signal::try_from(n).ok())
                    .ok_or_else(|| E::custom(format!("invalid signal number {v}")))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Signal, E> {
                i64::try_from(v)
                    .map_err(|_| E::custom(format!("invalid signal number {v}")))
                    .and_then(|n| self.visit_i64(n))
            }
        }
        d.deserialize_any(V).map(Sig)
    }
}

struct ExecArgv(Vec<String>);

impl<'de> Deserialize<'de> for ExecArgv {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let argv = Vec::<String>::deserialize(d)?;
        let Some(program) = argv.first() else {
            return Err(de::Error::custom(
                "exec must contain at least the program to run",
            ));
        };
        if program.is_empty() {
            return Err(de::Error::custom("exec[0] (the program) is empty"));
        }
        if program.contains('/') && !program.starts_with('/') {
            return Err(de::Error::custom(format!(
                "exec[0] {program:?} is a relative path: use an absolute path, \
                 or a bare name to look it up in PATH"
            )));
        }
        if let Some(i) = argv.iter().position(|a| a.contains('\0')) {
            return Err(de::Error::custom(format!("exec[{i}] contains a NUL byte")));
        }
        Ok(ExecArgv(argv))
    }
}

struct Env(Vec<(String, String)>);

impl<'de> Deserialize<'de> for Env {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Vec<(String, String)>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a table of environment variables with string values")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut env: Vec<(String, String)> = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    if key.is_empty() || key.contains(['=', '\0']) {
                        return Err(de::Error::custom(format!(
                            "invalid environment variable name {key:?}"
                        )));
                    }
                    let value: String = map.next_value()?;
                    if value.contains('\0') {
                        return Err(de::Error::custom(format!(
                            "environment variable {key} contains a NUL byte"
                        )));
                    }
                    if env.iter().any(|(k, _)| *k == key) {
                        return Err(de::Error::custom(format!(
                            "duplicate environment variable {key}"
                        )));
                    }
                    env.push((key, value));
                }
                Ok(env)
            }
        }
        d.deserialize_map(V).map(Env)
    }
}

struct WorkDir(PathBuf);

impl<'de> Deserialize<'de> for WorkDir {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let dir = String::deserialize(d)?;
        if !dir.starts_with('/') || dir.contains('\0') {
            return Err(de::Error::custom(format!(
                "working_directory {dir:?} must be an absolute path"
            )));
        }
        Ok(WorkDir(PathBuf::from(dir)))
    }
}

struct Burst(u32);

impl<'de> Deserialize<'de> for Burst {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = u32;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a positive integer")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<u32, E> {
                u32::try_from(v).ok().filter(|&n| n >= 1).ok_or_else(|| {
                    E::custom(format!("start_limit.burst must be 1 or more, not {v}"))
                })
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<u32, E> {
                i64::try_from(v)
                    .map_err(|_| E::custom(format!("start_limit.burst {v} is too large")))
                    .and_then(|n| self.visit_i64(n))
            }
        }
        d.deserialize_any(V).map(Burst)
    }
}

/// Accepts only TOML arrays of names.
struct Names(Vec<BusName>);

impl<'de> Deserialize<'de> for Names {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Vec<BusName>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an array of bus names")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut names: Vec<BusName> = Vec::new();
                while let Some(name) = seq.next_element::<BusName>()? {
                    if names.iter().any(|n| n.0 == name.0) {
                        return Err(de::Error::custom(format!(
                            "bus name {} is listed twice",
                            name.0
                        )));
                    }
                    names.push(name);
                }
                if names.is_empty() {
                    return Err(de::Error::custom("names must list at least one bus name"));
                }
                Ok(names)
            }
        }
        d.deserialize_seq(V).map(Names)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TomlStartLimit {
    burst: Option<Burst>,
    interval: Option<Dur<false>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TomlService {
    name: Option<BusName>,
    names: Option<Names>,
    exec: ExecArgv,
    working_directory: Option<WorkDir>,
    environment: Option<Env>,
    restart: Option<RestartPolicy>,
    restart_delay: Option<Dur<false>>,
    restart_delay_max: Option<Dur<false>>,
    start_limit: Option<TomlStartLimit>,
    start_timeout: Option<Dur<true>>,
    stop_timeout: Option<Dur<true>>,
    stop_signal: Option<Sig>,
    idle_timeout: Option<Dur<true>>,
    user: Option<String>,
    log_lines: Option<u32>,
}

/// Byte offset -> 1-based (line, column in characters).
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut off = offset.min(text.len());
    while !text.is_char_boundary(off) {
        off -= 1;
    }
    let before = &text[..off];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// The dotted path of the innermost key whose key or value contains
/// `offset`, if the document parses.
fn key_path_at(text: &str, offset: usize) -> Option<String> {
    fn walk(table: &toml::de::DeTable<'_>, offset: usize) -> Option<Vec<String>> {
        for (key, value) in table.iter() {
            // A `[table]` header's span does not cover the keys under it, so
            // look inside tables whatever their span.
            if let Some(inner) = value.get_ref().as_table()
                && let Some(mut path) = walk(inner, offset)
            {
                path.insert(0, key.get_ref().to_string());
                return Some(path);
            }
            if key.span().contains(&offset) || value.span().contains(&offset) {
                return Some(vec![key.get_ref().to_string()]);
            }
        }
        None
    }
    let doc = toml::de::DeTable::parse(text).ok()?;
    walk(doc.get_ref(), offset).map(|path| path.join("."))
}

/// The start of the top-level key `key` in the document.
fn key_offset(text: &str, key: &str) -> Option<usize> {
    let doc = toml::de::DeTable::parse(text).ok()?;
    doc.get_ref()
        .iter()
        .find(|(k, _)| k.get_ref() == key)
        .map(|(k, _)| k.span().start)
}

fn toml_error_at(path: &Path, text: &str, offset: Option<usize>, message: String) -> TomlError {
    let (line, column) = offset.map_or((1, 1), |o| line_col(text, o));
    TomlError {
        file: path.to_path_buf(),
        line,
        column,
        key: offset.and_then(|o| key_path_at(text, o)),
        message,
    }
}

fn toml_id(path: &Path) -> Result<String, DefinitionError> {
    let bad = |message: &str| DefinitionError::File {
        file: path.to_path_buf(),
        message: message.to_string(),
    };
    let name = path
        .file_name()
        .ok_or_else(|| bad("no file name"))?
        .to_str()
        .ok_or_else(|| bad("file name is not valid UTF-8"))?;
    let id = name.strip_suffix(".toml").unwrap_or(name);
    if id.is_empty() {
        return Err(bad("empty service id (file name is just \".toml\")"));
    }
    Ok(id.to_string())
}

/// Parses a busvisor TOML definition.  The id is `path`'s file name without
/// `.toml`; `path` is also used in error messages.
pub fn parse_toml(path: &Path, text: &str) -> Result<ServiceDef, DefinitionError> {
    let id = toml_id(path)?;
    let raw: TomlService = toml::from_str(text).map_err(|e| {
        // Errors about the document as a whole (such as a missing field)
        // have an empty span at 0, or span all of it: they have no key and
        // are reported at 1:1.
        let offset = e
            .span()
            .filter(|s| !(s.start == 0 && (s.end == 0 || s.end >= text.trim_end().len())))
            .map(|s| s.start);
        toml_error_at(path, text, offset, e.message().trim().to_string())
    })?;

    let at_key = |key: &str, message: String| -> DefinitionError {
        toml_error_at(path, text, key_offset(text, key), message).into()
    };

    let names: Vec<String> = match (raw.name, raw.names) {
        (Some(name), None) => vec![name.0],
        (None, Some(names)) => names.0.into_iter().map(|n| n.0).collect(),
        (Some(_), Some(_)) => {
            return Err(at_key(
                "names",
                "give either `name` or `names`, not both".to_string(),
            ));
        }
        (None, None) => {
            return Err(toml_error_at(
                path,
                text,
                None,
                "missing field `names` (or `name`): the bus name(s) the service provides"
                    .to_string(),
            )
            .into());
        }
    };

    let mut def =
        ServiceDef::with_defaults(id, names, Ok(raw.exec.0), path.to_path_buf(), Source::Toml);
    if let Some(dir) = raw.working_directory {
        def.working_dir = Some(dir.0);
    }
    if let Some(env) = raw.environment {
        def.env = env.0;
    }
    if let Some(restart) = raw.restart {
        def.restart = restart;
    }
    if let Some(d) = raw.restart_delay {
        def.restart_delay = d.0;
    }
    if let Some(d) = raw.restart_delay_max {
        def.restart_delay_max = d.0;
    }
    if def.restart_delay_max < def.restart_delay {
        let key = if key_offset(text, "restart_delay_max").is_some() {
            "restart_delay_max"
        } else {
            "restart_delay"
        };
        return Err(at_key(
            key,
            format!(
                "restart_delay_max ({:?}) is less than restart_delay ({:?})",
                def.restart_delay_max, def.restart_delay
            ),
        ));
    }
    if let Some(limit) = raw.start_limit {
        if let Some(burst) = limit.burst {
            def.start_limit_burst = burst.0;
        }
        if let Some(interval) = limit.interval {
            def.start_limit_interval = interval.0;
        }
    }
    def.start_timeout = raw.start_timeout.map(|d| d.0);
    if let Some(d) = raw.stop_timeout {
        def.stop_timeout = d.0;
    }
    if let Some(sig) = raw.stop_signal {
        def.stop_signal = sig.0;
    }
    def.idle_timeout = raw.idle_timeout.map(|d| d.0);
    def.user = raw.user;
    if let Some(n) = raw.log_lines {
        if !(1..=MAX_LOG_LINES).contains(&n) {
            return Err(at_key(
                "log_lines",
                format!("log_lines must be between 1 and {MAX_LOG_LINES}, not {n}"),
            ));
        }
        def.log_lines = n;
    }
    Ok(def)
}

#[cfg(test)]
/// Parses a dbus-daemon `[D-BUS Service]` file (see
/// [`super::desktop`]).  The id and only name is `Name=`; settings other
/// than the argv are the defaults (restart `No`).  An `Exec=` that cannot be
/// split is kept as `Err` in `argv`, not reported here.
pub fn parse_dbus_service(path: &Path, text: &str) -> Result<ServiceDef, DefinitionError> {
    let service = ServiceFile::parse(path, text)?;
    Ok(def_from_service_file(path, service))
}

pub(crate) fn def_from_service_file(path: &Path, service: ServiceFile) -> ServiceDef {
    let mut def = ServiceDef::with_defaults(
        service.name.clone(),
        vec![service.name],
        service.argv,
        path.to_path_buf(),
        Source::DBusService,
    );
    def.systemd_service = service.systemd_service;
    def.user = service.user;
    def
}

// ---------------------------------------------------------------------------
// Directory scan

/// A directory of `[D-BUS Service]` files.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServiceDirSpec {
    pub path: PathBuf,
    /// Only load files named `NAME.service` for their `Name=NAME` (like
    /// dbus-daemon's system and `<standard_session_servicedirs/>`-derived
    /// strict directories).
    pub strict_naming: bool,
}

impl ServiceDirSpec {
    #[cfg(test)]
    /// An ordinary directory.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        ServiceDirSpec {
            path: path.into(),
            strict_naming: false,
        }
    }

    #[cfg(test)]
    /// A strict-naming directory.
    pub fn strict(path: impl Into<PathBuf>) -> Self {
        ServiceDirSpec {
            path: path.into(),
            strict_naming: true,
        }
    }
}

/// The activatable services: bus name -> definition, and id -> definition.
/// Every definition owns all of its names.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    by_name: BTreeMap<String, Arc<ServiceDef>>,
    by_id: BTreeMap<String, Arc<ServiceDef>>,
    order: Vec<Arc<ServiceDef>>,
    /// Files that could not be read or parsed (also in the warnings), for
    /// the admin's view (`busvisor list` shows them as `bad-definition`).
    skipped: Vec<Skipped>,
}

/// A definition file skipped because it could not be read or parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The file's name without `.toml` or `.service`.
    pub id: String,
    pub file: PathBuf,
    pub source: Source,
    /// The error, located (`FILE:LINE:COLUMN: key `K`: ...`).
    pub error: String,
}

impl Catalog {
    /// Loads `*.toml` files from `toml_dirs`, then `*.service` files from
    /// `service_dirs`, each directory in the order given and each
    /// directory's files in byte order of their names.  The first
    /// definition of an id or bus name wins; a later definition that reuses
    /// any of them is skipped as a whole.  Bad, unreadable and skipped files
    /// are described in the returned warnings (the caller logs them);
    /// nothing is fatal and missing directories are ignored.
    ///
    /// On the system bus (`system`), the rules of `system.rs` apply too:
    /// only root's files in root's directories are read, each definition's
    /// user is looked up, what will keep a service from starting is said
    /// once here, and a `[D-BUS Service]` file not named after its name
    /// comes after every well-named one (the launch helper finds files by
    /// name, so `NAME.service` is the one that counts, wherever it is).
    pub fn scan(
        toml_dirs: &[PathBuf],
        service_dirs: &[ServiceDirSpec],
        system: Option<SystemScan>,
    ) -> (Catalog, Vec<String>) {
        let mut catalog = Catalog::default();
        let mut warnings = Vec::new();
        let mut misnamed = Vec::new();
        let trust = system.is_some();

        for dir in toml_dirs {
            if trust && !dir_trusted(dir, &mut warnings) {
                continue;
            }
            for (path, _) in list_dir(dir, ".toml", &mut warnings) {
                let result = read_file(&path, MAX_TOML_FILE_SIZE, trust).and_then(|bytes| {
                    let text = String::from_utf8(bytes).map_err(|e| DefinitionError::File {
                        file: path.clone(),
                        message: format!(
                            "not valid UTF-8 (at byte {})",
                            e.utf8_error().valid_up_to()
                        ),
                    })?;
                    parse_toml(&path, &text)
                });
                match result {
                    Ok(mut def) => {
                        def.exec_path = find_exec(&def);
                        if let Some(rules) = system {
                            rules.check(&mut def, &mut warnings);
                        }
                        catalog.add_or_warn(def, &mut warnings)
                    }
                    Err(e) => catalog.skip(&path, Source::Toml, e.to_string(), &mut warnings),
                }
            }
        }

        for spec in service_dirs {
            if trust && !dir_trusted(&spec.path, &mut warnings) {
                continue;
            }
            for (path, file_name) in list_dir(&spec.path, ".service", &mut warnings) {
                let result = read_file(&path, super::desktop::MAX_SERVICE_FILE_SIZE, trust)
                    .and_then(|bytes| Ok(ServiceFile::parse_bytes(&path, &bytes)?));
                let service = match result {
                    Ok(service) => service,
                    Err(e) => {
                        catalog.skip(&path, Source::DBusService, e.to_string(), &mut warnings);
                        continue;
                    }
                };
                let expected = format!("{}.service", service.name);
                if spec.strict_naming && file_name != expected {
                    let e = format!(
                        "{}: service file should have been named \"{expected}\" \
                         (strict naming in {})",
                        path.display(),
                        spec.path.display()
                    );
                    catalog.skip(&path, Source::DBusService, e, &mut warnings);
                    continue;
                }
                let mut def = def_from_service_file(&path, service);
                def.exec_path = find_exec(&def);
                if let Some(rules) = system {
                    rules.check(&mut def, &mut warnings);
                    if file_name != expected {
                        misnamed.push(def);
                        continue;
                    }
                }
                catalog.add_or_warn(def, &mut warnings);
            }
        }
        for def in misnamed {
            catalog.add_or_warn(def, &mut warnings);
        }

        (catalog, warnings)
    }

    #[cfg(test)]
    /// Builds a catalog from definitions already parsed, with the same
    /// first-wins rule as [`Catalog::scan`].
    pub fn from_defs(defs: impl IntoIterator<Item = ServiceDef>) -> (Catalog, Vec<String>) {
        let mut catalog = Catalog::default();
        let mut warnings = Vec::new();
        for def in defs {
            catalog.add_or_warn(def, &mut warnings);
        }
        (catalog, warnings)
    }

    /// A file that could not be loaded: said once in the warnings, and kept.
    fn skip(&mut self, path: &Path, source: Source, error: String, warnings: &mut Vec<String>) {
        warnings.push(format!("{error}; skipping this file"));
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let name = name.unwrap_or_default();
        let id = name
            .strip_suffix(".toml")
            .or_else(|| name.strip_suffix(".service"))
            .unwrap_or(&name)
            .to_owned();
        self.skipped.push(Skipped {
            id,
            file: path.to_path_buf(),
            source,
            error,
        });
    }

    /// The files that could not be loaded, in scan order.
    pub fn skipped(&self) -> &[Skipped] {
        &self.skipped
    }

    fn add_or_warn(&mut self, def: ServiceDef, warnings: &mut Vec<String>) {
        if let Err(message) = self.add(def) {
            warnings.push(message);
        }
    }

    fn add(&mut self, def: ServiceDef) -> Result<(), String> {
        if let Some(name) = def.names.iter().find(|n| self.by_name.contains_key(*n)) {
            let winner = self.by_name.get(name).map(|d| d.file.display().to_string());
            return Err(format!(
                "{}: bus name {name} is already provided by {}; ignoring this definition",
                def.file.display(),
                winner.unwrap_or_default()
            ));
        }
        if let Some(winner) = self.by_id.get(&def.id) {
            return Err(format!(
                "{}: service id {:?} is already defined by {}; ignoring this definition",
                def.file.display(),
                def.id,
                winner.file.display()
            ));
        }
        let def = Arc::new(def);
        for name in &def.names {
            self.by_name.insert(name.clone(), Arc::clone(&def));
        }
        self.by_id.insert(def.id.clone(), Arc::clone(&def));
        self.order.push(def);
        Ok(())
    }

    /// The definition providing `bus_name`.
    pub fn lookup(&self, bus_name: &str) -> Option<&Arc<ServiceDef>> {
        self.by_name.get(bus_name)
    }

    /// All activatable names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }

    /// All definitions, in load order.
    pub fn defs(&self) -> impl Iterator<Item = &Arc<ServiceDef>> {
        self.order.iter()
    }

    /// The definition with this id.
    pub fn get(&self, id: &str) -> Option<&Arc<ServiceDef>> {
        self.by_id.get(id)
    }

    /// Number of definitions.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    #[cfg(test)]
    /// Whether there are no definitions.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

/// Where `def`'s program is: see [`ServiceDef::exec_path`]. Read off the
/// lock, as part of the scan.
fn find_exec(def: &ServiceDef) -> Option<PathBuf> {
    let program = def.argv.as_ref().ok()?.first()?;
    if program.contains('/') {
        return Some(PathBuf::from(program));
    }
    super::exec::find_in_path(program, &super::exec::bus_path())
}

/// How definitions are read on the system bus (see `system.rs`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SystemScan {
    /// `--systemd-activation`: services with `SystemdService=` are
    /// systemd's, and nothing is said about them.
    pub systemd_activation: bool,
}

impl SystemScan {
    /// Look the definition's user up (off the lock: this is the scan) and
    /// say what will keep it from starting.
    fn check(&self, def: &mut ServiceDef, warnings: &mut Vec<String>) {
        def.unknown_user = def.user.as_deref().is_some_and(super::system::user_unknown);
        warnings.extend(super::system::load_warnings(def, self.systemd_activation));
    }
}

/// Whether the system bus may read definitions in `dir`: a missing one is
/// silently empty, an untrusted one is skipped with a warning.
fn dir_trusted(dir: &Path, warnings: &mut Vec<String>) -> bool {
    match std::fs::metadata(dir) {
        Ok(meta) if super::system::trusted(&meta) => true,
        Ok(_) => {
            warnings.push(super::system::untrusted_dir(dir));
            false
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => {
            warnings.push(format!("{}: cannot read directory: {e}", dir.display()));
            false
        }
    }
}

/// Regular files (following symlinks) in `dir` whose UTF-8 names end in
/// `suffix`, sorted by name.  A missing directory is silently empty.
fn list_dir(dir: &Path, suffix: &str, warnings: &mut Vec<String>) -> Vec<(PathBuf, String)> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            warnings.push(format!("{}: cannot read directory: {e}", dir.display()));
            return Vec::new();
        }
    };
    let mut names: Vec<OsString> = Vec::new();
    for entry in entries {
        match entry {
            Ok(entry) => names.push(entry.file_name()),
            Err(e) => warnings.push(format!("{}: error reading directory: {e}", dir.display())),
        }
    }
    names.sort();

    let mut files = Vec::new();
    for os_name in names {
        let path = dir.join(&os_name);
        let Some(name) = os_name.to_str() else {
            if os_name.as_encoded_bytes().ends_with(suffix.as_bytes()) {
                warnings.push(format!(
                    "{}: file name is not valid UTF-8; skipping this file",
                    path.display()
                ));
            }
            continue;
        };
        if !name.ends_with(suffix) {
            continue;
        }
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_file() => files.push((path, name.to_string())),
            Ok(_) => warnings.push(format!(
                "{}: not a regular file; skipping it",
                path.display()
            )),
            Err(e) => warnings.push(format!("{}: {e}; skipping this file", path.display())),
        }
    }
    files
}

/// Reads at most `limit` bytes; a longer file is an error. With `trust`
/// (the system bus), only a file of root's in a directory of root's (see
/// `system::trusted`): checked on the open file, so that what is read is
/// what was checked, and on the directory it really is in (a symlink may
/// lead elsewhere).
fn read_file(path: &Path, limit: usize, trust: bool) -> Result<Vec<u8>, DefinitionError> {
    let io_err = |e: std::io::Error| DefinitionError::File {
        file: path.to_path_buf(),
        message: format!("cannot read file: {e}"),
    };
    let file = std::fs::File::open(path).map_err(io_err)?;
    if trust {
        let untrusted = || DefinitionError::File {
            file: path.to_path_buf(),
            message: "not owned by root, or writable by group or others: not trusted on the \
                      system bus"
                .to_owned(),
        };
        if !super::system::trusted(&file.metadata().map_err(io_err)?) {
            return Err(untrusted());
        }
        let real = std::fs::canonicalize(path).map_err(io_err)?;
        let dir = real.parent().unwrap_or(Path::new("/"));
        if !std::fs::metadata(dir).is_ok_and(|m| super::system::trusted(&m)) {
            return Err(untrusted());
        }
    }
    let mut bytes = Vec::new();
    file.take(limit as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err)?;
    if bytes.len() > limit {
        return Err(DefinitionError::File {
            file: path.to_path_buf(),
            message: format!("file is larger than {limit} bytes"),
        });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn p() -> &'static Path {
        Path::new("services.d/echo.toml")
    }

    fn toml_ok(text: &str) -> ServiceDef {
        match parse_toml(p(), text) {
            Ok(d) => d,
            Err(e) => panic!("unexpected error: {e}"),
        }
    }

    fn toml_err(text: &str) -> String {
        match parse_toml(p(), text) {
            Ok(d) => panic!("unexpectedly parsed: {d:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn v(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    const MINIMAL: &str = "name = \"org.busvisor.Echo\"\nexec = [\"echo-service\"]\n";

    #[test]
    fn toml_defaults() {
        let d = toml_ok(MINIMAL);
        assert_eq!(d.id, "echo");
        assert_eq!(d.names, v(&["org.busvisor.Echo"]));
        assert_eq!(d.argv, Ok(v(&["echo-service"])));
        assert_eq!(d.env, vec![]);
        assert_eq!(d.working_dir, None);
        assert_eq!(d.restart, RestartPolicy::OnFailure);
        assert_eq!(d.restart_delay, Duration::from_millis(100));
        assert_eq!(d.restart_delay_max, Duration::from_secs(30));
        assert_eq!(d.start_limit_burst, 5);
        assert_eq!(d.start_limit_interval, Duration::from_secs(10));
        assert_eq!(d.start_timeout, None);
        assert_eq!(d.stop_timeout, Duration::from_secs(10));
        assert_eq!(d.stop_signal, Signal::SIGTERM);
        assert_eq!(d.idle_timeout, None);
        assert_eq!(d.file, p());
        assert_eq!(d.source, Source::Toml);
    }

    #[test]
    fn toml_every_key() {
        let d = toml_ok(
            r#"
names = ["org.busvisor.Echo", "org.busvisor.Echo2"]
exec = ["python3", "/path/echo.py", "--flag"]
working_directory = "/tmp"
environment = { FOO = "bar", EMPTY = "", LANG = "C.UTF-8" }
restart = "always"
restart_delay = "250ms"
restart_delay_max = "1m"
start_limit = { burst = 3, interval = "20s" }
start_timeout = "25s"
stop_timeout = 3
stop_signal = "SIGINT"
idle_timeout = "1.5s"
"#,
        );
        assert_eq!(d.names, v(&["org.busvisor.Echo", "org.busvisor.Echo2"]));
        assert_eq!(d.argv, Ok(v(&["python3", "/path/echo.py", "--flag"])));
        assert_eq!(d.working_dir, Some(PathBuf::from("/tmp")));
        let mut env = d.env.clone();
        env.sort();
        assert_eq!(
            env,
            vec![
                ("EMPTY".to_string(), String::new()),
                ("FOO".to_string(), "bar".to_string()),
                ("LANG".to_string(), "C.UTF-8".to_string()),
            ]
        );
        assert_eq!(d.restart, RestartPolicy::Always);
        assert_eq!(d.restart_delay, Duration::from_millis(250));
        assert_eq!(d.restart_delay_max, Duration::from_secs(60));
        assert_eq!(d.start_limit_burst, 3);
        assert_eq!(d.start_limit_interval, Duration::from_secs(20));
        assert_eq!(d.start_timeout, Some(Duration::from_secs(25)));
        assert_eq!(d.stop_timeout, Duration::from_secs(3));
        assert_eq!(d.stop_signal, Signal::SIGINT);
        assert_eq!(d.idle_timeout, Some(Duration::from_millis(1500)));
    }

    #[test]
    fn toml_table_syntax_and_partial_start_limit() {
        let d = toml_ok(
            "name = \"a.b\"\nexec = [\"/bin/x\"]\n\n[start_limit]\nburst = 9\n\n[environment]\nA = \"1\"\n",
        );
        assert_eq!(d.start_limit_burst, 9);
        assert_eq!(d.start_limit_interval, DEFAULT_START_LIMIT_INTERVAL);
        assert_eq!(d.env, vec![("A".to_string(), "1".to_string())]);
    }

    #[test]
    fn restart_values() {
        for (text, policy) in [
            ("no", RestartPolicy::No),
            ("on-failure", RestartPolicy::OnFailure),
            ("always", RestartPolicy::Always),
        ] {
            let d = toml_ok(&format!("{MINIMAL}restart = \"{text}\"\n"));
            assert_eq!(d.restart, policy);
        }
        let e = toml_err(&format!("{MINIMAL}restart = \"sometimes\"\n"));
        assert!(e.starts_with("services.d/echo.toml:3:11: "), "{e}");
        assert!(e.contains("`restart`") && e.contains("sometimes"), "{e}");
    }

    #[test]
    fn stop_signal_forms() {
        for (text, sig) in [
            ("\"SIGTERM\"", Signal::SIGTERM),
            ("\"TERM\"", Signal::SIGTERM),
            ("\"15\"", Signal::SIGTERM),
            ("15", Signal::SIGTERM),
            ("\"sighup\"", Signal::SIGHUP),
            ("\"USR1\"", Signal::SIGUSR1),
            ("\"SIGKILL\"", Signal::SIGKILL),
            ("2", Signal::SIGINT),
        ] {
            let d = toml_ok(&format!("{MINIMAL}stop_signal = {text}\n"));
            assert_eq!(d.stop_signal, sig, "{text}");
        }
        for text in [
            "\"SIGFOO\"",
            "\"\"",
            "0",
            "99",
            "-1",
            "\"99\"",
            "1.5",
            "true",
        ] {
            let e = toml_err(&format!("{MINIMAL}stop_signal = {text}\n"));
            assert!(e.starts_with("services.d/echo.toml:3:15: "), "{text}: {e}");
            assert!(e.contains("stop_signal"), "{text}: {e}");
        }
    }

    #[test]
    fn duration_parsing() {
        let ms = Duration::from_millis;
        for (s, d) in [
            ("100ms", ms(100)),
            ("250ms", ms(250)),
            ("2s", ms(2000)),
            ("1.5s", ms(1500)),
            ("0.1s", ms(100)),
            (".5s", ms(500)),
            ("5m", ms(300_000)),
            ("5min", ms(300_000)),
            ("1h", ms(3_600_000)),
            ("1d", ms(86_400_000)),
            ("1m30s", ms(90_000)),
            ("1m 30s", ms(90_000)),
            ("10", ms(10_000)),
            ("0", Duration::ZERO),
            ("750us", Duration::from_micros(750)),
            (" 3s ", ms(3000)),
            ("1.0000000001s", Duration::new(1, 0)),
            ("0.000000001s", Duration::from_nanos(1)),
        ] {
            assert_eq!(parse_duration(s), Ok(d), "{s}");
        }
        for s in [
            "",
            " ",
            "s",
            "ms",
            "1x",
            "1.2.3s",
            "-1s",
            "1 s",
            "abc",
            "1s-",
            ".s",
            "99999999999999999999s",
            "1e3s",
        ] {
            assert!(parse_duration(s).is_err(), "{s:?} should fail");
        }
    }

    #[test]
    fn duration_keys_accept_strings_and_numbers() {
        let d = toml_ok(&format!(
            "{MINIMAL}restart_delay = 2\nrestart_delay_max = 2.5\n"
        ));
        assert_eq!(d.restart_delay, Duration::from_secs(2));
        assert_eq!(d.restart_delay_max, Duration::from_millis(2500));
        let d = toml_ok(&format!("{MINIMAL}restart_delay = \"0\"\n"));
        assert_eq!(d.restart_delay, Duration::ZERO);
        for bad in [
            "restart_delay = \"fast\"",
            "restart_delay = -1",
            "restart_delay = -0.5",
            "restart_delay = true",
            "restart_delay = nan",
            "start_timeout = \"0s\"",
            "stop_timeout = 0",
            "idle_timeout = \"0ms\"",
        ] {
            let e = toml_err(&format!("{MINIMAL}{bad}\n"));
            let key = bad.split(' ').next().unwrap_or_default();
            assert!(e.starts_with("services.d/echo.toml:3:"), "{bad}: {e}");
            assert!(e.contains(&format!("`{key}`")), "{bad}: {e}");
        }
        let e = toml_err(&format!(
            "{MINIMAL}restart_delay = \"5s\"\nrestart_delay_max = \"1s\"\n"
        ));
        assert!(
            e.starts_with("services.d/echo.toml:4:1: key `restart_delay_max`"),
            "{e}"
        );
    }

    #[test]
    fn unknown_key_error_names_file_line_and_key() {
        let e = toml_err("name = \"org.busvisor.Echo\"\nexec = [\"echo\"]\nrestrat = \"always\"\n");
        assert!(
            e.starts_with("services.d/echo.toml:3:1: unknown field `restrat`, expected one of"),
            "{e}"
        );
        let e = toml_err(&format!(
            "{MINIMAL}start_limit = {{ burst = 1, intervall = \"1s\" }}\n"
        ));
        assert!(e.starts_with("services.d/echo.toml:3:"), "{e}");
        assert!(
            e.contains("start_limit.intervall") && e.contains("unknown field"),
            "{e}"
        );
    }

    #[test]
    fn wrong_types_name_the_key() {
        let cases = [
            ("exec = \"/bin/echo\"", "exec", 1),
            ("exec = [\"/bin/echo\", 3]", "exec", 1),
            ("environment = { FOO = 1 }", "environment.FOO", 2),
            ("environment = [\"FOO=1\"]", "environment", 2),
            ("working_directory = 5", "working_directory", 2),
            ("start_limit = { burst = \"5\" }", "start_limit.burst", 2),
            ("start_limit = { burst = 0 }", "start_limit.burst", 2),
            ("start_limit = 5", "start_limit", 2),
            ("names = \"org.a.B\"", "names", 1),
        ];
        for (line, key, lineno) in cases {
            let text = if lineno == 1 {
                format!("{line}\nname = \"org.a.B\"\n")
            } else {
                format!("name = \"org.a.B\"\n{line}\nexec = [\"/bin/x\"]\n")
            };
            let text = if line.starts_with("names") {
                format!("{line}\nexec = [\"/bin/x\"]\n")
            } else {
                text
            };
            let e = toml_err(&text);
            assert!(
                e.starts_with(&format!("services.d/echo.toml:{lineno}:")),
                "{line}: {e}"
            );
            assert!(e.contains(&format!("`{key}`")), "{line}: {e}");
        }
    }

    #[test]
    fn name_validation() {
        for bad in [
            "\"foo\"",
            "\":1.2\"",
            "\"org.1a.B\"",
            "\"org..B\"",
            "\"org.a b.C\"",
        ] {
            let e = toml_err(&format!("name = {bad}\nexec = [\"/bin/x\"]\n"));
            assert!(
                e.starts_with("services.d/echo.toml:1:8: key `name`: invalid bus name"),
                "{e}"
            );
        }
        let e = toml_err("exec = [\"/bin/x\"]\nnames = [\"org.a.B\", \"bad\"]\n");
        assert!(e.starts_with("services.d/echo.toml:2:"), "{e}");
        assert!(e.contains("`names`") && e.contains("\"bad\""), "{e}");
        let e = toml_err("exec = [\"/bin/x\"]\nnames = []\n");
        assert!(e.contains("at least one bus name"), "{e}");
        let e = toml_err("exec = [\"/bin/x\"]\nnames = [\"a.b\", \"a.b\"]\n");
        assert!(e.contains("listed twice"), "{e}");
        let e = toml_err("exec = [\"/bin/x\"]\nname = \"a.b\"\nnames = [\"c.d\"]\n");
        assert!(
            e.starts_with("services.d/echo.toml:3:1: give either `name` or `names`"),
            "{e}"
        );
        let e = toml_err("exec = [\"/bin/x\"]\n");
        assert!(e.contains("missing field `names`"), "{e}");
        let e = toml_err("name = \"a.b\"\n");
        assert_eq!(e, "services.d/echo.toml:1:1: missing field `exec`");
    }

    #[test]
    fn exec_validation() {
        assert_eq!(
            toml_ok("name = \"a.b\"\nexec = [\"/usr/bin/x\", \"\"]\n").argv,
            Ok(v(&["/usr/bin/x", ""]))
        );
        assert_eq!(
            toml_ok("name = \"a.b\"\nexec = [\"x\"]\n").argv,
            Ok(v(&["x"]))
        );
        for (bad, what) in [
            ("[]", "at least the program"),
            ("[\"\"]", "empty"),
            ("[\"bin/x\"]", "relative path"),
            ("[\"./x\"]", "relative path"),
            ("[\"/bin/x\", \"a\\u0000b\"]", "NUL"),
        ] {
            let e = toml_err(&format!("name = \"a.b\"\nexec = {bad}\n"));
            assert!(
                e.starts_with("services.d/echo.toml:2:8: key `exec`: "),
                "{e}"
            );
            assert!(e.contains(what), "{bad}: {e}");
        }
        let e = toml_err("name = \"a.b\"\n");
        assert!(e.contains("missing field `exec`"), "{e}");
    }

    #[test]
    fn working_directory_and_environment_validation() {
        let e = toml_err(&format!("{MINIMAL}working_directory = \"tmp\"\n"));
        assert!(e.contains("absolute"), "{e}");
        let e = toml_err(&format!("{MINIMAL}environment = {{ \"A=B\" = \"x\" }}\n"));
        assert!(e.contains("invalid environment variable name"), "{e}");
        let e = toml_err(&format!("{MINIMAL}environment = {{ \"\" = \"x\" }}\n"));
        assert!(e.contains("invalid environment variable name"), "{e}");
    }

    #[test]
    fn log_lines_sets_the_buffer_within_bounds() {
        assert_eq!(
            toml_ok("name = \"a.b\"\nexec = [\"/x\"]\n").log_lines,
            DEFAULT_LOG_LINES
        );
        let def = toml_ok("name = \"a.b\"\nexec = [\"/x\"]\nlog_lines = 50\n");
        assert_eq!(def.log_lines, 50);
        let e = toml_err("name = \"a.b\"\nexec = [\"/x\"]\nlog_lines = 0\n");
        assert!(
            e.contains(":3:1: ") && e.contains("between 1 and 100000"),
            "{e}"
        );
    }

    #[test]
    fn toml_syntax_error_has_position() {
        let e = toml_err("name = \"a.b\"\nexec = [\"/bin/x\"\n");
        assert!(e.starts_with("services.d/echo.toml:"), "{e}");
        let e = toml_err("name = \"a.b\"\nname = \"c.d\"\nexec = [\"/bin/x\"]\n");
        assert!(e.starts_with("services.d/echo.toml:2:"), "{e}");
    }

    #[test]
    fn exact_messages() {
        for (text, want) in [
            (
                "name = \"a.b\"\nexec = [\"/x\"]\n[start_limit]\nburst = 1\nbrust = 2\n",
                "services.d/echo.toml:5:1: key `start_limit.brust`: unknown field `brust`, \
                 expected `burst` or `interval`",
            ),
            (
                "name = \"a.b\"\nexec = [\"/x\"]\n[start_limit]\nburst = -3\n",
                "services.d/echo.toml:4:9: key `start_limit.burst`: \
                 start_limit.burst must be 1 or more, not -3",
            ),
            (
                "name = \"a.b\"\nexec = [\"/bin/echo\", 3]\n",
                "services.d/echo.toml:2:22: key `exec`: invalid type: integer `3`, expected a string",
            ),
            (
                "name = \"a.b\"\nexec = [\"/x\"]\nstop_signal = \"SIGFOO\"\n",
                "services.d/echo.toml:3:15: key `stop_signal`: unknown signal \"SIGFOO\"",
            ),
            (
                "names = [\"a.b\", \"bad\"]\nexec = [\"/x/y\"]\n",
                "services.d/echo.toml:1:9: key `names`: invalid bus name \"bad\": \
                 name must have at least two elements separated by '.'",
            ),
            (
                "name = \"é.b\"\nexec = [\"/x\"]\n",
                "services.d/echo.toml:1:8: key `name`: invalid bus name \"é.b\": \
                 invalid character 'é' (only A-Z a-z 0-9 _ - and '.' are allowed)",
            ),
        ] {
            assert_eq!(toml_err(text), want);
        }
    }

    #[test]
    fn toml_id_from_file_name() {
        let d = parse_toml(Path::new("/etc/busvisor/services.d/org.a.B.toml"), MINIMAL).unwrap();
        assert_eq!(d.id, "org.a.B");
        assert!(parse_toml(Path::new("/x/.toml"), MINIMAL).is_err());
    }

    #[test]
    fn dbus_service_defaults() {
        let path = Path::new("/usr/share/dbus-1/services/org.a.B.service");
        let d = parse_dbus_service(
            path,
            "[D-BUS Service]\nName=org.a.B\nExec=/usr/bin/b --x \"y z\"\nUser=root\n",
        )
        .unwrap();
        assert_eq!(d.id, "org.a.B");
        assert_eq!(d.names, v(&["org.a.B"]));
        assert_eq!(d.argv, Ok(v(&["/usr/bin/b", "--x", "y z"])));
        assert_eq!(d.restart, RestartPolicy::No);
        assert_eq!(d.restart_delay, DEFAULT_RESTART_DELAY);
        assert_eq!(d.stop_signal, Signal::SIGTERM);
        assert_eq!(d.source, Source::DBusService);
        assert_eq!(d.file, path);

        let d = parse_dbus_service(path, "[D-BUS Service]\nName=org.a.B\nExec=\"oops\n").unwrap();
        assert_eq!(d.argv, Err(ExecError::UnclosedQuotes));

        let e = parse_dbus_service(path, "[D-BUS Service]\nName=org.a.B\nExec=\\e\n").unwrap_err();
        assert_eq!(e.line(), Some(3));
        assert_eq!(e.file(), path);
    }

    // ----- scanning -----

    struct Dirs {
        _root: tempfile::TempDir,
        toml1: PathBuf,
        toml2: PathBuf,
        svc1: PathBuf,
        svc2: PathBuf,
    }

    fn dirs() -> Dirs {
        let root = tempfile::tempdir().unwrap();
        let mk = |name: &str| {
            let p = root.path().join(name);
            fs::create_dir(&p).unwrap();
            p
        };
        Dirs {
            toml1: mk("toml1"),
            toml2: mk("toml2"),
            svc1: mk("svc1"),
            svc2: mk("svc2"),
            _root: root,
        }
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        fs::write(&p, text).unwrap();
        p
    }

    fn svc(name: &str, exec: &str) -> String {
        format!("[D-BUS Service]\nName={name}\nExec={exec}\n")
    }

    fn tml(name: &str, exec: &str) -> String {
        format!("name = \"{name}\"\nexec = [\"{exec}\"]\n")
    }

    #[test]
    fn scan_precedence_toml_first_then_service_dirs_in_order() {
        let d = dirs();
        write(&d.svc1, "org.a.A.service", &svc("org.a.A", "/svc1/a"));
        write(&d.toml1, "a.toml", &tml("org.a.A", "/toml1/a"));
        write(&d.svc1, "org.a.B.service", &svc("org.a.B", "/svc1/b"));
        write(&d.svc2, "org.a.B.service", &svc("org.a.B", "/svc2/b"));
        write(&d.svc2, "org.a.C.service", &svc("org.a.C", "/svc2/c"));
        write(&d.toml2, "a.toml", &tml("org.a.Z", "/toml2/a"));

        let (cat, warnings) = Catalog::scan(
            &[d.toml1.clone(), d.toml2.clone()],
            &[ServiceDirSpec::new(&d.svc1), ServiceDirSpec::new(&d.svc2)],
            None,
        );
        let argv0 = |name: &str| cat.lookup(name).unwrap().argv.as_ref().unwrap()[0].clone();
        assert_eq!(argv0("org.a.A"), "/toml1/a");
        assert_eq!(cat.lookup("org.a.A").unwrap().source, Source::Toml);
        assert_eq!(argv0("org.a.B"), "/svc1/b");
        assert_eq!(argv0("org.a.C"), "/svc2/c");
        assert!(cat.lookup("org.a.Z").is_none());
        assert_eq!(
            cat.names().collect::<Vec<_>>(),
            ["org.a.A", "org.a.B", "org.a.C"]
        );
        assert_eq!(cat.len(), 3);
        assert_eq!(
            cat.defs().map(|d| d.id.as_str()).collect::<Vec<_>>(),
            ["a", "org.a.B", "org.a.C"]
        );
        assert_eq!(cat.get("a").unwrap().names, v(&["org.a.A"]));
        assert_eq!(cat.get("org.a.C").unwrap().source, Source::DBusService);
        assert!(cat.get("nope").is_none());

        assert_eq!(warnings.len(), 3, "{warnings:#?}");
        assert!(
            warnings
                .iter()
                .any(|w| w.contains("toml2/a.toml") && w.contains("\"a\" is already defined"))
        );
        assert!(warnings.iter().any(|w| w.contains("svc1/org.a.A.service")
            && w.contains("org.a.A is already provided by")
            && w.contains("toml1/a.toml")));
        assert!(
            warnings
                .iter()
                .any(|w| w.contains("svc2/org.a.B.service") && w.contains("svc1/org.a.B.service"))
        );
    }

    #[test]
    fn scan_within_a_dir_is_sorted_by_file_name() {
        let d = dirs();
        // Both claim org.a.X; "a-..." sorts first and wins in every run.
        write(&d.svc1, "b-second.service", &svc("org.a.X", "/second"));
        write(&d.svc1, "a-first.service", &svc("org.a.X", "/first"));
        write(&d.toml1, "z.toml", &tml("org.a.Y", "/z"));
        write(&d.toml1, "m.toml", &tml("org.a.Y", "/m"));
        let (cat, warnings) = Catalog::scan(
            std::slice::from_ref(&d.toml1),
            &[ServiceDirSpec::new(&d.svc1)],
            None,
        );
        assert_eq!(cat.lookup("org.a.X").unwrap().argv, Ok(v(&["/first"])));
        assert_eq!(cat.lookup("org.a.Y").unwrap().id, "m");
        assert_eq!(warnings.len(), 2, "{warnings:#?}");
    }

    #[test]
    fn scan_multi_name_conflicts_skip_the_whole_definition() {
        let d = dirs();
        write(&d.toml1, "a.toml", &tml("org.a.A", "/a"));
        write(
            &d.toml1,
            "b.toml",
            "names = [\"org.a.B\", \"org.a.A\"]\nexec = [\"/b\"]\n",
        );
        let (cat, warnings) = Catalog::scan(std::slice::from_ref(&d.toml1), &[], None);
        assert!(cat.lookup("org.a.B").is_none());
        assert!(cat.get("b").is_none());
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("b.toml") && warnings[0].contains("org.a.A"));
    }

    #[test]
    fn scan_strict_naming() {
        let d = dirs();
        write(&d.svc1, "org.a.Good.service", &svc("org.a.Good", "/good"));
        write(&d.svc1, "wrong-name.service", &svc("org.a.Bad", "/bad"));
        write(&d.svc2, "also-wrong.service", &svc("org.a.Loose", "/loose"));
        let (cat, warnings) = Catalog::scan(
            &[],
            &[
                ServiceDirSpec::strict(&d.svc1),
                ServiceDirSpec::new(&d.svc2),
            ],
            None,
        );
        assert!(cat.lookup("org.a.Good").is_some());
        assert!(cat.lookup("org.a.Bad").is_none());
        assert!(cat.lookup("org.a.Loose").is_some());
        assert_eq!(warnings.len(), 1, "{warnings:#?}");
        assert!(warnings[0].contains("wrong-name.service"));
        assert!(warnings[0].contains("should have been named \"org.a.Bad.service\""));
    }

    #[test]
    fn scan_bad_files_are_skipped_with_located_errors() {
        let d = dirs();
        write(
            &d.toml1,
            "echo.toml",
            "name = \"org.a.Echo\"\nexec = [\"/bin/echo\"]\nrestrat = \"always\"\n",
        );
        write(&d.toml1, "good.toml", &tml("org.a.Good", "/good"));
        write(
            &d.toml1,
            "types.toml",
            "name = \"org.a.T\"\nexec = [\"/t\"]\nstop_timeout = \"soon\"\n",
        );
        write(
            &d.svc1,
            "org.a.Esc.service",
            "[D-BUS Service]\nName=org.a.Esc\nExec=/x \\q\n",
        );
        write(
            &d.svc1,
            "org.a.NoName.service",
            "[D-BUS Service]\nExec=/x\n",
        );
        write(
            &d.svc1,
            "org.a.Quote.service",
            &svc("org.a.Quote", "/x 'oops"),
        );
        fs::write(
            d.svc1.join("org.a.Bin.service"),
            b"[D-BUS Service]\nName=org.a.Bin\nExec=/\xfe\n",
        )
        .unwrap();
        fs::write(d.svc1.join("org.a.Huge.service"), vec![b'#'; 200_000]).unwrap();
        // ignored: wrong suffixes and directories
        write(&d.toml1, "notes.txt", "garbage");
        write(&d.svc1, "org.a.X.service.bak", "garbage");
        fs::create_dir(d.toml1.join("dir.toml")).unwrap();

        let (cat, warnings) = Catalog::scan(
            std::slice::from_ref(&d.toml1),
            &[ServiceDirSpec::new(&d.svc1)],
            None,
        );
        assert_eq!(
            cat.names().collect::<Vec<_>>(),
            ["org.a.Good", "org.a.Quote"]
        );
        // Exec errors are deferred to activation
        assert_eq!(
            cat.lookup("org.a.Quote").unwrap().argv,
            Err(ExecError::UnclosedQuotes)
        );

        let find = |needle: &str| {
            warnings
                .iter()
                .find(|w| w.contains(needle))
                .unwrap_or_else(|| panic!("no warning about {needle}: {warnings:#?}"))
                .clone()
        };
        let w = find("echo.toml");
        assert!(w.contains("echo.toml:3:1: unknown field `restrat`"), "{w}");
        let w = find("types.toml");
        assert!(
            w.contains("types.toml:3:16: key `stop_timeout`: invalid duration"),
            "{w}"
        );
        let w = find("org.a.Esc.service");
        assert!(
            w.contains("org.a.Esc.service:3: Text to be unescaped had invalid escape"),
            "{w}"
        );
        let w = find("org.a.NoName.service");
        assert!(w.contains(":1: No \"Name\" key"), "{w}");
        let w = find("org.a.Bin.service");
        assert!(w.contains(":3: invalid UTF-8"), "{w}");
        let w = find("dir.toml");
        assert!(w.contains("not a regular file"), "{w}");
        let w = find("org.a.Huge.service");
        assert!(w.contains("file is larger than 131072 bytes"), "{w}");
        assert_eq!(warnings.len(), 7, "{warnings:#?}");
    }

    #[test]
    fn scan_missing_dirs_are_fine() {
        let d = dirs();
        let missing = d.toml1.join("does-not-exist");
        let (cat, warnings) = Catalog::scan(
            std::slice::from_ref(&missing),
            &[ServiceDirSpec::new(&missing)],
            None,
        );
        assert!(cat.is_empty());
        assert!(warnings.is_empty());
        let (cat, warnings) = Catalog::scan(&[], &[], None);
        assert!(cat.is_empty() && warnings.is_empty());
    }

    #[test]
    fn scan_follows_symlinks() {
        let d = dirs();
        let target = write(&d.svc2, "real", &svc("org.a.Link", "/l"));
        std::os::unix::fs::symlink(&target, d.svc1.join("org.a.Link.service")).unwrap();
        std::os::unix::fs::symlink(
            d.svc2.join("missing"),
            d.svc1.join("org.a.Dangling.service"),
        )
        .unwrap();
        let (cat, warnings) = Catalog::scan(&[], &[ServiceDirSpec::strict(&d.svc1)], None);
        assert!(cat.lookup("org.a.Link").is_some());
        assert_eq!(warnings.len(), 1, "{warnings:#?}");
        assert!(warnings[0].contains("org.a.Dangling.service"));
    }

    #[test]
    fn from_defs_applies_first_wins() {
        let mk = |id: &str, name: &str| {
            ServiceDef::with_defaults(
                id.into(),
                vec![name.into()],
                Ok(vec!["/x".into()]),
                PathBuf::from(format!("/{id}")),
                Source::Toml,
            )
        };
        let (cat, warnings) = Catalog::from_defs([mk("a", "x.A"), mk("b", "x.A"), mk("c", "x.C")]);
        assert_eq!(cat.lookup("x.A").unwrap().id, "a");
        assert_eq!(cat.len(), 2);
        assert_eq!(warnings.len(), 1);
    }

    #[test]
    fn loads_every_system_session_service_file() {
        let dir = Path::new("/usr/share/dbus-1/services");
        if !dir.is_dir() {
            eprintln!("{} missing; skipping", dir.display());
            return;
        }
        let mut count = 0;
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("service") {
                continue;
            }
            let text = fs::read_to_string(&path).unwrap();
            let def = parse_dbus_service(&path, &text)
                .unwrap_or_else(|e| panic!("failed to load {}: {e}", path.display()));
            assert!(def.argv.is_ok(), "{}: {:?}", path.display(), def.argv);
            count += 1;
        }
        let (cat, warnings) = Catalog::scan(&[], &[ServiceDirSpec::new(dir)], None);
        assert!(warnings.is_empty(), "{warnings:#?}");
        assert_eq!(cat.len(), count);
    }

    fn system() -> Option<SystemScan> {
        Some(SystemScan::default())
    }

    /// The system bus's rules need files of root's; as any other user,
    /// every file would be skipped.
    fn as_root() -> bool {
        let root = nix::unistd::geteuid().is_root();
        if !root {
            eprintln!("not root: skipped");
        }
        root
    }

    fn chmod(path: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn system_scan_reads_only_roots_files_in_roots_dirs() {
        if !as_root() {
            return;
        }
        let d = dirs();
        let user = "User=root\n";
        write(
            &d.svc1,
            "org.a.Good.service",
            &(svc("org.a.Good", "/good") + user),
        );
        let open = write(
            &d.svc1,
            "org.a.Open.service",
            &(svc("org.a.Open", "/o") + user),
        );
        chmod(&open, 0o664);
        let other = write(
            &d.svc1,
            "org.a.Other.service",
            &(svc("org.a.Other", "/o") + user),
        );
        nix::unistd::chown(&other, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
        write(
            &d.svc2,
            "org.a.InOpenDir.service",
            &(svc("org.a.InOpenDir", "/o") + user),
        );
        chmod(&d.svc2, 0o777);
        write(
            &d.toml1,
            "t.toml",
            &(tml("org.a.Toml", "/t") + "user = \"root\"\n"),
        );
        chmod(&d.toml1, 0o775);

        let (cat, warnings) = Catalog::scan(
            std::slice::from_ref(&d.toml1),
            &[ServiceDirSpec::new(&d.svc1), ServiceDirSpec::new(&d.svc2)],
            system(),
        );
        assert_eq!(cat.names().collect::<Vec<_>>(), ["org.a.Good"]);
        let untrusted = "not owned by root, or writable by group or others: not trusted on the \
                         system bus";
        for (what, skip) in [
            (open.display().to_string(), "skipping this file"),
            (other.display().to_string(), "skipping this file"),
            (
                d.svc2.display().to_string(),
                "skipping the definitions in it",
            ),
            (
                d.toml1.display().to_string(),
                "skipping the definitions in it",
            ),
        ] {
            assert!(
                warnings.contains(&format!("{what}: {untrusted}; {skip}")),
                "{what}: {warnings:#?}"
            );
        }
        assert_eq!(warnings.len(), 4, "{warnings:#?}");
        // A session bus reads them all.
        let (cat, _) = Catalog::scan(
            std::slice::from_ref(&d.toml1),
            &[ServiceDirSpec::new(&d.svc1), ServiceDirSpec::new(&d.svc2)],
            None,
        );
        assert_eq!(cat.len(), 5);
    }

    #[test]
    fn system_scan_a_symlink_into_an_open_dir_is_not_trusted() {
        if !as_root() {
            return;
        }
        let d = dirs();
        let target = write(
            &d.svc2,
            "elsewhere",
            &(svc("org.a.Link", "/l") + "User=root\n"),
        );
        chmod(&d.svc2, 0o777);
        std::os::unix::fs::symlink(&target, d.svc1.join("org.a.Link.service")).unwrap();
        let (cat, warnings) = Catalog::scan(&[], &[ServiceDirSpec::new(&d.svc1)], system());
        assert!(cat.is_empty());
        assert!(
            warnings[0].contains("not trusted on the system bus"),
            "{warnings:#?}"
        );
    }

    #[test]
    fn system_scan_well_named_files_win_and_the_rest_is_said_once() {
        if !as_root() {
            return;
        }
        let d = dirs();
        // The misnamed file comes first in directory order, yet the
        // well-named one, in a later directory, provides the name.
        write(
            &d.svc1,
            "aaa.service",
            &(svc("org.a.X", "/misnamed") + "User=root\n"),
        );
        write(
            &d.svc2,
            "org.a.X.service",
            &(svc("org.a.X", "/right") + "User=root\n"),
        );
        write(
            &d.svc1,
            "bbb.service",
            &(svc("org.a.Only", "/only") + "User=root\n"),
        );
        write(&d.svc1, "org.a.NoUser.service", &svc("org.a.NoUser", "/n"));
        write(
            &d.svc1,
            "org.a.Ghost.service",
            &(svc("org.a.Ghost", "/g") + "User=busvisor-no-such-user\n"),
        );
        write(&d.toml1, "t.toml", &tml("org.a.Toml", "/t"));
        let (cat, warnings) = Catalog::scan(
            std::slice::from_ref(&d.toml1),
            &[ServiceDirSpec::new(&d.svc1), ServiceDirSpec::new(&d.svc2)],
            system(),
        );
        assert_eq!(cat.lookup("org.a.X").unwrap().argv, Ok(v(&["/right"])));
        // A name only a misnamed file provides is activatable, as in
        // dbus-daemon; starting it is refused (system.rs).
        assert_eq!(cat.lookup("org.a.Only").unwrap().argv, Ok(v(&["/only"])));
        assert!(cat.lookup("org.a.Ghost").unwrap().unknown_user);
        assert!(!cat.lookup("org.a.X").unwrap().unknown_user);
        assert!(cat.lookup("org.a.NoUser").is_some());
        let has = |needle: &str| warnings.iter().filter(|w| w.contains(needle)).count();
        assert_eq!(
            has("aaa.service\" should have been named \"org.a.X.service\""),
            1
        );
        assert_eq!(
            has("bbb.service\" should have been named \"org.a.Only.service\""),
            1
        );
        assert_eq!(has("org.a.X is already provided by"), 1);
        assert_eq!(
            has("no User=: system bus activation of org.a.NoUser will fail"),
            1
        );
        assert_eq!(has("user busvisor-no-such-user does not exist"), 1);
        assert_eq!(
            has("no `user`: system bus activation of org.a.Toml will fail"),
            1
        );
        assert_eq!(warnings.len(), 6, "{warnings:#?}");
    }

    #[test]
    fn system_scan_of_this_machines_system_services() {
        let dir = Path::new("/usr/share/dbus-1/system-services");
        if !dir.is_dir() || !as_root() {
            return;
        }
        let (cat, warnings) = Catalog::scan(&[], &[ServiceDirSpec::new(dir)], system());
        // Every file loads; the only things said are systemd's services
        // (Exec=/bin/false), each on one line naming its file and unit.
        assert!(!cat.is_empty());
        for w in &warnings {
            assert!(w.contains("needs systemd (unit "), "{w}");
        }
        let with_systemd = Some(SystemScan {
            systemd_activation: true,
        });
        let (again, warnings) = Catalog::scan(&[], &[ServiceDirSpec::new(dir)], with_systemd);
        assert!(warnings.is_empty(), "{warnings:#?}");
        assert_eq!(again.len(), cat.len());
    }
}
