//! The daemon: loads the configuration, binds the listeners, reports the
//! address, serves until SIGTERM/SIGINT, then shuts down cleanly.

use std::io::Write;
use std::os::fd::FromRawFd;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::signal::unix::{SignalKind, signal};
use tracing::{debug, info, warn};

use crate::activation::catalog::{self, Dirs};
use crate::activation::definition::ServiceDirSpec;
use crate::bus::Bus;
use crate::config::{self, BusConfig};
use crate::supervision::host::HostSpec;
use crate::supervision::reaper::ExitKind;
use crate::supervision::spawner::{Credentials, SpawnRequest};
use crate::supervision::{SupervisedBus, SupervisorHandle, SupervisorState};
use crate::transport::{self, Bound, Gate};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("configuration: {0}")]
    Config(#[from] config::ConfigError),
    #[error("bad listen address {address}: {reason}")]
    Address { address: String, reason: String },
    #[error(transparent)]
    Transport(#[from] transport::TransportError),
    #[error("no listen address configured")]
    NoListen,
    #[error("cannot write to file descriptor {fd}: {source}")]
    PrintFd { fd: String, source: std::io::Error },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// dbus-daemon's switch to keep logging to stderr after `--fork`.
pub const DEBUG_OUTPUT_ENV: &str = "DBUS_DEBUG_OUTPUT";

/// Set in the environment of the background copy that `--fork` starts.
pub const FORKED_ENV: &str = "BUSVISOR_FORKED";

/// Where `--print-address` / `--print-pid` output goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Stdout,
    Fd(String),
}

impl Output {
    pub fn from_flag(v: &str) -> Output {
        if v.is_empty() {
            Output::Stdout
        } else {
            Output::Fd(v.to_owned())
        }
    }
}

fn write_output(out: &Output, text: &str) -> Result<(), DaemonError> {
    let fd = match out {
        Output::Fd(fd) if fd != "1" => fd,
        _ => {
            let mut so = std::io::stdout().lock();
            so.write_all(text.as_bytes())?;
            so.flush()?;
            return Ok(());
        }
    };
    let failed = |source| DaemonError::PrintFd {
        fd: fd.clone(),
        source,
    };
    let n: std::os::fd::RawFd = fd
        .parse()
        .map_err(|_| failed(std::io::Error::other("not a descriptor number")))?;
    if n == 2 {
        std::io::stderr().write_all(text.as_bytes())?;
        return Ok(());
    }
    // Only a descriptor that is open may be adopted.
    std::fs::symlink_metadata(format!("/proc/self/fd/{n}")).map_err(failed)?;
    // SAFETY: the descriptor was handed to busvisor by its parent for this
    // one purpose (dbus-daemon's --print-address=FD protocol) and is open
    // (checked above); nothing else in the process uses that number, and
    // the file takes sole ownership and closes it when dropped.
    let mut f = std::fs::File::from(unsafe { std::os::fd::OwnedFd::from_raw_fd(n) });
    // Written to the descriptor itself, not reopened through /proc (which
    // a bus running as another user may not open), then closed as
    // dbus-daemon closes it: a parent reading to EOF (dbus-run-session)
    // goes on.
    f.write_all(text.as_bytes()).map_err(failed)
}

/// What to serve.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub config_file: Option<PathBuf>,
    pub toml_config: Option<PathBuf>,
    pub address: Option<String>,
    pub print_address: Option<Output>,
    pub print_pid: Option<Output>,
    pub services_dirs: Vec<PathBuf>,
    /// No address and no configuration file given: listen where a user
    /// session expects its bus.
    pub user_session_default: bool,
    /// `--systemd-activation`: services with `SystemdService=` are started
    /// by systemd, as dbus-daemon hands them over.
    pub systemd_activation: bool,
    /// `--nopidfile`: ignore the configuration's `<pidfile>`.
    pub nopidfile: bool,
    /// `--system` without a system.conf on this machine: the built-in one.
    /// (With one, `config_file` names it: see `DaemonArgs::config_file_to_load`.)
    pub system: bool,
    /// `--syslog`, `--nosyslog`, `--syslog-only`; `None`: the
    /// configuration's `<syslog/>` decides.
    pub syslog: Option<crate::logging::SyslogFlag>,
    /// Started by `busvisor launch`: end with the session as this says.
    pub launched: Option<crate::launch::Lifetime>,
}

/// `$XDG_RUNTIME_DIR/bus` when that directory exists, else a private socket.
pub fn default_session_address() -> String {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if std::path::Path::new(&dir).is_dir() => "unix:runtime=yes".to_owned(),
        _ => "unix:tmpdir=/tmp".to_owned(),
    }
}

pub fn load_config(opts: &Options) -> Result<BusConfig, DaemonError> {
    let cfg = if let Some(p) = &opts.config_file {
        config::load_xml(p)?
    } else if let Some(p) = &opts.toml_config {
        config::load_toml(p)?
    } else if opts.system {
        config::system_default()?
    } else {
        config::session_default()
    };
    // Before the warnings, so that they reach the system log too.
    crate::logging::set_target(crate::logging::LogTarget::choose(opts.syslog, cfg.syslog));
    for w in &cfg.warnings {
        warn!("{w}");
    }
    Ok(cfg)
}

/// Whether the configuration asks to fork (`<fork/>`, as Debian's
/// system.conf does), read quietly: the copy that serves logs its warnings.
pub fn config_wants_fork(opts: &Options) -> bool {
    let cfg = if let Some(p) = &opts.config_file {
        config::load_xml(p).ok()
    } else if opts.system {
        config::system_default().ok()
    } else {
        None
    };
    cfg.is_some_and(|c| c.fork)
}

/// The bus driver's introspection data (`busvisor --introspect`).
pub fn introspection() -> String {
    format!("{}</node>", crate::bus::driver::introspection())
}

/// A running bus: its address and the handles to stop it.
pub struct Running {
    bus: Arc<SupervisedBus>,
    supervisor: SupervisorHandle,
    pub address: String,
    listeners: Vec<tokio::task::JoinHandle<()>>,
    _bound: Vec<BoundGuard>,
    /// Removed at shutdown (by the warden instead, where there is one).
    pidfile: Option<PathBuf>,
    main_pid: u32,
}

/// Removes socket files when the bus stops.
struct BoundGuard(Option<PathBuf>);

impl Drop for BoundGuard {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A bus bound and ready to serve, before it has a runtime: what a bus
/// started as root does while still root (sockets, pidfile, fd limit).
pub struct Prepared {
    cfg: BusConfig,
    guid: String,
    bound: Vec<Bound>,
    guards: Vec<BoundGuard>,
    address: String,
    dirs: Dirs,
    pidfile: Option<PathBuf>,
    /// The bus's main process: this one, or the warden above the router.
    main_pid: u32,
}

/// Load the configuration, raise the fd limit, bind every listen address
/// and write the pidfile.
pub fn prepare(opts: &Options) -> Result<Prepared, DaemonError> {
    let cfg = load_config(opts)?;
    let listen: Vec<String> = match &opts.address {
        Some(a) => vec![a.clone()],
        None if opts.user_session_default => vec![default_session_address()],
        None => cfg.listen.clone(),
    };
    if listen.is_empty() {
        return Err(DaemonError::NoListen);
    }
    // As dbus-daemon: many clients, many fds; not passed on to services.
    if let Err(e) = crate::supervision::spawner::raise_fd_limit() {
        warn!("cannot raise the fd limit: {e}");
    }
    let guid = crate::wire::new_guid();
    let mut addresses = Vec::new();
    let mut bound = Vec::new();
    let mut guards = Vec::new();
    for spec in &listen {
        let parsed = config::address::parse_listen(spec).map_err(|e| DaemonError::Address {
            address: spec.clone(),
            reason: e.to_string(),
        })?;
        for addr in parsed {
            let b = transport::bind(&addr, spec)?;
            guards.push(BoundGuard(b.path.clone()));
            addresses.push(format!("{},guid={guid}", b.address));
            bound.push(b);
        }
    }
    let dirs = Dirs {
        toml: opts.services_dirs.clone(),
        dbus: cfg
            .servicedirs
            .iter()
            .map(|d| ServiceDirSpec {
                path: d.path.clone(),
                strict_naming: d.strict_naming,
            })
            .collect(),
        system: cfg.is_system(),
        systemd_activation: opts.systemd_activation,
    };
    let pidfile = cfg.pidfile.clone().filter(|_| !opts.nopidfile);
    if let Some(p) = &pidfile {
        std::fs::write(p, format!("{}\n", std::process::id())).map_err(|e| {
            DaemonError::Io(std::io::Error::new(
                e.kind(),
                format!("cannot write the pidfile {}: {e}", p.display()),
            ))
        })?;
    }
    Ok(Prepared {
        cfg,
        guid,
        bound,
        guards,
        address: addresses.join(";"),
        dirs,
        pidfile,
        main_pid: std::process::id(),
    })
}

impl Prepared {
    /// What the keeper closes at once and removes after the bus.
    fn leftovers(&self, opts: &Options) -> crate::keeper::Leftovers {
        use std::os::fd::AsRawFd;
        crate::keeper::Leftovers {
            pidfile: self.pidfile.clone(),
            sockets: self.guards.iter().filter_map(|g| g.0.clone()).collect(),
            close: self
                .bound
                .iter()
                .map(|b| b.listener.as_raw_fd())
                .chain(output_fds(opts))
                .collect(),
        }
    }

    /// The user the bus drops to: the configuration's `<user>`, when started
    /// as root and that user is not root.
    fn privilege_drop(&self) -> Result<Option<Credentials>, DaemonError> {
        let Some(user) = &self.cfg.user else {
            return Ok(None);
        };
        if !nix::unistd::geteuid().is_root() {
            // dbus-daemon's test suites run their configurations as
            // whoever runs them.
            warn!("not started as root: staying this user, not <user>{user}</user>");
            return Ok(None);
        }
        let creds = Credentials::of(user).map_err(|e| {
            DaemonError::Io(std::io::Error::new(
                e.kind(),
                format!("cannot run as <user>{user}</user>: {e}"),
            ))
        })?;
        Ok((!creds.uid.is_root()).then_some(creds))
    }
}

/// Bind and start serving; returns once the bus accepts connections.
pub async fn start(opts: &Options) -> Result<Running, DaemonError> {
    let prepared = prepare(opts)?;
    start_prepared(opts, prepared, HostSpec::Local).await
}

async fn start_prepared(
    opts: &Options,
    prepared: Prepared,
    host: HostSpec,
) -> Result<Running, DaemonError> {
    let Prepared {
        cfg,
        guid,
        bound,
        guards,
        address,
        dirs,
        pidfile,
        main_pid,
    } = prepared;
    if cfg.is_system() && matches!(host, HostSpec::Local) && nix::unistd::geteuid().is_root() {
        warn!("a system bus running as root: give the configuration a <user> to drop to");
    }
    let (mut sup, commands) = SupervisorState::new();
    sup.systemd_activation = opts.systemd_activation;
    sup.system_bus = cfg.is_system();
    let own_name = crate::wire::names::SUPERVISOR_NAME;
    let machine_id = std::fs::read_to_string("/etc/machine-id")
        .or_else(|_| std::fs::read_to_string("/var/lib/dbus/machine-id"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| guid.clone());
    let mut bus = Bus::new(
        guid.clone(),
        machine_id,
        cfg.limits,
        own_name,
        cfg.policy_rules.clone(),
        sup,
    );
    bus.facts.systemd_activation = opts.systemd_activation;
    bus.facts.system_bus = cfg.is_system();
    // As dbus-daemon: the bus's pid is the one it publishes (the keeper's).
    bus.facts.pid = main_pid;
    let bus = Arc::new(bus);
    let gate = Arc::new(Gate::new());
    let mut listeners = Vec::new();
    for b in bound {
        let listener = tokio::net::UnixListener::from_std(b.listener)?;
        listeners.push(tokio::spawn(transport::serve(
            bus.clone(),
            gate.clone(),
            listener,
        )));
    }
    let _ = bus.facts.address.set(address.clone());
    let supervisor = crate::supervision::start(bus.clone(), commands, host)?;
    if cfg.limits.reply_timeout_ms != config::REPLY_TIMEOUT_NEVER {
        listeners.push(tokio::spawn(bus.clone().expire_replies()));
    }
    // The transient service directory ($XDG_RUNTIME_DIR/dbus-1/services:
    // strict naming, not watched) is created, as dbus-daemon creates it,
    // so that systemd and test suites can write into it.
    for d in cfg
        .servicedirs
        .iter()
        .filter(|d| d.strict_naming && !d.watch)
    {
        if let Err(e) = std::fs::create_dir_all(&d.path) {
            warn!(
                "Unable to set up transient service directory {}: {e}",
                d.path.display()
            );
        }
    }
    // Read off the lock, installed under it.
    let scanned = catalog::scan(&dirs);
    {
        let mut g = bus.lock();
        let crate::bus::Shared { core, sup } = &mut *g;
        sup.set_dirs(dirs, opts.config_file.clone(), scanned, core);
    }
    // $XDG_RUNTIME_DIR/dbus-1/services is not watched, as in dbus-daemon.
    let watched: Vec<PathBuf> = opts
        .services_dirs
        .iter()
        .cloned()
        .chain(
            cfg.servicedirs
                .iter()
                .filter(|d| d.watch)
                .map(|d| d.path.clone()),
        )
        .collect();
    crate::activation::watch::spawn(supervisor.clone(), watched);
    info!(%address, "listening");
    Ok(Running {
        bus,
        supervisor,
        address,
        listeners,
        _bound: guards,
        pidfile,
        main_pid,
    })
}

impl Running {
    /// Stop accepting, close every peer, remove socket files.
    pub async fn shutdown(self) {
        for l in &self.listeners {
            l.abort();
        }
        // Services first: none may outlive the bus. Each stop is bounded by
        // its stop timeout plus the SIGKILL loop.
        let longest = self.bus.lock().sup.longest_stop_timeout();
        let bound = longest + std::time::Duration::from_secs(5);
        if tokio::time::timeout(bound, self.supervisor.shutdown())
            .await
            .is_err()
        {
            warn!("services did not stop within {bound:?}");
        }
        // Whatever services left below the bus (a helper that left its
        // session, without cgroups) goes too: the keeper does the same
        // after the bus, but may itself have been killed.
        let strays = tokio::task::spawn_blocking(|| {
            crate::supervision::procs::end_descendants(std::time::Duration::from_secs(2), || {})
        })
        .await
        .unwrap_or(0);
        if strays > 0 {
            warn!("ended {strays} processes left below the bus");
        }
        self.bus.cut_all();
        // Give readers a moment to notice, so disconnects are logged cleanly.
        for _ in 0..50 {
            if self.bus.peer_count() == 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        if self.main_pid == std::process::id()
            && let Some(p) = &self.pidfile
        {
            let _ = std::fs::remove_file(p);
        }
        info!("bus stopped");
    }
}

/// The runtime busvisor runs on. One worker thread: every message passes
/// through the one routing lock anyway, and a second worker mostly adds
/// cross-thread wakeups (measured: the same or lower CPU per message on
/// every benchmark row, 15% less per connection set up). Blocking work (the
/// /proc scan) goes to the blocking pool; spawning and inotify have threads
/// of their own.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let batch = crate::scheduling::batch_wanted();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .on_thread_start(move || {
            if batch {
                crate::scheduling::enter_batch();
            }
        })
        .enable_all()
        .build()
}

/// `busvisor daemon`: prepare as whoever started it; split into the warden
/// and the router when started as root with a `<user>`; serve until SIGTERM
/// or SIGINT. Returns the exit code.
pub fn serve(opts: Options) -> Result<u8, DaemonError> {
    let prepared = prepare(&opts)?;
    // From here on this process is the keeper, and the bus its child.
    let forked = std::env::var_os(FORKED_ENV).is_some();
    crate::keeper::keep(prepared.leftovers(&opts), forked)
        .map_err(|e| DaemonError::Io(std::io::Error::other(e)))?;
    let host = match prepared.privilege_drop()? {
        None => HostSpec::Local,
        Some(user) => {
            let setup = crate::warden::Setup {
                dirs: prepared.dirs.clone(),
                address: prepared.address.clone(),
                pidfile: prepared.pidfile.clone(),
            };
            match crate::warden::split(&user, setup)
                .map_err(|e| DaemonError::Io(std::io::Error::other(e)))?
            {
                crate::warden::Role::Router(link) => HostSpec::Warden(link),
                crate::warden::Role::Warden(warden) => {
                    // The router serves the sockets and reports the address:
                    // the warden keeps none of it open, so that readers of
                    // --print-address and --fork's pipe see their end.
                    let Prepared { bound, guards, .. } = prepared;
                    drop(bound);
                    release_outputs(&opts);
                    let code = warden.run();
                    // Root removes the socket files the router could not.
                    drop(guards);
                    return Ok(code);
                }
            }
        }
    };
    let rt = runtime()?;
    rt.block_on(run_daemon(opts, prepared, host))?;
    Ok(0)
}

/// The descriptors (other than stdout) the bus reports its address and
/// pid on.
fn output_fds(opts: &Options) -> impl Iterator<Item = i32> + '_ {
    [&opts.print_address, &opts.print_pid]
        .into_iter()
        .flatten()
        .filter_map(|out| match out {
            Output::Fd(fd) => fd.parse::<i32>().ok().filter(|n| *n > 2),
            Output::Stdout => None,
        })
}

/// In the warden: close the descriptors the router reports on.
fn release_outputs(opts: &Options) {
    for n in output_fds(opts) {
        let _ = nix::unistd::close(n);
    }
    if std::env::var_os(FORKED_ENV).is_some()
        && let Ok(devnull) = std::fs::File::open("/dev/null")
    {
        let _ = nix::unistd::dup2_stdout(&devnull);
    }
}

/// Serve until SIGTERM or SIGINT.
async fn run_daemon(opts: Options, prepared: Prepared, host: HostSpec) -> Result<(), DaemonError> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let running = start_prepared(&opts, prepared, host).await?;
    let session = match opts.launched {
        Some(lifetime) => {
            crate::launch::SessionEnd::open(lifetime).map_err(std::io::Error::other)?
        }
        None => crate::launch::SessionEnd::Never,
    };
    let address = format!("{}\n", running.address);
    let pid = format!("{}\n", running.main_pid);
    match (&opts.print_address, &opts.print_pid) {
        // One descriptor for both: it is closed after the write.
        (Some(a), Some(p)) if a == p => write_output(a, &format!("{address}{pid}"))?,
        (a, p) => {
            if let Some(out) = a {
                write_output(out, &address)?;
            }
            if let Some(out) = p {
                write_output(out, &pid)?;
            }
        }
    }
    if std::env::var_os(FORKED_ENV).is_some() {
        // Started by --fork: closing stdout tells the parent we are ready.
        // The log leaves the caller's terminal too, as dbus-daemon's does
        // unless DBUS_DEBUG_OUTPUT is set (the system log, if configured,
        // still has it).
        let devnull = std::fs::File::open("/dev/null")?;
        nix::unistd::dup2_stdout(&devnull).map_err(std::io::Error::from)?;
        if std::env::var_os(DEBUG_OUTPUT_ENV).is_none() {
            nix::unistd::dup2_stderr(&devnull).map_err(std::io::Error::from)?;
        }
    }
    let ended = session.ended();
    tokio::pin!(ended);
    loop {
        tokio::select! {
            _ = &mut ended => break,
            _ = term.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = int.recv() => { info!("SIGINT: shutting down"); break; }
            _ = hup.recv() => {
                info!("SIGHUP: reloading configuration");
                running.supervisor.reload();
            }
        }
    }
    running.shutdown().await;
    Ok(())
}

/// `busvisor run -- CMD`: block the signals forwarded to the command
/// before any thread starts (see `forwarding`), then run it on a runtime.
pub fn run(opts: Options, command: Vec<std::ffi::OsString>) -> Result<u8, DaemonError> {
    crate::forwarding::block().map_err(std::io::Error::from)?;
    let rt = runtime()?;
    rt.block_on(run_command(opts, command))
}

/// A private bus for one command, as dbus-run-session: the command gets
/// busvisor's stdin, stdout, stderr, descriptors and process group (so
/// that a terminal's job control treats both as one job), and every signal
/// of `forwarding::FORWARDED`; orphans that end up here are reaped with
/// the services (busvisor is their subreaper, or PID 1). Returns the exit
/// code to leave with: CMD's status, or 128 + signal.
async fn run_command(opts: Options, command: Vec<std::ffi::OsString>) -> Result<u8, DaemonError> {
    use crate::forwarding::{self, Signals};
    let signals = Signals::new()?;
    let running = start(&opts).await?;
    let argv: Vec<String> = command
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let mut env: std::collections::HashMap<_, _> = std::env::vars_os().collect();
    env.insert(
        "DBUS_SESSION_BUS_ADDRESS".into(),
        running.address.clone().into(),
    );
    // As dbus-run-session: nothing that names another bus.
    for var in [
        "DBUS_SESSION_BUS_PID",
        "DBUS_SESSION_BUS_WINDOWID",
        "DBUS_STARTER_ADDRESS",
        "DBUS_STARTER_BUS_TYPE",
    ] {
        env.remove(std::ffi::OsStr::new(var));
    }
    let req = SpawnRequest {
        search_path: None,
        argv: argv.clone(),
        env,
        cwd: None,
        capture: false,
        new_session: false,
        cgroup: None,
        user: None,
        reset_oom: false,
    };
    // The command is reaped by busvisor's reaper like everything else.
    let (pid, exit) = match running.supervisor.run_command(req).await {
        Ok(x) => x,
        Err(e) => {
            running.shutdown().await;
            return Err(DaemonError::Io(std::io::Error::new(
                e.kind(),
                format!("cannot run {}: {e}", argv[0]),
            )));
        }
    };
    let leader = forwarding::session_leader();
    let mut signals = Some(signals);
    tokio::pin!(exit);
    let kind = loop {
        let next = async {
            match &mut signals {
                Some(s) => s.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = &mut exit => break r.unwrap_or(ExitKind::Code(1)),
            got = next => match got {
                Some(r) if forwarding::reached_command(&r, forwarding::in_my_group(pid), leader) => {
                    debug!(signal = %r.signal, "not forwarded: the command got it from the terminal too");
                }
                Some(r) => {
                    debug!(signal = %r.signal, from = r.sender, "forwarded to the command");
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), r.signal);
                }
                None => signals = None,
            },
        }
    };
    running.shutdown().await;
    Ok(match kind {
        ExitKind::Code(c) => c as u8,
        ExitKind::Signal(s) => 128u8.wrapping_add(s as u8),
    })
}
