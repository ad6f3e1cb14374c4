//! The command line: busvisor's subcommands, plus dbus-daemon's flags so
//! that busvisor can stand wherever a dbus-daemon binary is expected.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "busvisor",
    version,
    about = "A D-Bus message bus (session or system) that starts services on demand and supervises them",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// dbus-daemon compatible flags, when no subcommand is given.
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the bus (the default when only dbus-daemon flags are given).
    Daemon(DaemonArgs),
    /// Start a private bus, run CMD on it, exit with CMD's status
    /// (like dbus-run-session).
    Run(RunArgs),
    /// Start a session bus in the background and print its address
    /// (like dbus-launch).
    Launch(crate::launch::LaunchArgs),
    /// Control commands: talk to a running busvisor over D-Bus.
    #[command(flatten)]
    Client(ClientCommand),
    /// Man pages, completions (hidden; see docs/PACKAGING.md).
    #[command(flatten)]
    Generate(crate::generate::GenerateCommand),
}

/// The control commands (`busvisor list`, `status`, ...): clients of the
/// `org.busvisor.Supervisor1` API of a running busvisor (docs/CLI.md);
/// `check` reads definition files without a bus.
#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// List services: id, state, main pid, bus names, reason.
    List(ListArgs),
    /// Show the state of services: summary, processes, last log lines.
    Status(StatusArgs),
    /// Show a service's properties as KEY=VALUE lines.
    Show(ShowArgs),
    /// Print a service's definition file.
    Cat(ServiceArgs),
    /// Start services; returns once each has taken its bus name.
    Start(ControlArgs),
    /// Stop every process of services; returns once none is left.
    Stop(ControlArgs),
    /// Stop, then start services; returns once they run again.
    Restart(ControlArgs),
    /// Exit 0 when every service named is running (prints each state).
    IsActive(StateArgs),
    /// Exit 0 when a service named has failed (prints each state).
    IsFailed(StateArgs),
    /// Send a signal to a service's processes, or to its main process.
    Kill(KillArgs),
    /// Let messages activate services again.
    Enable(EnableArgs),
    /// Stop messages from activating services (their files stay).
    Disable(EnableArgs),
    /// Forget the failure of services (all failed ones without NAME).
    ResetFailed(ResetFailedArgs),
    /// Print what a service wrote to stdout and stderr.
    Logs(LogsArgs),
    /// Follow lifecycle events live, one line per event.
    Events(EventsArgs),
    /// Re-read every service definition.
    Reload(ClientArgs),
    /// Check definition files without a bus.
    Check(CheckArgs),
}

/// Options common to every control command.
#[derive(Debug, Args, Clone, Default)]
pub struct ClientArgs {
    /// Address of the bus (default: $DBUS_SESSION_BUS_ADDRESS, else the
    /// user bus at $XDG_RUNTIME_DIR/bus).
    #[arg(long, value_name = "ADDRESS")]
    pub address: Option<String>,
    /// The system bus: $DBUS_SYSTEM_BUS_ADDRESS, else
    /// unix:path=/run/dbus/system_bus_socket.
    #[arg(long, conflicts_with = "address")]
    pub system: bool,
    /// Machine-readable JSON output (errors too).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args, Clone)]
pub struct ServiceArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Service id, or any bus name the service provides.
    #[arg(value_name = "NAME")]
    pub name: String,
}

#[derive(Debug, Args, Clone, Default)]
pub struct ListArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Only services whose id or a bus name matches one of these glob
    /// patterns (`*`, `?`, `[...]`).
    #[arg(value_name = "PATTERN")]
    pub patterns: Vec<String>,
    /// Only services in these states (comma-separated: running,failed,...).
    #[arg(long, value_name = "STATE", value_delimiter = ',')]
    pub state: Vec<String>,
    /// Every service, also the standard D-Bus services that are inactive.
    #[arg(short = 'a', long)]
    pub all: bool,
    /// Do not shorten columns to the terminal's width.
    #[arg(short = 'l', long)]
    pub full: bool,
    /// No header and no closing count line.
    #[arg(long)]
    pub no_legend: bool,
}

#[derive(Debug, Args, Clone)]
pub struct StatusArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Service ids or bus names.
    #[arg(value_name = "NAME", required = true)]
    pub names: Vec<String>,
    /// How many of the last log lines to show.
    #[arg(short = 'n', long = "lines", value_name = "N", default_value_t = 10)]
    pub lines: u32,
    /// Do not shorten lines to the terminal's width.
    #[arg(short = 'l', long)]
    pub full: bool,
}

#[derive(Debug, Args, Clone)]
pub struct ShowArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Service id, or any bus name the service provides.
    #[arg(value_name = "NAME")]
    pub name: String,
    /// Only these properties (repeatable, or comma-separated).
    #[arg(
        short = 'p',
        long = "property",
        value_name = "PROP",
        value_delimiter = ','
    )]
    pub property: Vec<String>,
    /// Print the values only, without `KEY=`.
    #[arg(long)]
    pub value: bool,
}

#[derive(Debug, Args, Clone)]
pub struct ControlArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Service ids or bus names.
    #[arg(value_name = "NAME", required = true)]
    pub names: Vec<String>,
    /// Do not wait for the operation to complete.
    #[arg(long)]
    pub no_block: bool,
}

#[derive(Debug, Args, Clone)]
pub struct StateArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Service ids or bus names.
    #[arg(value_name = "NAME", required = true)]
    pub names: Vec<String>,
    /// Print nothing: the exit status says it.
    #[arg(short = 'q', long)]
    pub quiet: bool,
}

#[derive(Debug, Args, Clone)]
pub struct KillArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Service id, or any bus name the service provides.
    #[arg(value_name = "NAME")]
    pub name: String,
    /// The signal: a name (TERM, SIGTERM) or a number.
    #[arg(
        short = 's',
        long = "signal",
        value_name = "SIG",
        default_value = "SIGTERM"
    )]
    pub signal: String,
    /// Only the main process (the one owning the bus name).
    #[arg(long)]
    pub main: bool,
}

#[derive(Debug, Args, Clone)]
pub struct EnableArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Service ids or bus names.
    #[arg(value_name = "NAME", required = true)]
    pub names: Vec<String>,
    /// Also start (enable) or stop (disable) them.
    #[arg(long)]
    pub now: bool,
}

#[derive(Debug, Args, Clone)]
pub struct ResetFailedArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Service ids or bus names (none: every failed service).
    #[arg(value_name = "NAME")]
    pub names: Vec<String>,
}

/// How `logs` prints a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum LogFormat {
    /// Local time with date and time zone, service[pid], stream, line.
    #[default]
    Short,
    /// The same with the time in RFC 3339.
    ShortIso,
    /// One JSON object per line (as --json).
    Json,
    /// The line only.
    Cat,
}

#[derive(Debug, Args, Clone)]
pub struct LogsArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Service id, or any bus name the service provides.
    #[arg(value_name = "NAME")]
    pub name: String,
    /// Print the last N lines (0: every line kept).
    #[arg(short = 'n', long = "lines", value_name = "N", default_value_t = 0)]
    pub lines: u32,
    /// Keep printing new lines as the service writes them.
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Only lines from this time on: `2025-01-31 12:00`, `12:00`, RFC 3339,
    /// `today`, `yesterday`, or a duration ago (`10min`, `-1h`, `5s ago`).
    #[arg(short = 'S', long, value_name = "TIME", allow_hyphen_values = true)]
    pub since: Option<String>,
    /// Output format.
    #[arg(
        short = 'o',
        long = "output",
        value_name = "FORMAT",
        default_value = "short"
    )]
    pub output: LogFormat,
}

#[derive(Debug, Args, Clone)]
pub struct EventsArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Also print the services' output lines (`LogLine`).
    #[arg(long)]
    pub logs: bool,
    /// Only events of this service (id or bus name).
    #[arg(long, value_name = "NAME")]
    pub service: Option<String>,
}

#[derive(Debug, Args, Clone)]
pub struct CheckArgs {
    /// Definition files or directories (default: busvisor's own
    /// `services.d` in the current directory, if any, and the session's
    /// standard service directories).
    #[arg(value_name = "FILE|DIR")]
    pub paths: Vec<PathBuf>,
    /// Check by the system bus's rules (root's files, `User=` required).
    #[arg(long)]
    pub system: bool,
    /// Machine-readable JSON output.
    #[arg(long)]
    pub json: bool,
}

/// The daemon's flags that clap cannot check alone (`daemon` and `run`
/// call this before starting): every `--services-dir` must be a directory
/// (a typo would otherwise leave the bus without its services, silently),
/// and `--log-level` a level (`error`, `warn`, `info`, `debug`, `trace`,
/// `off`) or a filter with targets (`busvisor=debug,zbus=warn`).
pub fn check_daemon_flags(
    services_dirs: &[PathBuf],
    log_level: Option<&str>,
) -> Result<(), String> {
    for d in services_dirs {
        match std::fs::metadata(d) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(format!("--services-dir {}: not a directory", d.display())),
            Err(e) => return Err(format!("--services-dir {}: {e}", d.display())),
        }
    }
    if let Some(level) = log_level {
        const LEVELS: [&str; 6] = ["error", "warn", "info", "debug", "trace", "off"];
        let known = LEVELS.iter().any(|l| l.eq_ignore_ascii_case(level));
        let filter = level.contains('=') || level.contains(',');
        let valid_filter = filter && tracing_subscriber::EnvFilter::try_new(level).is_ok();
        if !(known || valid_filter) {
            return Err(format!(
                "--log-level {level:?}: not a level (error, warn, info, debug, trace, off) nor a filter such as busvisor=debug"
            ));
        }
    }
    Ok(())
}

#[derive(Debug, Args, Clone, Default)]
pub struct DaemonArgs {
    /// Use the standard session bus configuration (the default).
    #[arg(long)]
    pub session: bool,
    /// Use the system bus configuration (the distribution's system.conf, or
    /// busvisor's built-in equivalent).
    #[arg(long, conflicts_with_all = ["session", "config_file", "config"])]
    pub system: bool,
    /// dbus-daemon XML configuration file.
    #[arg(long = "config-file", value_name = "FILE")]
    pub config_file: Option<PathBuf>,
    /// busvisor TOML configuration file.
    #[arg(long = "config", value_name = "FILE", conflicts_with = "config_file")]
    pub config: Option<PathBuf>,
    /// Listen address, overriding the configuration's <listen>.
    #[arg(long, value_name = "ADDRESS")]
    pub address: Option<String>,
    /// Print the bus address to stdout, or to file descriptor FD.
    #[arg(long = "print-address", value_name = "FD", num_args = 0..=1,
          require_equals = true, default_missing_value = "")]
    pub print_address: Option<String>,
    /// Print the bus pid to stdout, or to file descriptor FD.
    #[arg(long = "print-pid", value_name = "FD", num_args = 0..=1,
          require_equals = true, default_missing_value = "")]
    pub print_pid: Option<String>,
    /// Stay in the foreground (the default).
    #[arg(long)]
    pub nofork: bool,
    /// Detach into the background once the bus is ready.
    #[arg(long, overrides_with = "nofork")]
    pub fork: bool,
    /// Do not write a pid file (busvisor never writes one).
    #[arg(long)]
    pub nopidfile: bool,
    /// Hand services with `SystemdService=` to systemd, as dbus-daemon does.
    #[arg(long = "systemd-activation")]
    pub systemd_activation: bool,
    /// Log to the system log as well as to stderr.
    #[arg(long, overrides_with = "nosyslog")]
    pub syslog: bool,
    /// Log to stderr only, whatever the configuration's <syslog/> says.
    #[arg(long, overrides_with_all = ["syslog", "syslog_only"])]
    pub nosyslog: bool,
    /// Log to the system log only.
    #[arg(long = "syslog-only", overrides_with = "nosyslog")]
    pub syslog_only: bool,
    /// Print the bus's introspection XML and exit.
    #[arg(long)]
    pub introspect: bool,
    /// Directory of busvisor service definitions (*.toml); repeatable.
    #[arg(long = "services-dir", value_name = "DIR")]
    pub services_dir: Vec<PathBuf>,
    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(long = "log-level", value_name = "LEVEL")]
    pub log_level: Option<String>,
}

impl DaemonArgs {
    /// Whether these flags ask for a bus without the `daemon` subcommand:
    /// one of dbus-daemon's own flags (or busvisor's `--config`) is given.
    /// `--address`, `--services-dir` and `--log-level` alone do not: the
    /// first is also the control commands' flag, and a typo must not start
    /// a bus.
    pub fn starts_a_bus(&self) -> bool {
        self.session
            || self.system
            || self.config_file.is_some()
            || self.config.is_some()
            || self.print_address.is_some()
            || self.print_pid.is_some()
            || self.nofork
            || self.fork
            || self.nopidfile
            || self.systemd_activation
            || self.syslog
            || self.nosyslog
            || self.syslog_only
            || self.introspect
    }

    /// The XML configuration file to load: `--config-file`, or for
    /// `--system` the distribution's system.conf (None: the built-in one,
    /// or no XML file at all).
    pub fn config_file_to_load(&self) -> Option<PathBuf> {
        match &self.config_file {
            Some(f) => Some(f.clone()),
            None if self.system => crate::config::system_config_file(),
            None => None,
        }
    }

    /// `--syslog`, `--nosyslog` and `--syslog-only`, the last given
    /// winning as in dbus-daemon (clap keeps only the last of the pairs
    /// that override each other); `--syslog-only` with `--syslog` is
    /// `--syslog-only`, as there.
    pub fn syslog_flag(&self) -> Option<crate::logging::SyslogFlag> {
        use crate::logging::SyslogFlag;
        if self.syslog_only {
            Some(SyslogFlag::SyslogOnly)
        } else if self.syslog {
            Some(SyslogFlag::Syslog)
        } else if self.nosyslog {
            Some(SyslogFlag::NoSyslog)
        } else {
            None
        }
    }
}

#[derive(Debug, Args, Clone)]
pub struct RunArgs {
    /// dbus-daemon XML configuration file for the private bus.
    #[arg(long = "config-file", value_name = "FILE")]
    pub config_file: Option<PathBuf>,
    /// busvisor TOML configuration file for the private bus.
    #[arg(long = "config", value_name = "FILE", conflicts_with = "config_file")]
    pub config: Option<PathBuf>,
    /// Accepted for dbus-run-session compatibility; busvisor is the bus.
    #[arg(long = "dbus-daemon", value_name = "BINARY")]
    pub dbus_daemon: Option<PathBuf>,
    /// Directory of busvisor service definitions (*.toml); repeatable.
    #[arg(long = "services-dir", value_name = "DIR")]
    pub services_dir: Vec<PathBuf>,
    /// Log level (error, warn, info, debug, trace).
    #[arg(long = "log-level", value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// The command and its arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<OsString>,
}

/// dbus-daemon accepts `--print-address FD` with the FD as a separate word;
/// clap takes optional values only with `=`. Join such pairs first.
pub fn normalize_args(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let mut out: Vec<OsString> = Vec::new();
    let mut it = args.into_iter().peekable();
    let mut passthrough = false;
    while let Some(a) = it.next() {
        if passthrough {
            out.push(a);
            continue;
        }
        if a == "--" {
            passthrough = true;
            out.push(a);
            continue;
        }
        if (a == "--print-address" || a == "--print-pid")
            && let Some(next) = it.peek()
        {
            let n = next.to_string_lossy();
            if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) {
                let mut joined = a.clone();
                joined.push("=");
                joined.push(next);
                out.push(joined);
                it.next();
                continue;
            }
        }
        out.push(a);
    }
    hoist_client_options(out)
}

/// The control commands' names (see [`ClientCommand`]).
pub const CLIENT_COMMANDS: &[&str] = &[
    "list",
    "status",
    "show",
    "cat",
    "start",
    "stop",
    "restart",
    "is-active",
    "is-failed",
    "kill",
    "enable",
    "disable",
    "reset-failed",
    "logs",
    "events",
    "reload",
    "check",
];

/// `busvisor --address=A list` means `busvisor list --address=A`: move
/// `--address`, `--json` and `--system` given before a control command after
/// it (at the top level they are the daemon's: its listen address, its
/// system configuration).
pub fn hoist_client_options(args: Vec<OsString>) -> Vec<OsString> {
    let mut i = 1;
    while i < args.len() {
        let a = args[i].to_string_lossy();
        if a == "--address" && i + 1 < args.len() {
            i += 2;
        } else if a.starts_with("--address=") || a == "--json" || a == "--system" {
            i += 1;
        } else {
            break;
        }
    }
    if i == 1 || i >= args.len() || !CLIENT_COMMANDS.contains(&&*args[i].to_string_lossy()) {
        return args;
    }
    let mut out = Vec::with_capacity(args.len());
    out.push(args[0].clone());
    out.push(args[i].clone());
    out.extend_from_slice(&args[1..i]);
    out.extend_from_slice(&args[i + 1..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(normalize_args(args.iter().map(OsString::from))).unwrap()
    }

    #[test]
    fn system_before_a_control_command_is_the_commands() {
        let c = parse(&["busvisor", "--system", "status", "org.x"]);
        let Some(Command::Client(ClientCommand::Status(a))) = c.command else {
            panic!("{c:?}");
        };
        assert!(a.client.system && a.names == ["org.x"]);
        assert!(parse(&["busvisor", "--system", "--nofork"]).daemon.system);
    }

    #[test]
    fn dbus_daemon_flags() {
        let c = parse(&[
            "busvisor",
            "--nofork",
            "--print-address",
            "5",
            "--config-file",
            "/x.conf",
        ]);
        assert!(c.command.is_none());
        assert_eq!(c.daemon.print_address.as_deref(), Some("5"));
        assert_eq!(c.daemon.config_file, Some(PathBuf::from("/x.conf")));
        let c = parse(&[
            "busvisor",
            "--print-address=7",
            "--config-file=/y",
            "--print-pid",
        ]);
        assert_eq!(c.daemon.print_address.as_deref(), Some("7"));
        assert_eq!(c.daemon.print_pid.as_deref(), Some(""));
        let c = parse(&["busvisor", "--session", "--print-address", "--nofork"]);
        assert_eq!(c.daemon.print_address.as_deref(), Some(""));
        assert!(c.daemon.session);
    }

    #[test]
    fn system_flag() {
        let c = parse(&["busvisor", "--system", "--nofork"]);
        assert!(c.daemon.system);
        assert_eq!(
            c.daemon.config_file_to_load(),
            crate::config::system_config_file()
        );
        let c = parse(&["busvisor", "daemon", "--system"]);
        assert!(matches!(c.command, Some(Command::Daemon(a)) if a.system));
        let c = parse(&["busvisor", "--config-file=/x.conf"]);
        assert_eq!(
            c.daemon.config_file_to_load(),
            Some(PathBuf::from("/x.conf"))
        );
        // As dbus-daemon: one configuration only.
        for other in ["--session", "--config-file=/x.conf", "--config=/x.toml"] {
            let e = Cli::try_parse_from(["busvisor", "--system", other]).unwrap_err();
            assert_eq!(e.kind(), clap::error::ErrorKind::ArgumentConflict);
        }
    }

    #[test]
    fn syslog_flags_last_wins() {
        use crate::logging::SyslogFlag::*;
        let flag = |args: &[&str]| {
            let mut all = vec!["busvisor"];
            all.extend_from_slice(args);
            parse(&all).daemon.syslog_flag()
        };
        assert_eq!(flag(&[]), None);
        assert_eq!(flag(&["--syslog"]), Some(Syslog));
        assert_eq!(flag(&["--nosyslog"]), Some(NoSyslog));
        assert_eq!(flag(&["--syslog-only"]), Some(SyslogOnly));
        assert_eq!(flag(&["--syslog", "--nosyslog"]), Some(NoSyslog));
        assert_eq!(flag(&["--nosyslog", "--syslog"]), Some(Syslog));
        assert_eq!(flag(&["--syslog-only", "--nosyslog"]), Some(NoSyslog));
        assert_eq!(flag(&["--nosyslog", "--syslog-only"]), Some(SyslogOnly));
        // bus/main.c: --syslog does not clear --syslog-only's "only".
        assert_eq!(flag(&["--syslog-only", "--syslog"]), Some(SyslogOnly));
        assert_eq!(flag(&["--syslog", "--syslog-only"]), Some(SyslogOnly));
    }

    #[test]
    fn run_takes_command() {
        let c = parse(&["busvisor", "run", "--", "sh", "-c", "exit 3"]);
        match c.command {
            Some(Command::Run(r)) => assert_eq!(r.command.len(), 3),
            other => panic!("unexpected {other:?}"),
        }
    }

    fn client(args: &[&str]) -> ClientCommand {
        match parse(args).command {
            Some(Command::Client(c)) => c,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn control_commands() {
        match client(&["busvisor", "list", "--json", "--address", "unix:path=/x"]) {
            ClientCommand::List(a) => {
                assert!(a.client.json);
                assert_eq!(a.client.address.as_deref(), Some("unix:path=/x"));
            }
            other => panic!("unexpected {other:?}"),
        }
        match client(&["busvisor", "status", "org.x.Y"]) {
            ClientCommand::Status(a) => {
                assert_eq!(a.names, ["org.x.Y"]);
                assert!(!a.client.json);
                assert!(a.client.address.is_none());
            }
            other => panic!("unexpected {other:?}"),
        }
        for (cmd, want) in [("start", 0), ("stop", 1), ("restart", 2)] {
            let got = match client(&["busvisor", cmd, "svc"]) {
                ClientCommand::Start(a) if a.names == ["svc"] => 0,
                ClientCommand::Stop(a) if a.names == ["svc"] => 1,
                ClientCommand::Restart(a) if a.names == ["svc"] => 2,
                other => panic!("unexpected {other:?}"),
            };
            assert_eq!(got, want);
        }
        match client(&["busvisor", "logs", "svc", "-n", "5", "-f"]) {
            ClientCommand::Logs(a) => {
                assert_eq!((a.name.as_str(), a.lines, a.follow), ("svc", 5, true));
            }
            other => panic!("unexpected {other:?}"),
        }
        match client(&["busvisor", "logs", "svc"]) {
            ClientCommand::Logs(a) => assert_eq!((a.lines, a.follow), (0, false)),
            other => panic!("unexpected {other:?}"),
        }
        match client(&["busvisor", "events", "--logs", "--service", "svc", "--json"]) {
            ClientCommand::Events(a) => {
                assert!(a.logs && a.client.json);
                assert_eq!(a.service.as_deref(), Some("svc"));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            client(&["busvisor", "reload"]),
            ClientCommand::Reload(_)
        ));
    }

    #[test]
    fn options_before_a_control_command() {
        match client(&[
            "busvisor",
            "--address=unix:path=/x",
            "--json",
            "status",
            "svc",
        ]) {
            ClientCommand::Status(a) => {
                assert_eq!(a.client.address.as_deref(), Some("unix:path=/x"));
                assert!(a.client.json);
                assert_eq!(a.names, ["svc"]);
            }
            other => panic!("unexpected {other:?}"),
        }
        match client(&["busvisor", "--address", "unix:path=/y", "list"]) {
            ClientCommand::List(a) => {
                assert_eq!(a.client.address.as_deref(), Some("unix:path=/y"))
            }
            other => panic!("unexpected {other:?}"),
        }
        // Not a control command: left alone.
        let c = parse(&["busvisor", "run", "--", "busvisor", "--address=x", "list"]);
        assert!(matches!(c.command, Some(Command::Run(_))));
    }

    #[test]
    fn daemon_flags_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let ok = [dir.path().to_owned()];
        assert!(check_daemon_flags(&ok, Some("debug")).is_ok());
        assert!(check_daemon_flags(&ok, Some("busvisor=trace,zbus=warn")).is_ok());
        assert!(check_daemon_flags(&[], None).is_ok());
        let e = check_daemon_flags(&[dir.path().join("nope")], None).unwrap_err();
        assert!(
            e.starts_with("--services-dir ") && e.contains("No such file"),
            "{e}"
        );
        let e = check_daemon_flags(&ok, Some("verbose")).unwrap_err();
        assert!(e.contains("\"verbose\": not a level"), "{e}");
    }

    #[test]
    fn control_command_usage_errors() {
        let bad = |args: &[&str]| {
            Cli::try_parse_from(normalize_args(args.iter().map(OsString::from))).unwrap_err()
        };
        // A missing NAME, an unknown flag, a non-numeric -n.
        assert_eq!(bad(&["busvisor", "status"]).exit_code(), 2);
        assert_eq!(bad(&["busvisor", "list", "--bogus"]).exit_code(), 2);
        assert_eq!(bad(&["busvisor", "logs", "svc", "-n", "x"]).exit_code(), 2);
        // Daemon flags still work without a subcommand.
        assert!(
            parse(&["busvisor", "--address", "unix:path=/x", "--nofork"])
                .command
                .is_none()
        );
        let alone = parse(&["busvisor", "--address", "unix:path=/x"]);
        assert!(alone.command.is_none());
        // ... but only a dbus-daemon flag starts a bus (see main).
        assert!(!alone.daemon.starts_a_bus());
        assert!(!parse(&["busvisor"]).daemon.starts_a_bus());
        assert!(
            !parse(&["busvisor", "--services-dir=/d", "--log-level=debug"])
                .daemon
                .starts_a_bus()
        );
        for flag in [
            "--session",
            "--system",
            "--config-file=/x.conf",
            "--config=/x.toml",
            "--print-address",
            "--print-pid=5",
            "--nofork",
            "--fork",
            "--nopidfile",
            "--systemd-activation",
            "--syslog",
            "--nosyslog",
            "--syslog-only",
            "--introspect",
        ] {
            let c = parse(&["busvisor", flag, "--address=unix:path=/x"]);
            assert!(c.command.is_none() && c.daemon.starts_a_bus(), "{flag}");
        }
    }
}
