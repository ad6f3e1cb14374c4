//! Supervision: the state of every service and the task that drives it.
//!
//! The runtime state of services lives in the routing core's [`State`], under
//! the same lock as names and pending activations, so that "the name was
//! taken" and "the service is running" are one atomic step. This module's
//! task does what needs waiting: spawning, timers, reaped exits and stops.

pub mod procs;
pub mod reaper;
pub mod spawner;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::ffi::OsString;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::AsyncBufReadExt;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::activation::definition::{RestartPolicy, ServiceDef};
use crate::router::{Bus, State, err};
use reaper::ExitKind;
use spawner::{SpawnRequest, Spawner};

/// Lines of output kept per service.
pub const LOG_LINES: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceState {
    Inactive,
    Activating,
    Running,
    Stopping,
    Restarting,
    Failed,
}

impl ServiceState {
    pub fn as_str(&self) -> &'static str {
        match self {
            ServiceState::Inactive => "inactive",
            ServiceState::Activating => "activating",
            ServiceState::Running => "running",
            ServiceState::Stopping => "stopping",
            ServiceState::Restarting => "restarting",
            ServiceState::Failed => "failed",
        }
    }
}

/// Why a stop is happening: decides what follows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// Asked for (control API, shutdown): no restart.
    Requested,
    /// Idle timeout: the next message activates it again.
    Idle,
    /// The main process or the name went away: the restart policy decides.
    Ended,
    /// Start timeout or start failure: waiters were told already.
    Failed,
}

#[derive(Debug, Clone)]
pub struct LastExit {
    pub pid: i32,
    pub kind: ExitKind,
    pub failure: bool,
    pub at: SystemTime,
}

/// One service's runtime state.
pub struct Service {
    pub def: Arc<ServiceDef>,
    pub state: ServiceState,
    pub reason: String,
    /// Bumped at every start; timers carry it so stale ones are ignored.
    pub invocation: u64,
    pub token: String,
    pub launched_pid: Option<i32>,
    pub main_pid: Option<i32>,
    pub pids: BTreeSet<i32>,
    pub peer: Option<crate::peer::PeerId>,
    pub requester: Option<(String, Option<u32>)>,
    pub started_at: Option<SystemTime>,
    pub changed_at: SystemTime,
    pub restarts: u32,
    pub consecutive_failures: u32,
    pub recent_starts: VecDeque<Instant>,
    pub last_exit: Option<LastExit>,
    pub next_restart: Option<SystemTime>,
    pub stop_reason: Option<StopReason>,
    /// The failure of the previous main process, for the restart decision.
    pub ended_with_failure: bool,
    /// Set when the start limit was hit: only an explicit start clears it.
    pub start_limited: bool,
    pub last_activity: Instant,
    pub logs: VecDeque<String>,
    /// Control calls waiting for this service to reach a state.
    pub waiting_stop: Vec<oneshot::Sender<Result<(), String>>>,
    pub waiting_start: Vec<oneshot::Sender<Result<(), String>>>,
    /// The current start is an automatic restart (its failure goes back to
    /// the restart policy instead of ending the activation).
    pub auto_restart: bool,
    /// The error of the last failed restart attempt, for the final report.
    pub last_start_error: Option<(String, String)>,
}

impl Service {
    pub fn new(def: Arc<ServiceDef>) -> Self {
        Service {
            def,
            state: ServiceState::Inactive,
            reason: String::new(),
            invocation: 0,
            token: String::new(),
            launched_pid: None,
            main_pid: None,
            pids: BTreeSet::new(),
            peer: None,
            requester: None,
            started_at: None,
            changed_at: SystemTime::now(),
            restarts: 0,
            consecutive_failures: 0,
            recent_starts: VecDeque::new(),
            last_exit: None,
            next_restart: None,
            stop_reason: None,
            ended_with_failure: false,
            start_limited: false,
            last_activity: Instant::now(),
            logs: VecDeque::new(),
            waiting_stop: Vec::new(),
            waiting_start: Vec::new(),
            auto_restart: false,
            last_start_error: None,
        }
    }

    pub fn set_state(&mut self, state: ServiceState, reason: impl Into<String>) {
        let reason = reason.into();
        if state != self.state || reason != self.reason {
            info!(service = %self.def.id, from = self.state.as_str(), to = state.as_str(), %reason, "state");
        }
        self.state = state;
        self.reason = reason;
        self.changed_at = SystemTime::now();
    }

    /// A service in these states takes new messages into its queue instead of
    /// being started again.
    pub fn is_starting(&self) -> bool {
        matches!(
            self.state,
            ServiceState::Activating | ServiceState::Restarting
        ) || (self.state == ServiceState::Stopping && self.stop_reason == Some(StopReason::Idle))
    }

    fn start_timeout(&self, bus: &Bus) -> Duration {
        self.def
            .start_timeout
            .unwrap_or(Duration::from_millis(bus.limits.service_start_timeout_ms))
    }

    fn restart_delay(&self) -> Duration {
        let shift = self.consecutive_failures.saturating_sub(1).min(20);
        let d = self.def.restart_delay.saturating_mul(1u32 << shift);
        d.min(self.def.restart_delay_max)
    }

    /// Whether another start now would pass the start-rate limit.
    fn start_limit_hit(&mut self) -> bool {
        let interval = self.def.start_limit_interval;
        if interval.is_zero() {
            return false;
        }
        let now = Instant::now();
        while self
            .recent_starts
            .front()
            .is_some_and(|t| now.duration_since(*t) > interval)
        {
            self.recent_starts.pop_front();
        }
        self.recent_starts.len() as u32 >= self.def.start_limit_burst
    }

    pub fn push_log(&mut self, line: String) {
        if self.logs.len() >= LOG_LINES {
            self.logs.pop_front();
        }
        self.logs.push_back(line);
    }

    /// The service's processes now: what we know, plus what the latest scan
    /// found with its token.
    fn refresh_pids(&mut self, scan: &procs::Scan) {
        if self.token.is_empty() {
            return;
        }
        // Zombies stay until the reaper collects them, so that their exit is
        // attributed and announced.
        self.pids.retain(|p| procs::stat_of(*p).is_some());
        if let Some(found) = scan.get(&self.token) {
            self.pids.extend(found);
        }
    }
}

/// Messages to the supervisor task.
pub enum Cmd {
    /// Spawn the service (its state is already Activating).
    Spawn(String),
    Exited(i32, ExitKind),
    /// The service's connection lost its name with nobody to take it over.
    NameLost(String),
    StartTimeout(String, u64),
    RestartDue(String, u64),
    StopTimeout(String, u64),
    /// Look again whether an activating service has any process left.
    Recheck(String, u64),
    IdleCheck,
    /// Stop every service, then answer.
    Shutdown(oneshot::Sender<()>),
    /// Stop one service (explicit request).
    Stop(String, oneshot::Sender<Result<(), String>>),
    /// Start one service explicitly (clears the start limit).
    Start(String, oneshot::Sender<Result<(), String>>),
    /// Run a command that is not a service (`busvisor run`): its exit status
    /// comes back on the channel.
    RunCommand(
        SpawnRequest,
        oneshot::Sender<std::io::Result<(i32, oneshot::Receiver<ExitKind>)>>,
    ),
}

/// Handle used by the router and the control API.
#[derive(Clone)]
pub struct SupervisorHandle {
    tx: mpsc::UnboundedSender<Cmd>,
}

impl SupervisorHandle {
    pub fn send(&self, cmd: Cmd) {
        let _ = self.tx.send(cmd);
    }

    pub async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        self.send(Cmd::Shutdown(tx));
        let _ = rx.await;
    }

    pub async fn run_command(
        &self,
        req: SpawnRequest,
    ) -> std::io::Result<(i32, oneshot::Receiver<ExitKind>)> {
        let (tx, rx) = oneshot::channel();
        self.send(Cmd::RunCommand(req, tx));
        rx.await
            .map_err(|_| std::io::Error::other("the supervisor is gone"))?
    }
}

/// Variables a service must not inherit from the bus (dbus-daemon drops these too).
const DROPPED_ENV: &[&str] = &[
    "JOURNAL_STREAM",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "LISTEN_PID",
    "NOTIFY_SOCKET",
    "INVOCATION_ID",
    procs::TOKEN_VAR,
    crate::daemon::FORKED_ENV,
];

/// Start the supervisor: the subreaper, the spawner thread, the reaper and
/// the command loop.
pub fn start(bus: Arc<Bus>) -> std::io::Result<SupervisorHandle> {
    reaper::become_subreaper().map_err(|e| {
        std::io::Error::other(format!(
            "cannot become a child subreaper (prctl PR_SET_CHILD_SUBREAPER, Linux 3.4+): {e}"
        ))
    })?;
    let spawner = Spawner::start()?;
    let (tx, rx) = mpsc::unbounded_channel();
    let handle = SupervisorHandle { tx: tx.clone() };
    let (exit_tx, mut exit_rx) = mpsc::unbounded_channel();
    tokio::spawn(reaper::run(exit_tx));
    let fwd = tx.clone();
    tokio::spawn(async move {
        while let Some((pid, kind)) = exit_rx.recv().await {
            if fwd.send(Cmd::Exited(pid, kind)).is_err() {
                break;
            }
        }
    });
    let tick = tx.clone();
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(Duration::from_millis(500));
        loop {
            interval.tick().await;
            if tick.send(Cmd::IdleCheck).is_err() {
                break;
            }
        }
    });
    let sup = Supervisor {
        bus,
        spawner,
        tx,
        commands: HashMap::new(),
        shutdown_waiters: Vec::new(),
        shutting_down: false,
        scan: procs::Scan::new(),
    };
    tokio::spawn(sup.run(rx));
    Ok(handle)
}

struct Supervisor {
    bus: Arc<Bus>,
    spawner: Spawner,
    tx: mpsc::UnboundedSender<Cmd>,
    /// Processes of `busvisor run`, outside any service.
    commands: HashMap<i32, oneshot::Sender<ExitKind>>,
    shutdown_waiters: Vec<oneshot::Sender<()>>,
    shutting_down: bool,
    /// Service processes by token, scanned just before the command that
    /// needs them (see `command`).
    scan: procs::Scan,
}

fn after(tx: &mpsc::UnboundedSender<Cmd>, delay: Duration, cmd: Cmd) {
    let tx = tx.clone();
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        let _ = tx.send(cmd);
    });
}

/// The service a process belongs to, as far as busvisor knows.
fn service_of(st: &State, pid: i32) -> Option<String> {
    st.services
        .iter()
        .find(|(_, s)| s.pids.contains(&pid) || s.launched_pid == Some(pid))
        .map(|(id, _)| id.clone())
}

/// Running services whose idle timeout has passed with no call pending to them.
fn idle_due(st: &State) -> Vec<String> {
    let now = Instant::now();
    st.services
        .iter()
        .filter(|(_, s)| s.state == ServiceState::Running)
        .filter(|(_, s)| {
            s.def
                .idle_timeout
                .is_some_and(|t| now.duration_since(s.last_activity) >= t)
        })
        .filter(|(_, s)| s.peer.is_none_or(|p| !st.has_calls_pending_to(p)))
        .map(|(id, _)| id.clone())
        .collect()
}

fn signal_all(pids: &BTreeSet<i32>, sig: Signal) {
    for p in pids {
        let _ = kill(Pid::from_raw(*p), sig);
    }
}

impl Supervisor {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Cmd>) {
        while let Some(cmd) = rx.recv().await {
            self.command(cmd).await;
            // Announce property changes made by this command.
            crate::lifecycle::flush_properties(&mut self.bus.lock());
        }
    }

    async fn command(&mut self, cmd: Cmd) {
        if self.needs_scan(&cmd) {
            // The scan reads every process's environment: on the blocking
            // pool, so that neither the runtime nor the core lock waits.
            self.scan = tokio::task::spawn_blocking(|| procs::scan(procs::TOKEN_VAR))
                .await
                .unwrap_or_default();
        }
        {
            match cmd {
                Cmd::Spawn(id) => self.spawn(&id).await,
                Cmd::Exited(pid, kind) => self.exited(pid, kind),
                Cmd::NameLost(id) => self.name_lost(&id),
                Cmd::StartTimeout(id, inv) => self.start_timeout(&id, inv),
                Cmd::RestartDue(id, inv) => self.restart_due(&id, inv),
                Cmd::StopTimeout(id, inv) => self.stop_timeout(&id, inv),
                Cmd::Recheck(id, inv) => self.recheck(&id, inv),
                Cmd::IdleCheck => self.idle_check(),
                Cmd::Shutdown(reply) => {
                    self.shutting_down = true;
                    self.shutdown_waiters.push(reply);
                    self.stop_everything();
                }
                Cmd::Stop(id, reply) => self.stop_request(&id, reply),
                Cmd::Start(id, reply) => self.start_request(&id, reply),
                Cmd::RunCommand(req, reply) => {
                    let r = self.spawner.spawn(req).await.map(|s| {
                        let (tx, rx) = oneshot::channel();
                        self.commands.insert(s.pid, tx);
                        (s.pid, rx)
                    });
                    let _ = reply.send(r);
                }
            }
        }
        // A pid from an old scan may since belong to someone else.
        self.scan.clear();
    }

    /// Whether handling `cmd` looks at a service's processes.
    fn needs_scan(&self, cmd: &Cmd) -> bool {
        match cmd {
            Cmd::Exited(pid, _) => {
                !self.commands.contains_key(pid) && service_of(&self.bus.lock(), *pid).is_some()
            }
            Cmd::IdleCheck => !idle_due(&self.bus.lock()).is_empty(),
            Cmd::Spawn(_) | Cmd::RestartDue(..) | Cmd::Start(..) | Cmd::RunCommand(..) => false,
            Cmd::NameLost(_)
            | Cmd::StartTimeout(..)
            | Cmd::StopTimeout(..)
            | Cmd::Recheck(..)
            | Cmd::Shutdown(_)
            | Cmd::Stop(..) => true,
        }
    }

    fn environment(&self, st: &State, svc: &Service) -> HashMap<OsString, OsString> {
        let mut env: HashMap<OsString, OsString> = std::env::vars_os()
            .filter(|(k, _)| !DROPPED_ENV.iter().any(|d| k == d))
            .collect();
        for (k, v) in &st.activation_env {
            env.insert(k.into(), v.into());
        }
        for (k, v) in &svc.def.env {
            env.insert(k.into(), v.into());
        }
        let address = self.bus.address.get().cloned().unwrap_or_default();
        env.insert("DBUS_STARTER_ADDRESS".into(), address.clone().into());
        env.insert("DBUS_STARTER_BUS_TYPE".into(), "session".into());
        env.insert("DBUS_SESSION_BUS_ADDRESS".into(), address.into());
        env.insert(procs::TOKEN_VAR.into(), svc.token.clone().into());
        env
    }

    async fn spawn(&mut self, id: &str) {
        let req = {
            let bus = self.bus.clone();
            let mut st = bus.lock();
            let Some(svc) = st.services.get(id) else {
                return;
            };
            if svc.state != ServiceState::Activating || svc.launched_pid.is_some() {
                return;
            }
            let argv = match &svc.def.argv {
                // dbus-daemon execs Exec='s program as given, without a PATH
                // search: a bare name does not run.
                Ok(a)
                    if svc.def.source == crate::activation::definition::Source::DBusService
                        && !a[0].contains('/') =>
                {
                    let text = format!(
                        "Failed to execute program {}: No such file or directory",
                        svc.def.names[0]
                    );
                    st.activation_failed(id, "org.freedesktop.DBus.Error.Spawn.ExecFailed", &text);
                    return;
                }
                Ok(a) => a.clone(),
                Err(e) => {
                    let text = e.message().to_owned();
                    st.activation_failed(id, err::INVALID_ARGS, &text);
                    return;
                }
            };
            if let Some(svc) = st.services.get_mut(id) {
                svc.invocation += 1;
                svc.token = format!("{}-{}-{}", svc.def.id, std::process::id(), svc.invocation);
                svc.recent_starts.push_back(Instant::now());
            }
            let svc = &st.services[id];
            SpawnRequest {
                argv,
                env: self.environment(&st, svc),
                cwd: working_dir(&svc.def),
                capture: true,
                new_session: true,
            }
        };
        let program = req.argv[0].clone();
        let result = self.spawner.spawn(req).await;
        let bus = self.bus.clone();
        let mut st = bus.lock();
        match result {
            Err(e) => {
                let text = format!("Failed to execute program {program}: {e}");
                warn!(service = id, "{text}");
                self.start_failed(
                    &mut st,
                    id,
                    "org.freedesktop.DBus.Error.Spawn.ExecFailed",
                    &text,
                );
            }
            Ok(spawned) => {
                let Some(svc) = st.services.get_mut(id) else {
                    return;
                };
                if spawned.program.to_string_lossy() != program {
                    info!(
                        service = id,
                        "{program} resolved to {}",
                        spawned.program.display()
                    );
                }
                svc.launched_pid = Some(spawned.pid);
                svc.pids.insert(spawned.pid);
                svc.started_at = Some(SystemTime::now());
                svc.last_activity = Instant::now();
                let reason = format!("started pid {}", spawned.pid);
                svc.set_state(ServiceState::Activating, reason);
                let timeout = svc.start_timeout(&self.bus);
                let inv = svc.invocation;
                crate::lifecycle::started(&mut st, id, spawned.pid);
                drop(st);
                for fd in [spawned.stdout, spawned.stderr].into_iter().flatten() {
                    capture_output(self.bus.clone(), id.to_owned(), spawned.pid, fd);
                }
                after(&self.tx, timeout, Cmd::StartTimeout(id.to_owned(), inv));
            }
        }
    }

    fn exited(&mut self, pid: i32, kind: ExitKind) {
        if let Some(tx) = self.commands.remove(&pid) {
            let _ = tx.send(kind);
            return;
        }
        let bus = self.bus.clone();
        let mut st = bus.lock();
        let Some(id) = service_of(&st, pid) else {
            // An orphan nobody claimed (e.g. from a service stopped earlier).
            return;
        };
        let svc = st.services.get_mut(&id).expect("found above");
        svc.pids.remove(&pid);
        svc.refresh_pids(&self.scan);
        // Dying of the stop signal busvisor sent is no failure.
        let asked_to_stop = svc.state == ServiceState::Stopping
            && matches!(
                svc.stop_reason,
                Some(StopReason::Requested) | Some(StopReason::Idle)
            );
        let failure = !kind.is_success() && !asked_to_stop;
        let is_launched = svc.launched_pid == Some(pid);
        let is_main = svc.main_pid == Some(pid);
        info!(service = %id, pid, "process {kind}");
        if is_launched || is_main {
            svc.last_exit = Some(LastExit {
                pid,
                kind,
                failure,
                at: SystemTime::now(),
            });
        }
        crate::lifecycle::exited(&mut st, &id, pid, kind, failure && (is_launched || is_main));
        let svc = st.services.get_mut(&id).expect("found above");
        match svc.state {
            ServiceState::Activating if is_launched || svc.launched_pid.is_none() => {
                if is_launched {
                    svc.launched_pid = None;
                }
                let name = svc.def.names[0].clone();
                let nothing_left = svc.pids.is_empty();
                match kind {
                    // The launcher of a daemon that forked: keep waiting for the name.
                    ExitKind::Code(0) if is_launched && !nothing_left => {
                        info!(service = %id, "launcher exited 0; waiting for its daemon to take {name}");
                    }
                    // A forked process of a daemon ended, others remain.
                    _ if !is_launched && !nothing_left => {}
                    // Exit 0 and nothing found: look again shortly before
                    // concluding (a process can be caught between fork and
                    // exec); dbus-daemon would wait for the whole timeout.
                    ExitKind::Code(0) => {
                        let inv = svc.invocation;
                        after(
                            &self.tx,
                            Duration::from_millis(100),
                            Cmd::Recheck(id.clone(), inv),
                        );
                    }
                    ExitKind::Code(c) => {
                        let text = format!("Process {name} exited with status {c}");
                        self.start_failed(
                            &mut st,
                            &id,
                            "org.freedesktop.DBus.Error.Spawn.ChildExited",
                            &text,
                        );
                    }
                    ExitKind::Signal(s) => {
                        let text = format!("Process {name} received signal {s}");
                        self.start_failed(
                            &mut st,
                            &id,
                            "org.freedesktop.DBus.Error.Spawn.ChildSignaled",
                            &text,
                        );
                    }
                }
            }
            ServiceState::Running
                if is_main || (is_launched && svc.main_pid.is_none()) || svc.pids.is_empty() =>
            {
                svc.ended_with_failure = failure || svc.ended_with_failure;
                svc.main_pid = None;
                self.begin_stop(&mut st, &id, StopReason::Ended);
            }
            ServiceState::Stopping if svc.pids.is_empty() => {
                self.stopped(&mut st, &id);
            }
            _ => {}
        }
    }

    /// A start failed before the name was taken. A first activation tells
    /// its waiters now; an automatic restart goes back to the restart policy
    /// (with a longer delay, and the start limit), keeping its waiters queued.
    fn start_failed(&mut self, st: &mut State, id: &str, error: &str, text: &str) {
        let Some(svc) = st.services.get_mut(id) else {
            return;
        };
        if svc.auto_restart && svc.def.restart != RestartPolicy::No {
            warn!(service = id, "restart failed: {text}");
            svc.last_start_error = Some((error.to_owned(), text.to_owned()));
            svc.ended_with_failure = true;
            self.begin_stop(st, id, StopReason::Ended);
            return;
        }
        st.activation_failed(id, error, text);
        self.finish_failed_start(st, id);
    }

    fn finish_failed_start(&mut self, st: &mut State, id: &str) {
        let Some(svc) = st.services.get_mut(id) else {
            return;
        };
        if svc.pids.is_empty() {
            return;
        }
        // Leftovers of a failed start go too.
        self.begin_stop(st, id, StopReason::Failed);
    }

    fn name_lost(&mut self, id: &str) {
        let bus = self.bus.clone();
        let mut st = bus.lock();
        let Some(svc) = st.services.get_mut(id) else {
            return;
        };
        if svc.state == ServiceState::Running {
            // A service that drops its name while alive is not working.
            svc.ended_with_failure = true;
            self.begin_stop(&mut st, id, StopReason::Ended);
        }
    }

    /// Send the stop signal to the whole tree and arm the kill timer.
    fn begin_stop(&mut self, st: &mut State, id: &str, reason: StopReason) {
        let Some(svc) = st.services.get_mut(id) else {
            return;
        };
        svc.refresh_pids(&self.scan);
        svc.stop_reason = Some(reason);
        svc.peer = None;
        if svc.pids.is_empty() {
            self.stopped(st, id);
            return;
        }
        let why = match reason {
            StopReason::Requested => "stop requested",
            StopReason::Idle => "idle timeout",
            StopReason::Ended => "main process or name gone",
            StopReason::Failed => "start failed",
        };
        svc.set_state(ServiceState::Stopping, why);
        let sig = svc.def.stop_signal;
        signal_all(&svc.pids, sig);
        // SIGCONT so that stopped processes see the signal (as s6 does).
        signal_all(&svc.pids, Signal::SIGCONT);
        let timeout = svc.def.stop_timeout;
        let inv = svc.invocation;
        crate::lifecycle::stopping(st, id);
        after(&self.tx, timeout, Cmd::StopTimeout(id.to_owned(), inv));
    }

    fn stop_timeout(&mut self, id: &str, inv: u64) {
        let bus = self.bus.clone();
        let mut st = bus.lock();
        let Some(svc) = current(&mut st, id, ServiceState::Stopping, inv) else {
            return;
        };
        svc.refresh_pids(&self.scan);
        if svc.pids.is_empty() {
            self.stopped(&mut st, id);
            return;
        }
        warn!(service = id, pids = ?svc.pids, "did not stop in time; sending SIGKILL");
        signal_all(&svc.pids, Signal::SIGKILL);
        // Descendants re-parented by the kills are found by the next scan.
        after(
            &self.tx,
            Duration::from_millis(100),
            Cmd::StopTimeout(id.to_owned(), inv),
        );
    }

    /// Every process of the service is gone: decide what comes next.
    fn stopped(&mut self, st: &mut State, id: &str) {
        let Some(svc) = st.services.get_mut(id) else {
            return;
        };
        let reason = svc.stop_reason.take();
        svc.launched_pid = None;
        svc.main_pid = None;
        svc.peer = None;
        let failure = std::mem::take(&mut svc.ended_with_failure);
        for w in svc.waiting_stop.drain(..) {
            let _ = w.send(Ok(()));
        }
        // The state after the stop is set before Stopped is announced, so
        // that the PropertiesChanged that goes with it shows it.
        if self.shutting_down {
            svc.set_state(ServiceState::Inactive, "bus shutting down");
            crate::lifecycle::stopped(st, id);
            self.check_shutdown(st);
            return;
        }
        match reason {
            Some(StopReason::Requested) | None => {
                svc.set_state(ServiceState::Inactive, "stopped");
                crate::lifecycle::stopped(st, id);
            }
            Some(StopReason::Failed) => {
                if svc.state == ServiceState::Stopping {
                    svc.set_state(ServiceState::Failed, "start failed");
                }
                crate::lifecycle::stopped(st, id);
            }
            Some(StopReason::Idle) => {
                svc.set_state(ServiceState::Inactive, "idle");
                crate::lifecycle::stopped(st, id);
                crate::lifecycle::idle_stopped(st, id);
                // Messages that arrived while it stopped start it again.
                if st.has_waiters_for(id) {
                    st.begin_activation(id, None);
                }
            }
            Some(StopReason::Ended) => {
                crate::lifecycle::stopped(st, id);
                let svc = st.services.get_mut(id).expect("checked above");
                let restart = match svc.def.restart {
                    RestartPolicy::Always => true,
                    RestartPolicy::OnFailure => failure,
                    RestartPolicy::No => false,
                };
                // A run longer than the start-limit interval counts as stable:
                // the backoff starts over.
                let stable = svc
                    .started_at
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|d| {
                        d > svc.def.start_limit_interval.max(svc.def.restart_delay_max)
                    });
                if stable {
                    svc.consecutive_failures = 0;
                }
                if failure {
                    svc.consecutive_failures += 1;
                }
                if !restart {
                    let (state, why) = if failure {
                        (ServiceState::Failed, "exited with failure")
                    } else {
                        (ServiceState::Inactive, "exited")
                    };
                    svc.set_state(state, why);
                    // Messages that came in meanwhile start a new instance.
                    if st.has_waiters_for(id) {
                        st.begin_activation(id, None);
                    }
                    return;
                }
                if svc.start_limit_hit() {
                    svc.start_limited = true;
                    svc.auto_restart = false;
                    svc.set_state(ServiceState::Failed, "start limit hit");
                    let mut text = format!(
                        "Service {id} was restarted too often ({} starts within {:?}); it stays failed until started explicitly",
                        svc.def.start_limit_burst, svc.def.start_limit_interval
                    );
                    if let Some((_, last)) = svc.last_start_error.take() {
                        text.push_str(&format!(" (last attempt: {last})"));
                    }
                    crate::lifecycle::failed(st, id, "start-limit");
                    st.fail_waiters(id, err::FAILED, &text);
                    for w in svc_waiting_start(st, id) {
                        let _ = w.send(Err(text.clone()));
                    }
                    return;
                }
                let delay = svc.restart_delay();
                svc.restarts += 1;
                svc.next_restart = Some(SystemTime::now() + delay);
                svc.set_state(ServiceState::Restarting, format!("restart in {delay:?}"));
                let inv = svc.invocation;
                let attempt = svc.restarts;
                crate::lifecycle::restarting(st, id, attempt, delay);
                after(&self.tx, delay, Cmd::RestartDue(id.to_owned(), inv));
            }
        }
    }

    fn restart_due(&mut self, id: &str, inv: u64) {
        let bus = self.bus.clone();
        let mut st = bus.lock();
        let Some(svc) = current(&mut st, id, ServiceState::Restarting, inv) else {
            return;
        };
        svc.next_restart = None;
        svc.auto_restart = true;
        svc.set_state(ServiceState::Activating, "restarting");
        drop(st);
        let _ = self.tx.send(Cmd::Spawn(id.to_owned()));
    }

    fn recheck(&mut self, id: &str, inv: u64) {
        let bus = self.bus.clone();
        let mut st = bus.lock();
        let Some(svc) = current(&mut st, id, ServiceState::Activating, inv) else {
            return;
        };
        svc.refresh_pids(&self.scan);
        if svc.pids.is_empty() {
            let text = format!(
                "Process {} exited with status 0 and left no process to take the name",
                svc.def.names[0]
            );
            self.start_failed(
                &mut st,
                id,
                "org.freedesktop.DBus.Error.Spawn.ChildExited",
                &text,
            );
        }
    }

    fn start_timeout(&mut self, id: &str, inv: u64) {
        let bus = self.bus.clone();
        let mut st = bus.lock();
        let Some(svc) = current(&mut st, id, ServiceState::Activating, inv) else {
            return;
        };
        let ms = svc.start_timeout(&self.bus).as_millis();
        let text = format!(
            "Failed to activate service '{}': timed out (service_start_timeout={ms}ms)",
            svc.def.names[0]
        );
        warn!(service = id, "{text}");
        // dbus-daemon kills the process it spawned; busvisor kills the tree.
        svc.refresh_pids(&self.scan);
        signal_all(&svc.pids, Signal::SIGKILL);
        self.start_failed(&mut st, id, "org.freedesktop.DBus.Error.TimedOut", &text);
    }

    fn idle_check(&mut self) {
        let bus = self.bus.clone();
        let mut st = bus.lock();
        for id in idle_due(&st) {
            info!(service = %id, "idle; stopping");
            self.begin_stop(&mut st, &id, StopReason::Idle);
        }
    }

    fn stop_request(&mut self, id: &str, reply: oneshot::Sender<Result<(), String>>) {
        let bus = self.bus.clone();
        let mut st = bus.lock();
        let Some(svc) = st.services.get_mut(id) else {
            let _ = reply.send(Err(format!("no such service: {id}")));
            return;
        };
        match svc.state {
            ServiceState::Inactive | ServiceState::Failed => {
                let _ = reply.send(Ok(()));
            }
            ServiceState::Restarting => {
                svc.next_restart = None;
                svc.invocation += 1; // cancels the restart timer
                svc.set_state(ServiceState::Inactive, "stopped");
                st.fail_waiters(id, err::FAILED, &format!("Service {id} was stopped"));
                let _ = reply.send(Ok(()));
            }
            _ => {
                svc.waiting_stop.push(reply);
                st.fail_waiters(id, err::FAILED, &format!("Service {id} was stopped"));
                self.begin_stop(&mut st, id, StopReason::Requested);
            }
        }
    }

    fn start_request(&mut self, id: &str, reply: oneshot::Sender<Result<(), String>>) {
        let bus = self.bus.clone();
        let mut st = bus.lock();
        let Some(svc) = st.services.get_mut(id) else {
            let _ = reply.send(Err(format!("no such service: {id}")));
            return;
        };
        svc.start_limited = false;
        // An explicit start begins a new count of automatic restarts.
        svc.restarts = 0;
        svc.consecutive_failures = 0;
        match svc.state {
            ServiceState::Running => {
                let _ = reply.send(Ok(()));
            }
            _ => {
                svc.waiting_start.push(reply);
                if !svc.is_starting() {
                    st.begin_activation(id, None);
                }
            }
        }
    }

    fn stop_everything(&mut self) {
        let bus = self.bus.clone();
        let mut st = bus.lock();
        let ids: Vec<String> = st.services.keys().cloned().collect();
        for id in ids {
            st.fail_waiters(&id, err::FAILED, "The bus is shutting down");
            let svc = st.services.get_mut(&id).expect("listed");
            svc.refresh_pids(&self.scan);
            if !svc.pids.is_empty() && svc.state != ServiceState::Stopping {
                self.begin_stop(&mut st, &id, StopReason::Requested);
            } else if svc.state == ServiceState::Restarting {
                svc.invocation += 1;
                svc.set_state(ServiceState::Inactive, "bus shutting down");
            }
        }
        for pid in self.commands.keys() {
            let _ = kill(Pid::from_raw(*pid), Signal::SIGTERM);
        }
        self.check_shutdown(&mut st);
    }

    fn check_shutdown(&mut self, st: &mut State) {
        if !self.shutting_down {
            return;
        }
        let busy = st
            .services
            .values()
            .any(|s| s.state == ServiceState::Stopping);
        if !busy {
            for w in self.shutdown_waiters.drain(..) {
                let _ = w.send(());
            }
        }
    }
}

/// The service, if it is still in `state` in invocation `inv`: timers carry
/// both, so that one armed for an earlier start or state does nothing.
fn current<'a>(
    st: &'a mut State,
    id: &str,
    state: ServiceState,
    inv: u64,
) -> Option<&'a mut Service> {
    st.services
        .get_mut(id)
        .filter(|s| s.state == state && s.invocation == inv)
}

fn svc_waiting_start(st: &mut State, id: &str) -> Vec<oneshot::Sender<Result<(), String>>> {
    st.services
        .get_mut(id)
        .map(|s| std::mem::take(&mut s.waiting_start))
        .unwrap_or_default()
}

/// Where a service runs: its `working_directory`, else, for busvisor's own
/// definitions, the directory of the definition file (so that examples can
/// name scripts beside them), else busvisor's own.
fn working_dir(def: &ServiceDef) -> Option<std::path::PathBuf> {
    def.working_dir.clone().or_else(|| match def.source {
        crate::activation::definition::Source::Toml => def
            .file
            .parent()
            .map(|p| p.to_path_buf())
            .filter(|p| !p.as_os_str().is_empty()),
        crate::activation::definition::Source::DBusService => None,
    })
}

/// Read a service's output line by line into the log and its buffer.
fn capture_output(bus: Arc<Bus>, id: String, pid: i32, fd: std::os::fd::OwnedFd) {
    tokio::spawn(async move {
        let Ok(rx) = tokio::net::unix::pipe::Receiver::from_owned_fd(fd) else {
            return;
        };
        let mut lines = tokio::io::BufReader::new(rx).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            info!(service = %id, pid, "{line}");
            let mut st = bus.lock();
            if st.services.contains_key(&id) {
                crate::lifecycle::log_line(&mut st, &id, pid, &line);
                if let Some(svc) = st.services.get_mut(&id) {
                    svc.push_log(line);
                }
            }
        }
    });
}
