//! Bus configuration for busvisor.
//!
//! Two configuration formats are understood:
//!
//! * dbus-daemon's XML `busconfig` format ([`load_xml`], [`parse_xml`]), so
//!   that `busvisor --config-file=/usr/share/dbus-1/session.conf` is a
//!   drop-in replacement for `dbus-daemon --session`;
//! * busvisor's own TOML format ([`load_toml`], [`parse_toml`]).
//!
//! Both produce a [`BusConfig`]. Settings that are accepted for compatibility
//! but not acted upon by busvisor are listed in [`BusConfig::warnings`], which
//! the caller should log at start-up.
//!
//! ## Limits
//!
//! [`Limits::default()`] is the set of limits the stock session bus runs with:
//! the values of dbus-daemon 1.14's `session.conf`, plus dbus-daemon's
//! built-in defaults for the two limits `session.conf` does not set
//! (`max_message_unix_fds`, `reply_timeout`). This is also the starting point
//! for TOML configurations.
//!
//! XML configurations start from [`Limits::DBUS_DAEMON_BUILTIN`] instead,
//! exactly like dbus-daemon, so a custom `--config-file` without `<limit>`
//! elements gets the same (conservative) limits it would get from
//! dbus-daemon. Loading `session.conf` yields [`Limits::default()`].

pub mod address;
pub mod busvisor_toml;
pub mod xml;

#[cfg(test)]
mod dbus_corpus_tests;

use std::fmt;
use std::path::{Path, PathBuf};

pub(crate) use busvisor_toml::load_toml;
pub(crate) use xml::{load_xml, parse_xml_with_env};

/// busvisor's embedded default configuration (the equivalent of
/// dbus-daemon's `session.conf`).
pub const SESSION_CONF: &str = include_str!("session.conf");

/// Pseudo-path used as the origin of the embedded [`SESSION_CONF`].
pub const SESSION_CONF_ORIGIN: &str = "<busvisor built-in session.conf>";

/// busvisor's embedded system bus configuration (the equivalent of
/// Debian 12's `/usr/share/dbus-1/system.conf`), for systems without one.
pub const SYSTEM_CONF: &str = include_str!("system.conf");

/// Pseudo-path used as the origin of the embedded [`SYSTEM_CONF`].
pub const SYSTEM_CONF_ORIGIN: &str = "<busvisor built-in system.conf>";

/// Where `dbus-daemon --system` finds its configuration: the compiled-in
/// path of current packages, then the one of older installations.
pub const SYSTEM_CONF_PATHS: [&str; 2] =
    ["/usr/share/dbus-1/system.conf", "/etc/dbus-1/system.conf"];

/// Error loading or parsing a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file (or an included file or directory) could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not well-formed XML.
    #[error("{}: XML syntax error: {message}", location(path, *line, *position))]
    Syntax {
        path: PathBuf,
        /// 1-based line of the error, where known.
        line: Option<u64>,
        /// Byte offset of the error in the file, where known.
        position: Option<u64>,
        message: String,
    },
    /// The file is well-formed but not a valid configuration (unknown
    /// element, bad attribute, bad limit value, ...).
    #[error("{}: {message}", location(path, *line, None))]
    Invalid {
        path: PathBuf,
        line: Option<u64>,
        message: String,
    },
    /// A file includes itself, directly or indirectly.
    #[error("{}: circular inclusion of {}", location(path, *line, None), included.display())]
    IncludeLoop {
        path: PathBuf,
        line: Option<u64>,
        included: PathBuf,
    },
    /// TOML syntax error, unknown key or wrong type. `message` is toml's own
    /// rendering, which names the line, column and key.
    #[error("{}: {message}", location(path, *line, None))]
    Toml {
        path: PathBuf,
        line: Option<u64>,
        message: String,
    },
}

impl ConfigError {
    /// The file the error was found in.
    pub fn path(&self) -> &Path {
        match self {
            ConfigError::Io { path, .. }
            | ConfigError::Syntax { path, .. }
            | ConfigError::Invalid { path, .. }
            | ConfigError::IncludeLoop { path, .. }
            | ConfigError::Toml { path, .. } => path,
        }
    }

    /// The 1-based line number of the error, where known.
    pub fn line(&self) -> Option<u64> {
        match self {
            ConfigError::Io { .. } => None,
            ConfigError::Syntax { line, .. }
            | ConfigError::Invalid { line, .. }
            | ConfigError::IncludeLoop { line, .. }
            | ConfigError::Toml { line, .. } => *line,
        }
    }
}

fn location(path: &Path, line: Option<u64>, position: Option<u64>) -> String {
    let mut s = path.display().to_string();
    if let Some(line) = line {
        s.push_str(&format!(":{line}"));
    }
    if let Some(pos) = position {
        s.push_str(&format!(" (byte {pos})"));
    }
    s
}

/// The complete bus configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusConfig {
    /// `<type>`; the last one wins. Defaults to `"session"`.
    pub bus_type: String,
    /// `<listen>` addresses in order, as raw D-Bus address strings
    /// (see [`address::parse_listen`]).
    pub listen: Vec<String>,
    /// `<auth>` mechanisms in order; empty means "all supported" (EXTERNAL).
    pub auth: Vec<String>,
    /// Service directories in search order, standard directories expanded in
    /// place, duplicates dropped (first occurrence wins).
    pub servicedirs: Vec<ServiceDir>,
    pub limits: Limits,
    /// Every `<policy>` rule, by context, in file order (included files
    /// where their `<include>` stands), as dbus-daemon parses them. Empty
    /// (everything denied, in dbus-daemon's terms) when the XML has no
    /// policy; [`crate::policy::Policy::allow_all`] for TOML configurations.
    pub(crate) policy_rules: crate::policy::Policy,
    /// `<fork/>`
    pub fork: bool,
    /// `<pidfile>`; the last one wins.
    pub pidfile: Option<PathBuf>,
    /// `<keep_umask/>`
    pub keep_umask: bool,
    /// `<syslog/>`
    pub syslog: bool,
    /// `<user>` (busvisor never changes user; a warning is recorded).
    pub user: Option<String>,
    /// `<servicehelper>` (not used by busvisor; a warning is recorded).
    pub servicehelper: Option<PathBuf>,
    /// `<allow_anonymous/>` (ANONYMOUS auth is not supported; a warning is
    /// recorded).
    pub allow_anonymous: bool,
    /// `<apparmor mode="...">` — parsed and ignored, for drop-in
    /// compatibility.
    pub apparmor: Option<String>,
    /// `<selinux>` present — parsed and ignored, for drop-in compatibility.
    pub selinux: bool,
    /// Things accepted but not enforced, to log at start.
    pub warnings: Vec<String>,
    /// Every configuration file read, in the order read (for reload).
    pub source_files: Vec<PathBuf>,
    /// Every `<includedir>` directory that existed and was read (to watch for
    /// new files, for reload).
    pub include_dirs: Vec<PathBuf>,
}

impl BusConfig {
    /// A configuration with nothing configured: what `<busconfig/>` yields.
    /// Limits are dbus-daemon's built-in defaults.
    pub fn empty() -> Self {
        BusConfig {
            bus_type: "session".to_owned(),
            listen: Vec::new(),
            auth: Vec::new(),
            servicedirs: Vec::new(),
            limits: Limits::DBUS_DAEMON_BUILTIN,
            policy_rules: crate::policy::Policy::default(),
            fork: false,
            pidfile: None,
            keep_umask: false,
            syslog: false,
            user: None,
            servicehelper: None,
            allow_anonymous: false,
            apparmor: None,
            selinux: false,
            warnings: Vec::new(),
            source_files: Vec::new(),
            include_dirs: Vec::new(),
        }
    }

    /// Append a service directory unless the same path is already listed
    /// (dbus-daemon drops duplicates; the first occurrence wins).
    pub fn add_servicedir(&mut self, dir: ServiceDir) {
        if !self.servicedirs.iter().any(|d| d.path == dir.path) {
            self.servicedirs.push(dir);
        }
    }

    /// `<type>system</type>`: the system bus's rules apply (EXTERNAL
    /// authentication only, `User=` and file naming for service
    /// definitions, definitions only from root-owned files, no
    /// UpdateActivationEnvironment), whether the file came from `--system`
    /// or `--config-file`.
    pub fn is_system(&self) -> bool {
        self.bus_type == "system"
    }

    /// The effective authentication mechanisms: [`BusConfig::auth`], or
    /// `["EXTERNAL"]` when no `<auth>` was given.
    pub fn auth_mechanisms(&self) -> Vec<String> {
        if self.auth.is_empty() {
            vec!["EXTERNAL".to_owned()]
        } else {
            self.auth.clone()
        }
    }
}

/// A directory searched for `.service` files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceDir {
    pub path: PathBuf,
    /// Service files must be named after the bus name they provide (true for
    /// `$XDG_RUNTIME_DIR/dbus-1/services`).
    pub strict_naming: bool,
    /// Watch the directory with inotify (false for the runtime directory,
    /// which is managed by systemd's generators).
    pub watch: bool,
}

impl ServiceDir {
    /// An ordinary, watched, non-strict service directory.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        ServiceDir {
            path: path.into(),
            strict_naming: false,
            watch: true,
        }
    }
}

/// Value of [`Limits::reply_timeout_ms`] meaning "method calls never time
/// out" (dbus-daemon's built-in default, `-1` in bus/config-parser.c).
pub const REPLY_TIMEOUT_NEVER: u64 = u64::MAX;

/// Every limit dbus-daemon understands as `<limit name="...">`.
///
/// Field names are the dbus-daemon limit names, with `_ms` appended to the
/// timeouts (`service_start_timeout` → `service_start_timeout_ms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_incoming_bytes: u64,
    pub max_incoming_unix_fds: u64,
    pub max_outgoing_bytes: u64,
    pub max_outgoing_unix_fds: u64,
    pub max_message_size: u64,
    pub max_message_unix_fds: u64,
    pub service_start_timeout_ms: u64,
    pub auth_timeout_ms: u64,
    pub pending_fd_timeout_ms: u64,
    pub max_completed_connections: u64,
    pub max_incomplete_connections: u64,
    pub max_connections_per_user: u64,
    pub max_pending_service_starts: u64,
    pub max_names_per_connection: u64,
    pub max_match_rules_per_connection: u64,
    pub max_replies_per_connection: u64,
    /// [`REPLY_TIMEOUT_NEVER`] means no timeout.
    pub reply_timeout_ms: u64,
}

/// Result of [`Limits::set`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitSet {
    /// A limit busvisor knows; the value was stored.
    Set,
    /// A limit dbus-daemon 1.14 knows but busvisor has no use for (the
    /// experimental app-container limits); the value was ignored.
    Ignored,
    /// No such limit.
    Unknown,
}

/// dbus-daemon's `DBUS_DEFAULT_MESSAGE_UNIX_FDS` on Linux
/// (dbus/dbus-sysdeps.h), also stated in the comments of Debian's
/// /usr/share/dbus-1/system.conf (`max_message_unix_fds` 16).
const DBUS_DEFAULT_MESSAGE_UNIX_FDS: u64 = 16;
const ONE_MEGABYTE: u64 = 1024 * 1024;

/// The limits dbus-daemon parses as C `int` (bus/config-parser.c
/// `set_limit()`, `must_be_int`): values above `i32::MAX` are rejected.
const INT_LIMITS: &[&str] = &[
    "service_start_timeout",
    "auth_timeout",
    "pending_fd_timeout",
    "reply_timeout",
    "max_completed_connections",
    "max_incomplete_connections",
    "max_connections_per_user",
    "max_pending_service_starts",
    "max_names_per_connection",
    "max_match_rules_per_connection",
    "max_replies_per_connection",
    "max_containers",
    "max_containers_per_user",
    "max_container_metadata_bytes",
    "max_connections_per_container",
];

/// Limits dbus-daemon 1.14 accepts that busvisor ignores.
const IGNORED_LIMITS: &[&str] = &[
    "max_containers",
    "max_containers_per_user",
    "max_container_metadata_bytes",
    "max_connections_per_container",
];

impl Limits {
    /// dbus-daemon 1.14's built-in defaults, used when a configuration file
    /// sets no `<limit>`. Source: `bus_config_parser_new()` in
    /// bus/config-parser.c (dbus 1.14), cross-checked against the commented
    /// defaults in Debian's /usr/share/dbus-1/system.conf (dbus
    /// 1.14.10-1~deb12u1).
    pub const DBUS_DAEMON_BUILTIN: Limits = Limits {
        // config-parser.c: _DBUS_ONE_MEGABYTE * 127; system.conf comment:
        // 133169152 bytes = 127 MiB.
        max_incoming_bytes: 127 * ONE_MEGABYTE,
        // config-parser.c: DBUS_DEFAULT_MESSAGE_UNIX_FDS*4; system.conf: 64.
        max_incoming_unix_fds: DBUS_DEFAULT_MESSAGE_UNIX_FDS * 4,
        // config-parser.c: _DBUS_ONE_MEGABYTE * 127; system.conf: 133169152.
        max_outgoing_bytes: 127 * ONE_MEGABYTE,
        // config-parser.c: DBUS_DEFAULT_MESSAGE_UNIX_FDS*4; system.conf: 64.
        max_outgoing_unix_fds: DBUS_DEFAULT_MESSAGE_UNIX_FDS * 4,
        // config-parser.c: _DBUS_ONE_MEGABYTE * 32; system.conf: 33554432.
        max_message_size: 32 * ONE_MEGABYTE,
        // config-parser.c: DBUS_DEFAULT_MESSAGE_UNIX_FDS; system.conf: 16.
        max_message_unix_fds: DBUS_DEFAULT_MESSAGE_UNIX_FDS,
        // config-parser.c: activation_timeout = 25000; system.conf: 25000.
        service_start_timeout_ms: 25_000,
        // config-parser.c: auth_timeout = 30000 ("30 seconds"). Debian's
        // system.conf comment still says 5000, which is stale: dbus-daemon
        // 1.14.10 on this machine, run with a config without this limit,
        // logged "auth_timeout=30000ms" when closing an unauthenticated
        // connection after 30 s.
        auth_timeout_ms: 30_000,
        // config-parser.c: 150000 ("2.5 minutes"); system.conf: 150000.
        pending_fd_timeout_ms: 150_000,
        // config-parser.c / system.conf: 2048.
        max_completed_connections: 2048,
        // config-parser.c / system.conf: 64.
        max_incomplete_connections: 64,
        // config-parser.c / system.conf: 256.
        max_connections_per_user: 256,
        // config-parser.c max_pending_activations / system.conf: 512.
        max_pending_service_starts: 512,
        // config-parser.c max_services_per_connection / system.conf: 512.
        max_names_per_connection: 512,
        // config-parser.c / system.conf: 512.
        max_match_rules_per_connection: 512,
        // config-parser.c / system.conf: 128.
        max_replies_per_connection: 128,
        // config-parser.c: reply_timeout = -1 ("never"); not mentioned in
        // system.conf.
        reply_timeout_ms: REPLY_TIMEOUT_NEVER,
    };

    /// The limits of dbus-daemon 1.14's session bus: every value set by
    /// Debian's /usr/share/dbus-1/session.conf (dbus-session-bus-common
    /// 1.14.10-1~deb12u1), plus the built-in defaults for the two limits it
    /// leaves alone. This is [`Limits::default()`].
    pub const SESSION_CONF: Limits = Limits {
        // session.conf: "the memory limits are 1G instead of say 4G because
        // they can't exceed 32-bit signed int max".
        max_incoming_bytes: 1_000_000_000,  // session.conf
        max_incoming_unix_fds: 250_000_000, // session.conf
        max_outgoing_bytes: 1_000_000_000,  // session.conf
        max_outgoing_unix_fds: 250_000_000, // session.conf
        max_message_size: 1_000_000_000,    // session.conf
        // session.conf: "We do not override max_message_unix_fds here since
        // the in-kernel limit is also relatively low" -> built-in default.
        max_message_unix_fds: DBUS_DEFAULT_MESSAGE_UNIX_FDS,
        service_start_timeout_ms: 120_000,      // session.conf
        auth_timeout_ms: 240_000,               // session.conf
        pending_fd_timeout_ms: 150_000,         // session.conf
        max_completed_connections: 100_000,     // session.conf
        max_incomplete_connections: 10_000,     // session.conf
        max_connections_per_user: 100_000,      // session.conf
        max_pending_service_starts: 10_000,     // session.conf
        max_names_per_connection: 50_000,       // session.conf
        max_match_rules_per_connection: 50_000, // session.conf
        max_replies_per_connection: 50_000,     // session.conf
        // Not set by session.conf -> built-in default (never).
        reply_timeout_ms: REPLY_TIMEOUT_NEVER,
    };

    /// Set a limit by its dbus-daemon name (`"service_start_timeout"`, not
    /// `"service_start_timeout_ms"`).
    ///
    /// Errors (as a message) when the value is out of the range dbus-daemon
    /// accepts for that limit.
    pub fn set(&mut self, name: &str, value: u64) -> Result<LimitSet, String> {
        let max = if INT_LIMITS.contains(&name) {
            i32::MAX as u64
        } else {
            i64::MAX as u64
        };
        let slot = match name {
            "max_incoming_bytes" => &mut self.max_incoming_bytes,
            "max_incoming_unix_fds" => &mut self.max_incoming_unix_fds,
            "max_outgoing_bytes" => &mut self.max_outgoing_bytes,
            "max_outgoing_unix_fds" => &mut self.max_outgoing_unix_fds,
            "max_message_size" => &mut self.max_message_size,
            "max_message_unix_fds" => &mut self.max_message_unix_fds,
            "service_start_timeout" => &mut self.service_start_timeout_ms,
            "auth_timeout" => &mut self.auth_timeout_ms,
            "pending_fd_timeout" => &mut self.pending_fd_timeout_ms,
            "max_completed_connections" => &mut self.max_completed_connections,
            "max_incomplete_connections" => &mut self.max_incomplete_connections,
            "max_connections_per_user" => &mut self.max_connections_per_user,
            "max_pending_service_starts" => &mut self.max_pending_service_starts,
            "max_names_per_connection" => &mut self.max_names_per_connection,
            "max_match_rules_per_connection" => &mut self.max_match_rules_per_connection,
            "max_replies_per_connection" => &mut self.max_replies_per_connection,
            "reply_timeout" => &mut self.reply_timeout_ms,
            _ if IGNORED_LIMITS.contains(&name) => {
                return if value > max {
                    Err(format!("<limit name=\"{name}\"> value is too large"))
                } else {
                    Ok(LimitSet::Ignored)
                };
            }
            _ => return Ok(LimitSet::Unknown),
        };
        if value > max {
            return Err(format!(
                "<limit name=\"{name}\"> value {value} is too large (maximum {max})"
            ));
        }
        *slot = value;
        Ok(LimitSet::Set)
    }

    /// The reply timeout, or `None` when method calls never time out.
    pub fn reply_timeout(&self) -> Option<std::time::Duration> {
        if self.reply_timeout_ms == REPLY_TIMEOUT_NEVER {
            None
        } else {
            Some(std::time::Duration::from_millis(self.reply_timeout_ms))
        }
    }
}

impl Default for Limits {
    /// [`Limits::SESSION_CONF`].
    fn default() -> Self {
        Limits::SESSION_CONF
    }
}

/// The standard session service directories, in search order, as
/// dbus-daemon 1.14 expands `<standard_session_servicedirs/>`:
///
/// 1. `$XDG_RUNTIME_DIR/dbus-1/services` (strict naming, not watched; only if
///    `XDG_RUNTIME_DIR` is set);
/// 2. `$XDG_DATA_HOME/dbus-1/services`, `XDG_DATA_HOME` defaulting to
///    `$HOME/.local/share` (skipped if neither is set);
/// 3. `DIR/dbus-1/services` for each `DIR` in `XDG_DATA_DIRS`, defaulting to
///    `/usr/local/share:/usr/share`;
/// 4. `/usr/share/dbus-1/services`.
///
/// Empty and relative values are ignored, as the XDG Base Directory
/// specification requires. Duplicates are dropped (first wins).
pub fn standard_session_servicedirs(env: &dyn Fn(&str) -> Option<String>) -> Vec<ServiceDir> {
    let abs = |name: &str| {
        env(name)
            .filter(|v| !v.is_empty() && Path::new(v).is_absolute())
            .map(PathBuf::from)
    };
    let mut out: Vec<ServiceDir> = Vec::new();
    let mut push = |dir: ServiceDir| {
        if !out.iter().any(|d| d.path == dir.path) {
            out.push(dir);
        }
    };
    if let Some(runtime) = abs("XDG_RUNTIME_DIR") {
        push(ServiceDir {
            path: runtime.join("dbus-1/services"),
            strict_naming: true,
            watch: false,
        });
    }
    let data_home = abs("XDG_DATA_HOME").or_else(|| abs("HOME").map(|h| h.join(".local/share")));
    if let Some(data_home) = data_home {
        push(ServiceDir::new(data_home.join("dbus-1/services")));
    }
    let data_dirs = env("XDG_DATA_DIRS")
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "/usr/local/share:/usr/share".to_owned());
    for dir in data_dirs.split(':') {
        if !dir.is_empty() && Path::new(dir).is_absolute() {
            push(ServiceDir::new(Path::new(dir).join("dbus-1/services")));
        }
    }
    push(ServiceDir::new("/usr/share/dbus-1/services"));
    out
}

/// The standard system service directories, as dbus-daemon expands
/// `<standard_system_servicedirs/>`.
pub fn standard_system_servicedirs() -> Vec<ServiceDir> {
    [
        "/usr/local/share/dbus-1/system-services",
        "/usr/share/dbus-1/system-services",
        "/lib/dbus-1/system-services",
    ]
    .into_iter()
    .map(ServiceDir::new)
    .collect()
}

/// The process environment, as the `env` argument of the `*_with_env`
/// functions expects it. Variables that are not valid UTF-8 count as unset.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// busvisor's default configuration: the embedded [`SESSION_CONF`], with
/// standard session service directories taken from the process environment.
pub fn session_default() -> BusConfig {
    session_default_with_env(&process_env)
}

/// [`session_default`] with an explicit environment.
pub fn session_default_with_env(env: &dyn Fn(&str) -> Option<String>) -> BusConfig {
    match parse_xml_with_env(SESSION_CONF, Path::new(SESSION_CONF_ORIGIN), env) {
        Ok(cfg) => cfg,
        Err(e) => {
            // Cannot happen (the embedded file is tested), but never panic:
            // fall back to the same settings built by hand.
            tracing::error!("embedded session.conf failed to parse: {e}");
            let mut cfg = BusConfig::empty();
            cfg.listen.push("unix:tmpdir=/tmp".to_owned());
            cfg.auth.push("EXTERNAL".to_owned());
            cfg.keep_umask = true;
            cfg.limits = Limits::SESSION_CONF;
            cfg.policy_rules = crate::policy::Policy::allow_all();
            for d in standard_session_servicedirs(env) {
                cfg.add_servicedir(d);
            }
            cfg
        }
    }
}

/// The configuration file `--system` loads: the first of
/// [`SYSTEM_CONF_PATHS`] that exists; `None` means the embedded
/// [`SYSTEM_CONF`] ([`system_default`]).
pub fn system_config_file() -> Option<PathBuf> {
    SYSTEM_CONF_PATHS
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// The embedded [`SYSTEM_CONF`], for `--system` on a system without a
/// system.conf of its own. Its includes are read as any configuration's: a
/// system.d file that does not parse is skipped with a warning, a
/// system-local.conf that does not parse is an error.
pub fn system_default() -> Result<BusConfig, ConfigError> {
    parse_xml_with_env(SYSTEM_CONF, Path::new(SYSTEM_CONF_ORIGIN), &process_env)
}

impl fmt::Display for ServiceDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        if self.strict_naming {
            f.write_str(" (strict naming)")?;
        }
        if !self.watch {
            f.write_str(" (not watched)")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    pub(crate) fn fake_env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k: &str| map.get(k).cloned()
    }

    fn paths(dirs: &[ServiceDir]) -> Vec<String> {
        dirs.iter().map(|d| d.path.display().to_string()).collect()
    }

    #[test]
    fn standard_dirs_full_env() {
        let env = fake_env(&[
            ("XDG_RUNTIME_DIR", "/run/user/1000"),
            ("XDG_DATA_HOME", "/home/u/data"),
            ("HOME", "/home/u"),
            (
                "XDG_DATA_DIRS",
                "/opt/share:/usr/share:/var/lib/flatpak/exports/share",
            ),
        ]);
        let dirs = standard_session_servicedirs(&env);
        assert_eq!(
            paths(&dirs),
            [
                "/run/user/1000/dbus-1/services",
                "/home/u/data/dbus-1/services",
                "/opt/share/dbus-1/services",
                "/usr/share/dbus-1/services",
                "/var/lib/flatpak/exports/share/dbus-1/services",
            ]
        );
        assert!(dirs[0].strict_naming && !dirs[0].watch);
        assert!(dirs[1..].iter().all(|d| !d.strict_naming && d.watch));
    }

    #[test]
    fn standard_dirs_defaults() {
        let env = fake_env(&[("HOME", "/home/u")]);
        let dirs = standard_session_servicedirs(&env);
        assert_eq!(
            paths(&dirs),
            [
                "/home/u/.local/share/dbus-1/services",
                "/usr/local/share/dbus-1/services",
                "/usr/share/dbus-1/services",
            ]
        );
    }

    #[test]
    fn standard_dirs_ignore_empty_and_relative() {
        let env = fake_env(&[
            ("XDG_RUNTIME_DIR", ""),
            ("XDG_DATA_HOME", "relative"),
            ("XDG_DATA_DIRS", "::rel:/usr/share/:"),
        ]);
        let dirs = standard_session_servicedirs(&env);
        assert_eq!(
            paths(&dirs),
            ["/usr/share/dbus-1/services"],
            "trailing slash must not defeat duplicate detection"
        );
    }

    #[test]
    fn limits_set() {
        let mut l = Limits::DBUS_DAEMON_BUILTIN;
        assert_eq!(l.set("auth_timeout", 1234), Ok(LimitSet::Set));
        assert_eq!(l.auth_timeout_ms, 1234);
        assert_eq!(l.set("reply_timeout", 5), Ok(LimitSet::Set));
        assert_eq!(l.reply_timeout(), Some(std::time::Duration::from_millis(5)));
        assert_eq!(l.set("max_containers", 3), Ok(LimitSet::Ignored));
        assert_eq!(l.set("bogus", 3), Ok(LimitSet::Unknown));
        assert!(l.set("auth_timeout", 1 << 31).is_err());
        assert_eq!(l.set("max_message_size", 1 << 40), Ok(LimitSet::Set));
        assert_eq!(Limits::default(), Limits::SESSION_CONF);
        assert_eq!(Limits::DBUS_DAEMON_BUILTIN.max_incoming_bytes, 133_169_152);
        assert_eq!(Limits::DBUS_DAEMON_BUILTIN.max_message_size, 33_554_432);
        assert_eq!(Limits::default().reply_timeout(), None);
    }

    #[test]
    fn session_default_is_allow_all() {
        let env = fake_env(&[("HOME", "/h"), ("XDG_RUNTIME_DIR", "/run/user/7")]);
        let cfg = session_default_with_env(&env);
        assert_eq!(cfg.bus_type, "session");
        assert_eq!(cfg.listen, ["unix:tmpdir=/tmp"]);
        assert_eq!(cfg.auth, ["EXTERNAL"]);
        assert!(cfg.keep_umask);
        assert!(!cfg.fork);
        assert_eq!(cfg.limits, Limits::SESSION_CONF);
        assert_eq!(cfg.policy_rules, crate::policy::Policy::allow_all());
        assert!(cfg.warnings.is_empty(), "{:?}", cfg.warnings);
        assert!(cfg.source_files.is_empty());
        assert_eq!(cfg.servicedirs, standard_session_servicedirs(&env));
        // The real-environment variant parses too.
        assert_eq!(
            session_default().policy_rules,
            crate::policy::Policy::allow_all()
        );
    }

    /// A configuration's text without its includes, to compare the files
    /// themselves whatever this machine's system.d holds.
    fn without_includes(text: &str) -> String {
        text.lines()
            .filter(|l| !l.contains("<include") && !l.contains("<servicehelper>"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn embedded_system_conf() {
        let cfg = parse_xml_with_env(
            &without_includes(SYSTEM_CONF),
            Path::new(SYSTEM_CONF_ORIGIN),
            &fake_env(&[]),
        )
        .unwrap();
        assert!(cfg.is_system());
        assert_eq!(cfg.listen, ["unix:path=/run/dbus/system_bus_socket"]);
        assert_eq!(cfg.auth_mechanisms(), ["EXTERNAL"]);
        assert_eq!(cfg.user.as_deref(), Some("messagebus"));
        assert!(cfg.syslog && cfg.fork && !cfg.keep_umask);
        assert_eq!(cfg.pidfile, Some(PathBuf::from("/run/dbus/pid")));
        assert_eq!(cfg.limits, Limits::DBUS_DAEMON_BUILTIN);
        assert_eq!(cfg.servicedirs, standard_system_servicedirs());
        assert_eq!(cfg.servicehelper, None);
        // The whole file, includes and all, parses too.
        let full = system_default().unwrap();
        assert!(full.is_system());
        assert!(
            full.include_dirs
                .iter()
                .all(|d| d.is_absolute() && d.ends_with("system.d"))
        );
        assert!(!session_default().is_system());
    }

    #[test]
    fn embedded_system_conf_matches_debian() {
        let Ok(debian) = std::fs::read_to_string(SYSTEM_CONF_PATHS[0]) else {
            eprintln!("{} not installed; skipped", SYSTEM_CONF_PATHS[0]);
            return;
        };
        let parse = |text: &str| {
            parse_xml_with_env(
                &without_includes(text),
                Path::new("/x/system.conf"),
                &fake_env(&[]),
            )
            .unwrap()
        };
        let (ours, theirs) = (parse(SYSTEM_CONF), parse(&debian));
        assert_eq!(ours.policy_rules, theirs.policy_rules);
        assert_eq!(ours.limits, theirs.limits);
        assert_eq!(ours.listen, theirs.listen);
        assert_eq!(ours.auth, theirs.auth);
        assert_eq!(ours.servicedirs, theirs.servicedirs);
        assert_eq!(ours.bus_type, theirs.bus_type);
        assert_eq!(ours.user, theirs.user);
        assert_eq!(
            (ours.syslog, ours.fork, &ours.pidfile),
            (theirs.syslog, theirs.fork, &theirs.pidfile)
        );
    }

    /// The distribution's system.conf as `--system` loads it: its system.d
    /// files included, the standard system service directories.
    #[test]
    fn real_system_conf_includes_system_d() {
        let Some(path) = system_config_file() else {
            eprintln!("no system.conf installed; skipped");
            return;
        };
        let cfg = load_xml(&path).unwrap();
        assert!(cfg.is_system());
        assert_eq!(cfg.listen, ["unix:path=/run/dbus/system_bus_socket"]);
        assert_eq!(cfg.servicedirs, standard_system_servicedirs());
        for dir in ["/usr/share/dbus-1/system.d", "/etc/dbus-1/system.d"] {
            let dir = Path::new(dir);
            if !dir.is_dir() {
                continue;
            }
            assert!(cfg.include_dirs.iter().any(|d| d == dir), "{dir:?}");
            let confs = std::fs::read_dir(dir)
                .unwrap()
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "conf"));
            for conf in confs {
                assert!(
                    cfg.source_files.contains(&conf)
                        || cfg
                            .warnings
                            .iter()
                            .any(|w| w.contains(&*conf.to_string_lossy())),
                    "{} neither read nor reported",
                    conf.display()
                );
            }
        }
        if cfg.source_files.len() > 1 {
            let text = std::fs::read_to_string(&path).unwrap();
            let bare = parse_xml_with_env(&without_includes(&text), &path, &fake_env(&[])).unwrap();
            assert_ne!(cfg.policy_rules, bare.policy_rules, "system.d adds rules");
        }
    }

    #[test]
    fn error_display_has_location() {
        let e = ConfigError::Invalid {
            path: "/x.conf".into(),
            line: Some(3),
            message: "bad".into(),
        };
        assert_eq!(e.to_string(), "/x.conf:3: bad");
        assert_eq!(e.line(), Some(3));
        assert_eq!(e.path(), Path::new("/x.conf"));
    }
}
