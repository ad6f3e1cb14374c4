//! The daemon: loads the configuration, binds the listeners, reports the
//! address, serves until SIGTERM/SIGINT, then shuts down cleanly.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};

use crate::config::{self, BusConfig};
use crate::router::Bus;
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
    #[error("the system bus is not supported: busvisor is a session bus")]
    SystemBus,
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

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
    match out {
        Output::Stdout => {
            let mut so = std::io::stdout().lock();
            so.write_all(text.as_bytes())?;
            so.flush()?;
        }
        Output::Fd(fd) => {
            // An inherited descriptor (a pipe from GTestDBus or
            // dbus-run-session) is reopened through /proc: no unsafe fd adoption.
            let mut f = OpenOptions::new()
                .write(true)
                .open(format!("/proc/self/fd/{fd}"))
                .map_err(|source| DaemonError::PrintFd {
                    fd: fd.clone(),
                    source,
                })?;
            f.write_all(text.as_bytes())
                .map_err(|source| DaemonError::PrintFd {
                    fd: fd.clone(),
                    source,
                })?;
        }
    }
    Ok(())
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
}

pub fn load_config(opts: &Options) -> Result<BusConfig, DaemonError> {
    let cfg = if let Some(p) = &opts.config_file {
        config::load_xml(p)?
    } else if let Some(p) = &opts.toml_config {
        config::load_toml(p)?
    } else {
        config::session_default()
    };
    for w in &cfg.warnings {
        warn!("{w}");
    }
    Ok(cfg)
}

/// A running bus: its address and the handles to stop it.
pub struct Running {
    pub bus: Arc<Bus>,
    pub address: String,
    listeners: Vec<tokio::task::JoinHandle<()>>,
    _bound: Vec<BoundGuard>,
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

/// Bind and start serving; returns once the bus accepts connections.
pub async fn start(opts: &Options) -> Result<Running, DaemonError> {
    let cfg = load_config(opts)?;
    let listen: Vec<String> = match &opts.address {
        Some(a) => vec![a.clone()],
        None => cfg.listen.clone(),
    };
    if listen.is_empty() {
        return Err(DaemonError::NoListen);
    }
    let guid = zbus::Guid::generate().as_str().to_owned();
    let bus = Arc::new(Bus::new(guid.clone(), cfg.limits.clone()));
    let gate = Arc::new(Gate::new());
    let mut addresses = Vec::new();
    let mut listeners = Vec::new();
    let mut guards = Vec::new();
    for spec in &listen {
        let parsed = config::address::parse_listen(spec).map_err(|e| DaemonError::Address {
            address: spec.clone(),
            reason: e.to_string(),
        })?;
        for addr in parsed {
            let Bound {
                listener,
                address,
                path,
            } = transport::bind(&addr, spec)?;
            guards.push(BoundGuard(path));
            addresses.push(format!("{address},guid={guid}"));
            listeners.push(tokio::spawn(transport::serve(
                bus.clone(),
                gate.clone(),
                listener,
            )));
        }
    }
    let address = addresses.join(";");
    let _ = bus.address.set(address.clone());
    info!(%address, "listening");
    Ok(Running {
        bus,
        address,
        listeners,
        _bound: guards,
    })
}

impl Running {
    /// Stop accepting, close every peer, remove socket files.
    pub async fn shutdown(self) {
        for l in &self.listeners {
            l.abort();
        }
        self.bus.cut_all();
        // Give readers a moment to notice, so disconnects are logged cleanly.
        for _ in 0..50 {
            if self.bus.peer_count() == 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        info!("bus stopped");
    }
}

/// `busvisor daemon`: serve until SIGTERM or SIGINT.
pub async fn run_daemon(opts: Options) -> Result<(), DaemonError> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let running = start(&opts).await?;
    if let Some(out) = &opts.print_address {
        write_output(out, &format!("{}\n", running.address))?;
    }
    if let Some(out) = &opts.print_pid {
        write_output(out, &format!("{}\n", std::process::id()))?;
    }
    loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = int.recv() => { info!("SIGINT: shutting down"); break; }
            _ = hup.recv() => { info!("SIGHUP: reloading configuration"); }
        }
    }
    running.shutdown().await;
    Ok(())
}

/// `busvisor run -- CMD`: a private bus for one command, as dbus-run-session.
/// Returns the exit code to leave with: CMD's status, or 128 + signal.
pub async fn run_command(
    opts: Options,
    command: Vec<std::ffi::OsString>,
) -> Result<u8, DaemonError> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let running = start(&opts).await?;
    let (program, args) = command.split_first().ok_or(DaemonError::NoListen)?;
    let mut cmd = std::process::Command::new(program);
    cmd.args(args)
        .env("DBUS_SESSION_BUS_ADDRESS", &running.address)
        .env_remove("DBUS_STARTER_ADDRESS")
        .env_remove("DBUS_STARTER_BUS_TYPE");
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            running.shutdown().await;
            return Err(DaemonError::Io(std::io::Error::new(
                e.kind(),
                format!("cannot run {}: {e}", program.to_string_lossy()),
            )));
        }
    };
    let pid = child.id();
    let wait = tokio::task::spawn_blocking(move || child.wait());
    tokio::pin!(wait);
    let status = loop {
        tokio::select! {
            r = &mut wait => break r.map_err(std::io::Error::other)??,
            _ = term.recv() => forward(pid, nix::sys::signal::Signal::SIGTERM),
            _ = int.recv() => forward(pid, nix::sys::signal::Signal::SIGINT),
        }
    };
    running.shutdown().await;
    use std::os::unix::process::ExitStatusExt;
    Ok(match (status.code(), status.signal()) {
        (Some(c), _) => c as u8,
        (None, Some(s)) => 128u8.wrapping_add(s as u8),
        _ => 1,
    })
}

fn forward(pid: u32, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
}
