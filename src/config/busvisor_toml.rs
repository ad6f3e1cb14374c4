//! busvisor's own TOML configuration (`--config FILE`).
//!
//! ```toml
//! type = "session"                     # default "session"
//! listen = ["unix:tmpdir=/tmp"]        # default ["unix:tmpdir=/tmp"]
//! auth = ["EXTERNAL"]                  # default [] = all supported (EXTERNAL)
//! servicedirs = ["/path"]              # searched before the standard dirs;
//!                                      # relative to the TOML file's directory
//! standard_session_servicedirs = true  # default true
//! fork = false
//! pidfile = "/run/user/1000/busvisor.pid"
//! keep_umask = false
//! syslog = false
//!
//! [limits]                             # omitted limits keep Limits::default()
//! max_message_size = 1000000000
//! service_start_timeout_ms = 120000    # dbus-daemon names are accepted too:
//! auth_timeout = 240000                # (= auth_timeout_ms)
//! ```
//!
//! Unknown keys and wrong types are errors naming the file, line and key.
//! There is no policy section: busvisor's own configuration is always
//! allow-all.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{
    BusConfig, ConfigError, LimitSet, Limits, ServiceDir, address, process_env,
    standard_session_servicedirs,
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TomlConfig {
    #[serde(rename = "type", default = "default_type")]
    bus_type: String,
    #[serde(default = "default_listen")]
    listen: Vec<String>,
    #[serde(default)]
    auth: Vec<String>,
    #[serde(default)]
    servicedirs: Vec<PathBuf>,
    #[serde(default = "default_true")]
    standard_session_servicedirs: bool,
    #[serde(default)]
    fork: bool,
    #[serde(default)]
    pidfile: Option<PathBuf>,
    #[serde(default)]
    keep_umask: bool,
    #[serde(default)]
    syslog: bool,
    #[serde(default)]
    limits: TomlLimits,
}

fn default_type() -> String {
    "session".to_owned()
}

fn default_listen() -> Vec<String> {
    vec!["unix:tmpdir=/tmp".to_owned()]
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TomlLimits {
    max_incoming_bytes: Option<u64>,
    max_incoming_unix_fds: Option<u64>,
    max_outgoing_bytes: Option<u64>,
    max_outgoing_unix_fds: Option<u64>,
    max_message_size: Option<u64>,
    max_message_unix_fds: Option<u64>,
    #[serde(alias = "service_start_timeout")]
    service_start_timeout_ms: Option<u64>,
    #[serde(alias = "auth_timeout")]
    auth_timeout_ms: Option<u64>,
    #[serde(alias = "pending_fd_timeout")]
    pending_fd_timeout_ms: Option<u64>,
    max_completed_connections: Option<u64>,
    max_incomplete_connections: Option<u64>,
    max_connections_per_user: Option<u64>,
    max_pending_service_starts: Option<u64>,
    max_names_per_connection: Option<u64>,
    max_match_rules_per_connection: Option<u64>,
    max_replies_per_connection: Option<u64>,
    #[serde(alias = "reply_timeout")]
    reply_timeout_ms: Option<u64>,
}

impl TomlLimits {
    /// (dbus-daemon limit name, value) for every limit given.
    fn given(&self) -> Vec<(&'static str, u64)> {
        [
            ("max_incoming_bytes", self.max_incoming_bytes),
            ("max_incoming_unix_fds", self.max_incoming_unix_fds),
            ("max_outgoing_bytes", self.max_outgoing_bytes),
            ("max_outgoing_unix_fds", self.max_outgoing_unix_fds),
            ("max_message_size", self.max_message_size),
            ("max_message_unix_fds", self.max_message_unix_fds),
            ("service_start_timeout", self.service_start_timeout_ms),
            ("auth_timeout", self.auth_timeout_ms),
            ("pending_fd_timeout", self.pending_fd_timeout_ms),
            ("max_completed_connections", self.max_completed_connections),
            (
                "max_incomplete_connections",
                self.max_incomplete_connections,
            ),
            ("max_connections_per_user", self.max_connections_per_user),
            (
                "max_pending_service_starts",
                self.max_pending_service_starts,
            ),
            ("max_names_per_connection", self.max_names_per_connection),
            (
                "max_match_rules_per_connection",
                self.max_match_rules_per_connection,
            ),
            (
                "max_replies_per_connection",
                self.max_replies_per_connection,
            ),
            ("reply_timeout", self.reply_timeout_ms),
        ]
        .into_iter()
        .filter_map(|(n, v)| v.map(|v| (n, v)))
        .collect()
    }
}

/// Load a busvisor TOML configuration file, using the process environment
/// for the standard session service directories.
pub fn load_toml(path: &Path) -> Result<BusConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut cfg = parse_toml_with_env(&text, path, &process_env)?;
    cfg.source_files.insert(0, path.to_path_buf());
    Ok(cfg)
}

/// [`parse_toml`] with an explicit environment.
pub fn parse_toml_with_env(
    text: &str,
    origin: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<BusConfig, ConfigError> {
    let parsed: TomlConfig = toml::from_str(text).map_err(|e| ConfigError::Toml {
        path: origin.to_path_buf(),
        line: e.span().map(|s| line_of(text, s.start)),
        message: e.to_string().trim_end().to_owned(),
    })?;
    let base_dir = origin.parent().unwrap_or(Path::new(""));

    let mut cfg = BusConfig::empty();
    cfg.limits = Limits::default();
    cfg.policy_rules = crate::policy::Policy::allow_all();
    cfg.bus_type = parsed.bus_type;
    cfg.fork = parsed.fork;
    cfg.pidfile = parsed.pidfile;
    cfg.keep_umask = parsed.keep_umask;
    cfg.syslog = parsed.syslog;

    for (name, value) in parsed.limits.given() {
        match cfg.limits.set(name, value) {
            Ok(LimitSet::Set) => {}
            Ok(LimitSet::Ignored | LimitSet::Unknown) => {
                // Cannot happen: every field is a known limit.
                return Err(ConfigError::Toml {
                    path: origin.to_path_buf(),
                    line: None,
                    message: format!("limits.{name}: not a limit"),
                });
            }
            Err(message) => {
                return Err(ConfigError::Toml {
                    path: origin.to_path_buf(),
                    line: None,
                    message: format!("[limits]: {message}"),
                });
            }
        }
    }

    for addr in parsed.listen {
        if let Err(e) = address::parse_listen(&addr) {
            return Err(ConfigError::Toml {
                path: origin.to_path_buf(),
                line: None,
                message: format!("listen: invalid address \"{addr}\": {e}"),
            });
        }
        cfg.listen.push(addr);
    }
    for mech in parsed.auth {
        if mech != "EXTERNAL" {
            cfg.warnings.push(format!(
                "auth mechanism \"{mech}\" in {} is not supported by busvisor",
                origin.display()
            ));
        }
        cfg.auth.push(mech);
    }
    for dir in parsed.servicedirs {
        let path = if dir.is_absolute() {
            dir
        } else {
            base_dir.join(dir)
        };
        cfg.add_servicedir(ServiceDir::new(path));
    }
    if parsed.standard_session_servicedirs {
        for d in standard_session_servicedirs(env) {
            cfg.add_servicedir(d);
        }
    }
    for w in &cfg.warnings {
        tracing::debug!("config: {w}");
    }
    Ok(cfg)
}

fn line_of(text: &str, pos: usize) -> u64 {
    let end = pos.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count() as u64
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::REPLY_TIMEOUT_NEVER;
    use crate::config::tests::fake_env;

    fn parse(text: &str) -> Result<BusConfig, ConfigError> {
        parse_toml_with_env(text, Path::new("/etc/busvisor/busvisor.toml"), &|_| None)
    }

    #[test]
    fn full_example() {
        let env = fake_env(&[("HOME", "/home/u")]);
        let cfg = parse_toml_with_env(
            r#"
type = "session"
listen = ["unix:tmpdir=/tmp", "unix:path=/run/x"]
auth = ["EXTERNAL"]
servicedirs = ["/path", "rel"]
standard_session_servicedirs = true
fork = true
pidfile = "/run/p"
keep_umask = true
syslog = true

[limits]
max_message_size = 1000
service_start_timeout_ms = 120
auth_timeout = 7
"#,
            Path::new("/etc/busvisor/busvisor.toml"),
            &env,
        )
        .unwrap();
        assert_eq!(cfg.bus_type, "session");
        assert_eq!(cfg.listen, ["unix:tmpdir=/tmp", "unix:path=/run/x"]);
        assert_eq!(cfg.auth, ["EXTERNAL"]);
        assert!(cfg.fork && cfg.keep_umask && cfg.syslog);
        assert_eq!(cfg.pidfile, Some(PathBuf::from("/run/p")));
        assert_eq!(cfg.limits.max_message_size, 1000);
        assert_eq!(cfg.limits.service_start_timeout_ms, 120);
        assert_eq!(cfg.limits.auth_timeout_ms, 7);
        assert_eq!(
            cfg.limits.max_names_per_connection,
            Limits::default().max_names_per_connection
        );
        assert_eq!(cfg.limits.reply_timeout_ms, REPLY_TIMEOUT_NEVER);
        let mut expected = vec![
            ServiceDir::new("/path"),
            ServiceDir::new("/etc/busvisor/rel"),
        ];
        expected.extend(standard_session_servicedirs(&env));
        assert_eq!(cfg.servicedirs, expected);
        assert_eq!(cfg.policy_rules, crate::policy::Policy::allow_all());
        assert!(cfg.warnings.is_empty());
    }

    #[test]
    fn defaults() {
        let cfg = parse("").unwrap();
        assert_eq!(cfg.bus_type, "session");
        assert_eq!(cfg.listen, ["unix:tmpdir=/tmp"]);
        assert!(cfg.auth.is_empty());
        assert_eq!(cfg.auth_mechanisms(), ["EXTERNAL"]);
        assert_eq!(cfg.limits, Limits::default());
        assert_eq!(cfg.servicedirs, standard_session_servicedirs(&|_| None));
        let cfg = parse("standard_session_servicedirs = false").unwrap();
        assert!(cfg.servicedirs.is_empty());
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let e = parse("type = \"session\"\n\nbogus_key = 1\n").unwrap_err();
        let s = e.to_string();
        assert!(s.contains("/etc/busvisor/busvisor.toml"), "{s}");
        assert!(s.contains("bogus_key"), "{s}");
        assert!(s.contains("line 3"), "{s}");
        assert_eq!(e.line(), Some(3));

        let e = parse("[limits]\nmax_message_size = \"big\"\n").unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("max_message_size") || s.contains("line 2"),
            "{s}"
        );
        assert_eq!(e.line(), Some(2));

        let e = parse("[limits]\nmax_bogus = 1\n").unwrap_err();
        assert!(e.to_string().contains("max_bogus"), "{e}");

        let e = parse("[limits]\nauth_timeout_ms = -1\n").unwrap_err();
        assert_eq!(e.line(), Some(2), "{e}");

        let e = parse("listen = \"unix:tmpdir=/tmp\"\n").unwrap_err();
        assert_eq!(e.line(), Some(1), "{e}");

        let e = parse("[limits]\nauth_timeout_ms = 3000000000\n").unwrap_err();
        assert!(e.to_string().contains("too large"), "{e}");

        let e = parse("listen = [\"unix:runtime=no\"]\n").unwrap_err();
        assert!(e.to_string().contains("runtime"), "{e}");

        assert!(parse("type = \n").is_err());
    }

    #[test]
    fn load_from_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b.toml");
        std::fs::write(&p, "auth = [\"DBUS_COOKIE_SHA1\"]\n").unwrap();
        let cfg = load_toml(&p).unwrap();
        assert_eq!(cfg.source_files, std::slice::from_ref(&p));
        assert_eq!(cfg.warnings.len(), 1);
        assert!(matches!(
            load_toml(&dir.path().join("missing.toml")),
            Err(ConfigError::Io { .. })
        ));
    }
}
