//! The service manager: definitions, services, their processes and their
//! lifecycle events.
//!
//! [`SupervisorState`] lives beside the bus core under the one lock, so
//! that "the name was taken" and "the service is running" are one step; the
//! core sees it only as an [`Activator`]. Its task (`task.rs`) does what
//! needs waiting: spawning, timers, reaped exits, stops, and reading
//! definitions and /proc off the lock.

pub(crate) mod control;
pub(crate) mod host;
pub(crate) mod launch;
pub(crate) mod lifecycle;
mod machine;
mod output;
pub mod procs;
pub(crate) mod reaper;
pub(crate) mod service;
pub(crate) mod spawner;
mod task;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::activation::catalog::CatalogState;
use crate::bus::{Activator, Answer, Bus, BusState, CallRef, Facts, PeerId, Requester};
use crate::supervision::lifecycle::{Announcer, Event};
use crate::wire::names::SYSTEMD_NAME;
use crate::wire::{BusError, ErrorName};
use reaper::ExitKind;
use service::{Service, ServiceState};
use spawner::SpawnRequest;

/// The bus with busvisor's supervisor as its activator.
pub(crate) type SupervisedBus = Bus<SupervisorState>;

/// Messages to the supervisor task.
pub(crate) enum Cmd {
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
    /// Whether a running service has been idle for its idle timeout.
    IdleCheck(String, u64),
    /// Messages wait for names no loaded definition provides (see
    /// `catalog::CatalogState::misses`).
    Resolve,
    /// Re-read the definitions (see `catalog::Reload`).
    Reload,
    /// Stop every service, then answer.
    Shutdown(oneshot::Sender<()>),
    /// Stop, start or restart one service (control API), answering the call.
    Stop(String, CallRef),
    Start(String, CallRef),
    Restart(String, CallRef),
    /// Answer a Get or GetAll of a service's properties after a look at its
    /// processes.
    Properties(String, CallRef),
    /// Signal the service's processes (true: its main process only).
    Kill(String, bool, nix::sys::signal::Signal, CallRef),
    /// Forget the failure of one service, or of every failed one (None).
    ResetFailed(Option<String>, CallRef),
    /// Enable (true) or disable a service, by the marker beside its file
    /// (written off the lock), or until the bus stops where it cannot be.
    SetEnabled(String, std::path::PathBuf, bool, CallRef),
    /// Run a command that is not a service (`busvisor run`): its exit status
    /// comes back on the channel.
    RunCommand(
        SpawnRequest,
        oneshot::Sender<std::io::Result<(i32, oneshot::Receiver<ExitKind>)>>,
    ),
}

/// Handle to the supervisor task.
#[derive(Clone)]
pub(crate) struct SupervisorHandle {
    tx: mpsc::UnboundedSender<Cmd>,
}

impl SupervisorHandle {
    pub(crate) fn send(&self, cmd: Cmd) {
        let _ = self.tx.send(cmd);
    }

    /// Send `cmd` after `delay` (a timer; stale ones are fenced by invocation).
    pub(crate) fn after(&self, delay: Duration, cmd: Cmd) {
        let tx = self.tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = tx.send(cmd);
        });
    }

    /// Re-read the definitions (SIGHUP, the directory watch).
    pub(crate) fn reload(&self) {
        self.send(Cmd::Reload);
    }

    pub(crate) async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        self.send(Cmd::Shutdown(tx));
        let _ = rx.await;
    }

    pub(crate) async fn run_command(
        &self,
        req: SpawnRequest,
    ) -> std::io::Result<(i32, oneshot::Receiver<ExitKind>)> {
        let (tx, rx) = oneshot::channel();
        self.send(Cmd::RunCommand(req, tx));
        rx.await
            .map_err(|_| std::io::Error::other("the supervisor is gone"))?
    }
}

/// Everything the supervisor keeps under the core lock.
pub(crate) struct SupervisorState {
    /// Runtime state of every defined (or still running) service, by id.
    services: BTreeMap<String, Service>,
    /// The connection of each running service, for idleness and name loss.
    peer_service: HashMap<PeerId, String>,
    /// The owner of every owned name a definition provides, whoever started
    /// it: a service whose name another connection owns is not started
    /// again through the control API (it would wait for a name it cannot get).
    name_owners: HashMap<String, PeerId>,
    /// UpdateActivationEnvironment's variables: a map, so that each update
    /// is O(log n) (a service sees the last value given for each name).
    activation_env: BTreeMap<String, String>,
    catalog: CatalogState,
    events: Announcer,
    cmd: SupervisorHandle,
    /// Set at shutdown: every stop ends in inactive, nothing restarts.
    shutting_down: bool,
    /// `--systemd-activation`: services with `SystemdService=` are
    /// systemd's to start.
    pub(crate) systemd_activation: bool,
    /// A system bus: services run as their `User=`, in a clean
    /// environment, once `activation::system::system_bus_refusal` lets them.
    pub(crate) system_bus: bool,
    /// Signals service processes (here, or through the warden).
    killer: host::Killer,
}

impl SupervisorState {
    /// A supervisor whose commands go to `rx` (see [`start`]).
    pub(crate) fn new() -> (Self, mpsc::UnboundedReceiver<Cmd>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let st = SupervisorState {
            services: BTreeMap::new(),
            peer_service: HashMap::new(),
            name_owners: HashMap::new(),
            activation_env: BTreeMap::new(),
            catalog: CatalogState::default(),
            events: Announcer::default(),
            cmd: SupervisorHandle { tx },
            shutting_down: false,
            systemd_activation: false,
            system_bus: false,
            killer: host::Killer::default(),
        };
        (st, rx)
    }

    pub(crate) fn handle(&self) -> SupervisorHandle {
        self.cmd.clone()
    }

    /// The longest stop timeout of any service, to bound shutdown.
    pub(crate) fn longest_stop_timeout(&self) -> Duration {
        self.services
            .values()
            .map(|s| s.def.stop_timeout)
            .max()
            .unwrap_or_default()
    }

    /// A service to change: its properties are announced after the change.
    fn svc_mut(&mut self, id: &str) -> Option<&mut Service> {
        let svc = self.services.get_mut(id)?;
        self.events.touch(id);
        Some(svc)
    }

    fn event(&mut self, core: &mut BusState, id: &str, event: Event<'_>) {
        self.events.event(&self.services, core, id, event);
    }

    /// Mark a service activating and ask the task to spawn it.
    fn begin_activation(&mut self, id: &str, requester: Option<Requester>, core: &mut BusState) {
        let fresh = self.catalog.catalog.get(id).cloned();
        let Some(svc) = self.svc_mut(id) else {
            return;
        };
        // A new start picks up a reloaded definition.
        if let Some(def) = fresh {
            svc.def = def;
        }
        svc.activation_requested(requester.clone());
        self.event(core, id, Event::ActivationRequested(requester.as_ref()));
        self.cmd.send(Cmd::Spawn(id.to_owned()));
    }

    /// The service could not be started: tell every waiter, mark it failed.
    fn activation_failed(&mut self, id: &str, e: &BusError, core: &mut BusState) {
        let Some(svc) = self.svc_mut(id) else {
            return;
        };
        svc.record_failure(e.text.clone());
        svc.start_failed(&e.text);
        let via_systemd = svc.via_systemd;
        let names = svc.def.names.clone();
        let callers = std::mem::take(&mut svc.waiting_start);
        core.fail_pending(&names, e);
        for c in callers {
            core.complete(
                &c,
                Err(BusError::new(ErrorName::StartFailed, e.text.clone())),
            );
        }
        let kind = match e.name {
            ErrorName::SpawnExecFailed => "exec",
            ErrorName::SpawnChildExited => "exit-before-ready",
            ErrorName::SpawnChildSignaled => "signal-before-ready",
            ErrorName::TimedOut => "timeout",
            _ if via_systemd => "systemd",
            _ => "error",
        };
        self.event(core, id, Event::Failed(kind));
    }

    /// `name` was taken by `owner`: the service that provides it is ready.
    fn service_ready(&mut self, id: &str, name: &str, owner: PeerId, core: &mut BusState) {
        let owner_pid = core.peer_pid(owner).map(|p| p as i32);
        let Some(svc) = self.services.get(id) else {
            return;
        };
        if !matches!(
            svc.state(),
            ServiceState::Activating | ServiceState::Restarting
        ) {
            return;
        }
        // The one file read under the lock: the owner's environment (or
        // cgroup), to tell the service's own connection from a squatter;
        // without cgroups, then its session (see `procs::Tree`).
        let inside = owner_pid.is_some_and(|pid| {
            svc.pids.contains(&pid)
                || procs::token_of(pid).as_deref() == Some(svc.token.as_str())
                || in_session_of(pid, svc)
        });
        if !inside && !svc.via_systemd {
            warn!(
                service = %id,
                %name,
                owner = %crate::bus::unique_name(owner),
                pid = ?owner_pid,
                "a connection from outside the service's process tree took its name while it was being activated"
            );
        }
        let svc = self.svc_mut(id).expect("looked up above");
        svc.ready(name, owner, owner_pid.filter(|_| inside));
        let callers = std::mem::take(&mut svc.waiting_start);
        let (main, inv, idle) = (svc.main_pid, svc.invocation, svc.def.idle_timeout);
        for c in callers {
            core.complete(&c, Ok(()));
        }
        self.peer_service.insert(owner, id.to_owned());
        if let Some(t) = idle {
            core.watch(owner);
            self.cmd.after(t, Cmd::IdleCheck(id.to_owned(), inv));
        }
        self.event(core, id, Event::Ready(main));
    }

    /// Hand a start to systemd (`--systemd-activation`), as dbus-daemon
    /// does: an ActivationRequest signal with the unit to systemd's
    /// connection, or waiting for it if systemd is not on the bus yet. The
    /// waiters are answered when the name is taken, or when the start
    /// times out.
    fn hand_to_systemd(
        &mut self,
        id: &str,
        unit: &str,
        requester: Requester,
        core: &mut BusState,
    ) -> Result<(), BusError> {
        let Some(svc) = self.services.get(id) else {
            return Ok(());
        };
        if svc.is_starting() {
            return Ok(());
        }
        let sig = crate::wire::signal(
            crate::wire::names::BUS_PATH,
            crate::wire::names::SYSTEMD_ACTIVATOR_IFACE,
            "ActivationRequest",
            Some(SYSTEMD_NAME),
            &(unit,),
        );
        info!(service = %id, %unit, requester = %requester.name, "activating via systemd");
        if let Some(sig) = sig {
            // dbus-daemon sends it in a transaction of its own: monitors see
            // it before the message that asked for the start.
            core.apart(|core| core.send_from_bus_to_name(SYSTEMD_NAME, sig));
        }
        let svc = self.svc_mut(id).expect("looked up above");
        svc.activation_requested(Some(requester.clone()));
        svc.new_invocation(std::process::id());
        svc.via_systemd = true;
        let inv = svc.invocation;
        self.event(core, id, Event::ActivationRequested(Some(&requester)));
        let timeout = Duration::from_millis(core.limits().service_start_timeout_ms);
        self.cmd
            .after(timeout, Cmd::StartTimeout(id.to_owned(), inv));
        Ok(())
    }

    /// Which connection, other than the service's own, owns one of its
    /// names: "NAME is already provided by :1.N (pid P)".
    fn provided_elsewhere(&self, id: &str, core: &BusState) -> Option<String> {
        let svc = self.services.get(id)?;
        svc.def.names.iter().find_map(|n| {
            let owner = *self.name_owners.get(n)?;
            if svc.peer == Some(owner) || !core.is_connected(owner) {
                return None;
            }
            let pid = core
                .peer_pid(owner)
                .map_or("unknown".to_owned(), |p| p.to_string());
            let who = crate::bus::unique_name(owner);
            Some(format!("{n} is already provided by {who} (pid {pid})"))
        })
    }

    /// An idle service whose name another connection owns says so in its
    /// reason (`busvisor list`), and stops saying so when the name goes.
    fn note_provider(&mut self, id: &str, core: &BusState) {
        let by = self.provided_elsewhere(id, core);
        if let Some(svc) = self.services.get(id)
            && svc.is_idle()
            && (by.is_some() || svc.is_provided_elsewhere())
        {
            self.svc_mut(id).expect("looked up").provided_elsewhere(by);
        }
    }

    /// The owner of `name` released it and nobody took over. (When its
    /// connection closed instead, the exit of its process tells more.)
    fn name_released(&mut self, name: &str, old: PeerId, core: &mut BusState) {
        // systemd's processes are not busvisor's: their name is all it sees.
        if let Some(id) = self.peer_service.get(&old).cloned()
            && self.services.get(&id).is_some_and(|s| s.via_systemd)
        {
            self.peer_service.remove(&old);
            if let Some(svc) = self.svc_mut(&id) {
                svc.settle(ServiceState::Inactive, "its name went (started by systemd)");
            }
            self.event(core, &id, Event::Stopped);
            return;
        }
        if !core.is_connected(old) {
            return;
        }
        let Some(id) = self.peer_service.get(&old) else {
            return;
        };
        let Some(svc) = self.services.get(id) else {
            return;
        };
        if svc.def.names.iter().any(|n| n == name) && svc.state() == ServiceState::Running {
            self.cmd.send(Cmd::NameLost(id.clone()));
        }
    }
}

impl Activator for SupervisorState {
    fn provides(&self, name: &str) -> bool {
        self.catalog
            .catalog
            .lookup(name)
            .is_some_and(|d| self.catalog.is_enabled(&d.id))
    }

    fn activatable_names(&self) -> Vec<String> {
        let c = &self.catalog;
        c.catalog
            .names()
            .filter(|n| c.catalog.lookup(n).is_some_and(|d| c.is_enabled(&d.id)))
            .map(str::to_owned)
            .collect()
    }

    fn start(
        &mut self,
        name: &str,
        requester: Requester,
        core: &mut BusState,
    ) -> Result<(), BusError> {
        let Some(def) = self.catalog.catalog.lookup(name).cloned() else {
            // As dbus-daemon, a miss reads the directories again (when they
            // changed), so a new file works without a reload: off the lock.
            if self.catalog.miss(name, requester) {
                self.cmd.send(Cmd::Resolve);
            }
            return Ok(());
        };
        if !self.catalog.is_enabled(&def.id) {
            return Err(BusError::new(
                ErrorName::ServiceUnknown,
                format!(
                    "The name {name} is provided by the service {}, which is disabled (busvisor enable {} allows it again)",
                    def.id, def.id
                ),
            ));
        }
        if self.systemd_activation {
            if name == SYSTEMD_NAME {
                // systemd itself is missing: its messages wait for it.
                return Ok(());
            }
            if let Some(unit) = &def.systemd_service {
                let unit = unit.clone();
                return self.hand_to_systemd(&def.id, &unit, requester, core);
            }
        }
        let id = def.id.clone();
        let svc = self
            .services
            .entry(id.clone())
            .or_insert_with(|| Service::new(def));
        if let Some(left) = svc.start_limit_left() {
            return Err(BusError::failed(format!(
                "Service {id} hit its start limit: activation is refused for another {:.1}s, or until started explicitly",
                left.as_secs_f64()
            )));
        }
        match svc.state() {
            // Running but this name is not (yet) taken: wait for it.
            ServiceState::Running => {}
            // Queued; the service starts again once its old instance is gone.
            ServiceState::Stopping => info!(service = %id, "message for a stopping service queued"),
            _ if svc.is_starting() => {}
            _ => self.begin_activation(&id, Some(requester), core),
        }
        Ok(())
    }

    fn name_owner_changed(
        &mut self,
        name: &str,
        old: Option<PeerId>,
        new: Option<PeerId>,
        core: &mut BusState,
    ) {
        let def = self.catalog.catalog.lookup(name).cloned();
        match new {
            Some(owner) if def.is_some() => {
                self.name_owners.insert(name.to_owned(), owner);
            }
            _ => {
                self.name_owners.remove(name);
            }
        }
        match (old, new) {
            (_, Some(owner)) => {
                if let Some(def) = &def {
                    self.service_ready(&def.id, name, owner, core);
                }
            }
            (Some(old), None) => self.name_released(name, old, core),
            (None, None) => {}
        }
        if let Some(def) = def {
            self.note_provider(&def.id, core);
        }
    }

    fn systemd_failed(&mut self, unit: &str, e: &BusError, core: &mut BusState) {
        // As dbus-daemon, every start handed to systemd for that unit, as
        // the definition read when it was asked for named it.
        let failed: Vec<String> = self
            .services
            .iter()
            .filter(|(_, s)| {
                s.via_systemd && s.is_starting() && s.def.systemd_service.as_deref() == Some(unit)
            })
            .map(|(id, _)| id.clone())
            .collect();
        if failed.is_empty() {
            info!(%unit, "systemd reported a failed activation nothing waits for");
        }
        for id in failed {
            warn!(service = %id, %unit, error = %e, "systemd could not start the service");
            self.activation_failed(&id, e, core);
        }
    }

    fn set_activation_env(&mut self, vars: Vec<(String, String)>, core: &mut BusState) {
        if self.systemd_activation {
            // dbus-daemon passes the variables on to systemd, to the name
            // (kept until systemd is there) or to its owner.
            let list: Vec<String> = vars.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let dest = core
                .owner_name(SYSTEMD_NAME)
                .unwrap_or_else(|| SYSTEMD_NAME.to_owned());
            let call = crate::wire::call_from_bus(
                &dest,
                "/org/freedesktop/systemd1",
                "org.freedesktop.systemd1.Manager",
                "SetEnvironment",
                &(list,),
            );
            if let Some(call) = call {
                core.send_from_bus_to_name(SYSTEMD_NAME, call);
            }
        }
        self.activation_env.extend(vars);
    }

    fn reload(&mut self, caller: Option<CallRef>) {
        if self.catalog.reload.request(caller) {
            self.cmd.send(Cmd::Reload);
        }
    }

    fn call(&mut self, call: &CallRef, facts: &Facts, core: &mut BusState) -> Answer {
        control::call(self, call, facts, core)
    }
}

/// Start the supervisor's task, the subreaper, the spawner thread and the
/// reaper, for the bus whose supervisor state came with `rx`.
/// Without cgroups: whether `pid` is in the session or process group of
/// the service's launched process (busvisor made that session for it).
fn in_session_of(pid: i32, svc: &Service) -> bool {
    if procs::cgroups().is_some() {
        return false;
    }
    let Some(st) = procs::stat_full(pid) else {
        return false;
    };
    // Only processes that are still the service's stand for it: a pid that
    // has gone may be another program's now (see procs::Tree). The session
    // busvisor made counts while its pid is no other process's.
    let session = svc
        .session
        .filter(|s| svc.pids.live().any(|p| p == *s) || procs::stat_of(*s).is_none());
    let mut leaders = svc.pids.live().chain(session);
    leaders.any(|l| l > 1 && (l == st.sid || l == st.pgid))
}

pub(crate) fn start(
    bus: Arc<SupervisedBus>,
    rx: mpsc::UnboundedReceiver<Cmd>,
    host: host::HostSpec,
) -> std::io::Result<SupervisorHandle> {
    task::start(bus, rx, host)
}
