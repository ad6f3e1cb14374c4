//! The supervisor task: one command at a time, each applied under the core
//! lock after whatever it must wait for (a /proc scan, a spawn, a
//! definitions scan) has been done without it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use super::host::{Host, HostSpec};
use super::reaper::ExitKind;
use super::service::{Service, ServiceState};
use super::{Cmd, SupervisedBus, SupervisorHandle, SupervisorState, output, procs};
use crate::activation::catalog;
use crate::activation::definition::Skipped;
use crate::bus::{BusState, Requester, Shared};
use crate::wire::{self, BusError, ErrorName, names};

pub(super) fn start(
    bus: Arc<SupervisedBus>,
    rx: mpsc::UnboundedReceiver<Cmd>,
    spec: HostSpec,
) -> std::io::Result<SupervisorHandle> {
    let (exit_tx, mut exit_rx) = mpsc::unbounded_channel();
    let host = Host::start(spec, exit_tx)?;
    let handle = {
        let mut g = bus.lock();
        g.sup.killer = host.killer();
        g.sup.handle()
    };
    let fwd = handle.clone();
    tokio::spawn(async move {
        while let Some((pid, kind)) = exit_rx.recv().await {
            fwd.send(Cmd::Exited(pid, kind));
        }
    });
    let task = Task {
        bus,
        host,
        commands: HashMap::new(),
        shutdown_waiters: Vec::new(),
        scan: procs::Scan::new(),
        tree: procs::Tree::default(),
    };
    tokio::spawn(task.run(rx));
    Ok(handle)
}

struct Task {
    bus: Arc<SupervisedBus>,
    host: Host,
    /// Processes of `busvisor run`, outside any service.
    commands: HashMap<i32, oneshot::Sender<ExitKind>>,
    shutdown_waiters: Vec<oneshot::Sender<()>>,
    /// Service processes by token, scanned just before the command that
    /// needs them (see `command`).
    scan: procs::Scan,
    /// What the scans learnt of the process tree (without cgroups).
    tree: procs::Tree,
}

impl Task {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Cmd>) {
        while let Some(cmd) = rx.recv().await {
            self.command(cmd).await;
            // Announce property changes made by this command.
            let mut g = self.bus.lock();
            let Shared { core, sup } = &mut *g;
            sup.events.flush(&sup.services, core);
        }
    }

    async fn command(&mut self, cmd: Cmd) {
        if self.needs_scan(&cmd) {
            // The scan reads every process's environment: on the blocking
            // pool, so that neither the runtime nor the core lock waits.
            // The tree's memory goes with it and comes back.
            let mut tree = std::mem::take(&mut self.tree);
            tree.known = self.bus.lock().sup.known_processes();
            (self.scan, self.tree) = tokio::task::spawn_blocking(move || {
                let scan = procs::services(&mut tree);
                (scan, tree)
            })
            .await
            .unwrap_or_default();
        }
        match cmd {
            Cmd::Spawn(id) => self.spawn(&id).await,
            Cmd::Resolve => self.resolve().await,
            Cmd::Reload => self.reload().await,
            Cmd::SetEnabled(id, file, enable, call) => {
                let written = tokio::task::spawn_blocking(move || {
                    catalog::set_disabled_marker(&file, !enable)
                })
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)));
                let mut g = self.bus.lock();
                let Shared { core, sup } = &mut *g;
                sup.set_enabled(&id, enable, written, &call, core);
            }
            Cmd::RunCommand(req, reply) => {
                let r = self.host.spawn_command(req).await.map(|s| {
                    let (tx, rx) = oneshot::channel();
                    self.commands.insert(s.pid, tx);
                    (s.pid, rx)
                });
                let _ = reply.send(r);
            }
            Cmd::Exited(pid, kind) if self.commands.contains_key(&pid) => {
                let _ = self.commands.remove(&pid).expect("checked").send(kind);
            }
            Cmd::Shutdown(reply) => {
                self.shutdown_waiters.push(reply);
                let commands: Vec<i32> = self.commands.keys().copied().collect();
                self.locked(|sup, core, scan| sup.stop_everything(core, scan));
                for pid in commands {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
                }
            }
            other => self.locked(|sup, core, scan| sup.apply(other, core, scan)),
        }
        let idle = self.bus.lock().sup.shutdown_done();
        if idle && !self.shutdown_waiters.is_empty() {
            if matches!(self.host, Host::Local(_)) {
                // Where a warden runs, it removes them (they are root's).
                procs::prune_cgroups(true);
            }
            for w in self.shutdown_waiters.drain(..) {
                let _ = w.send(());
            }
        }
        // A pid from an old scan may since belong to someone else.
        self.scan.clear();
    }

    fn locked(&self, f: impl FnOnce(&mut SupervisorState, &mut BusState, &procs::Scan)) {
        let mut g = self.bus.lock();
        let Shared { core, sup } = &mut *g;
        f(sup, core, &self.scan);
    }

    /// Whether handling `cmd` looks at a service's processes.
    fn needs_scan(&self, cmd: &Cmd) -> bool {
        match cmd {
            Cmd::Exited(pid, _) => {
                !self.commands.contains_key(pid) && self.bus.lock().sup.service_of(*pid).is_some()
            }
            Cmd::IdleCheck(id, inv) => {
                let g = self.bus.lock();
                g.sup.idle_due(id, *inv, &g.core)
            }
            Cmd::Spawn(_)
            | Cmd::RestartDue(..)
            | Cmd::Start(..)
            | Cmd::ResetFailed(..)
            | Cmd::SetEnabled(..)
            | Cmd::RunCommand(..)
            | Cmd::Resolve
            | Cmd::Reload => false,
            Cmd::NameLost(_)
            | Cmd::StartTimeout(..)
            | Cmd::StopTimeout(..)
            | Cmd::Recheck(..)
            | Cmd::Shutdown(_)
            | Cmd::Stop(..)
            | Cmd::Restart(..)
            | Cmd::Properties(..)
            | Cmd::Kill(..) => true,
        }
    }

    async fn spawn(&mut self, id: &str) {
        let address = self.bus.facts.address.get().cloned().unwrap_or_default();
        let (req, token) = {
            let mut g = self.bus.lock();
            let Shared { core, sup } = &mut *g;
            match sup.prepare_spawn(id, &address, core) {
                Some(x) => x,
                None => return,
            }
        };
        let program = req.argv[0].clone();
        let result = self.host.spawn(id, &token, req).await;
        let mut g = self.bus.lock();
        let Shared { core, sup } = &mut *g;
        match result {
            Err(e) => {
                warn!(service = id, "{}", e.text);
                sup.start_failed(id, &e, core, &self.scan);
            }
            Ok(spawned) => {
                if spawned.program.to_string_lossy() != program {
                    let resolved = spawned.program.display();
                    info!(service = id, "{program} resolved to {resolved}");
                }
                let pid = spawned.pid;
                if !sup.spawned(id, pid, &self.bus.facts, core) {
                    return;
                }
                drop(g);
                let budget = output::Budget::shared();
                let pipes = [
                    (output::Stream::Stdout, spawned.stdout),
                    (output::Stream::Stderr, spawned.stderr),
                ];
                for (stream, fd) in pipes {
                    if let Some(fd) = fd {
                        let bus = self.bus.clone();
                        output::capture(bus, id.to_owned(), pid, stream, fd, &budget);
                    }
                }
            }
        }
    }

    /// Messages wait for names no loaded definition provides: read the
    /// directories again if they changed since the last scan, then start
    /// what provides each name or fail what waits for it. Misses that come
    /// in meanwhile share the next round (a burst costs a scan or two).
    async fn resolve(&mut self) {
        loop {
            let (dirs, since, misses) = {
                let mut g = self.bus.lock();
                let misses = std::mem::take(&mut g.sup.catalog.misses);
                if misses.is_empty() {
                    g.sup.catalog.resolving = false;
                    return;
                }
                (g.sup.catalog.dirs.clone(), g.sup.catalog.scanned_at, misses)
            };
            let scanned = tokio::task::spawn_blocking(move || {
                catalog::dirs_changed(&dirs, since).then(|| catalog::scan(&dirs))
            })
            .await
            .ok()
            .flatten();
            let mut g = self.bus.lock();
            let Shared { core, sup } = &mut *g;
            if let Some(scanned) = scanned {
                sup.install(scanned, core);
            }
            for (name, requester) in misses {
                sup.resolved(name, requester, core);
            }
        }
    }

    /// Read the definitions, off the lock, until no request came in during
    /// the last read; then announce and answer the callers.
    async fn reload(&mut self) {
        // SIGHUP and the directory watch come here without `request`.
        self.bus.lock().sup.catalog.reload.running = true;
        loop {
            let (dirs, config, callers) = {
                let mut g = self.bus.lock();
                let c = &mut g.sup.catalog;
                (c.dirs.clone(), c.config_file.clone(), c.reload.begin())
            };
            let read = tokio::task::spawn_blocking(move || {
                // The configuration's policy too, as dbus-daemon reloads it.
                let policy = config.map(|f| crate::config::load_xml(&f).map(|c| c.policy_rules));
                (catalog::scan(&dirs), policy)
            })
            .await;
            let mut g = self.bus.lock();
            let Shared { core, sup } = &mut *g;
            let (scanned, outcome) = match read {
                Ok((scanned, policy)) => (Ok(scanned), install_policy(policy, core)),
                Err(e) => (Err(e), Ok(())),
            };
            match scanned {
                Ok(scanned) => {
                    sup.install(scanned, core);
                    let sig = wire::signal(
                        names::BUS_PATH,
                        names::BUS_NAME,
                        "ActivatableServicesChanged",
                        None,
                        &(),
                    );
                    if let Some(sig) = sig {
                        core.emit(&sig);
                    }
                }
                Err(e) => warn!("reload failed: {e}"),
            }
            for c in callers {
                core.complete(&c, outcome.clone());
            }
            if !sup.catalog.reload.again() {
                return;
            }
        }
    }
}

impl SupervisorState {
    /// Install scanned definitions; running services keep their definition
    /// until they start again, and those gone from the files leave once
    /// stopped. A file that could not be loaded stays in view as a
    /// `bad-definition` entry (or, for a running service, its
    /// `DefinitionError`). Each problem is logged here, once per scan.
    pub(crate) fn install(&mut self, scanned: catalog::Scanned, core: &mut BusState) {
        let catalog::Scanned {
            catalog,
            warnings,
            disabled,
        } = scanned;
        for w in self.catalog.new_warnings(&warnings) {
            warn!("{w}");
        }
        info!(
            services = catalog.len(),
            skipped = catalog.skipped().len(),
            "service definitions loaded"
        );
        // The skipped file that names each id (the first, as for definitions).
        let mut bad: BTreeMap<&str, &Skipped> = BTreeMap::new();
        for s in catalog.skipped() {
            if catalog.get(&s.id).is_none() {
                bad.entry(s.id.as_str()).or_insert(s);
            }
        }
        self.services.retain(|id, svc| {
            catalog.get(id).is_some() || bad.contains_key(id.as_str()) || !svc.is_idle()
        });
        for def in catalog.defs() {
            match self.services.get_mut(&def.id) {
                Some(svc) if svc.is_idle() => {
                    if !Arc::ptr_eq(&svc.def, def) || svc.definition_error.is_some() {
                        svc.def = Arc::clone(def);
                        svc.definition_broken(None);
                        self.events.touch(&def.id);
                    }
                }
                Some(svc) => {
                    if svc.definition_error.is_some() {
                        svc.definition_broken(None);
                        self.events.touch(&def.id);
                    }
                }
                None => {
                    self.services
                        .insert(def.id.clone(), Service::new(Arc::clone(def)));
                    self.events.touch(&def.id);
                }
            }
        }
        for (id, skipped) in bad {
            match self.services.get_mut(id) {
                Some(svc) if svc.definition_error.as_deref() == Some(&skipped.error) => {}
                Some(svc) => {
                    // Its history (output, failures) stays with the entry.
                    svc.definition_broken(Some(skipped.error.clone()));
                    self.events.touch(id);
                }
                None => {
                    self.services.insert(id.to_owned(), Service::bad(skipped));
                    self.events.touch(id);
                }
            }
        }
        self.catalog.install(catalog, disabled);
        for (id, svc) in self.services.iter_mut() {
            let enabled = self.catalog.is_enabled(id);
            if svc.enabled != enabled {
                svc.enabled = enabled;
                self.events.touch(id);
            }
        }
        self.events.flush(&self.services, core);
    }

    /// After a rescan: start what provides `name`, or fail its waiters.
    fn resolved(&mut self, name: String, requester: Requester, core: &mut BusState) {
        let names = [name];
        if !core.has_pending(&names) {
            return; // answered meanwhile (taken, or failed)
        }
        let [name] = names;
        let outcome = if self.catalog.catalog.lookup(&name).is_some() {
            crate::bus::Activator::start(self, &name, requester, core)
        } else {
            Err(BusError::new(
                ErrorName::ServiceUnknown,
                format!("The name {name} was not provided by any .service files"),
            ))
        };
        if let Err(e) = outcome {
            core.fail_pending(&[name], &e);
        }
    }

    /// Where definitions come from, and what they held at start-up.
    pub(crate) fn set_dirs(
        &mut self,
        dirs: catalog::Dirs,
        config_file: Option<std::path::PathBuf>,
        scanned: catalog::Scanned,
        core: &mut BusState,
    ) {
        self.catalog.dirs = dirs;
        self.catalog.config_file = config_file;
        self.install(scanned, core);
    }

    /// Each running invocation's processes as held now, by token: where
    /// the next scan starts from.
    pub(super) fn known_processes(&self) -> HashMap<String, procs::Known> {
        self.services
            .values()
            .filter(|s| !s.token.is_empty())
            .map(|s| {
                let known = procs::Known {
                    live: s.pids.live().collect(),
                    session: s.session,
                };
                (s.token.clone(), known)
            })
            .collect()
    }

    /// The service a process belongs to, as far as busvisor knows.
    pub(super) fn service_of(&self, pid: i32) -> Option<String> {
        self.services
            .iter()
            .find(|(_, s)| s.pids.contains(&pid) || s.launched_pid == Some(pid))
            .map(|(id, _)| id.clone())
    }

    /// Whether the idle timer of invocation `inv` finds the service idle.
    pub(super) fn idle_due(&self, id: &str, inv: u64, core: &BusState) -> bool {
        self.idle_remaining(id, inv, core) == Some(Duration::ZERO)
    }

    /// For a running service with an idle timeout: how long until it has
    /// been idle for that long (zero: now), or None when the timer is stale.
    pub(super) fn idle_remaining(&self, id: &str, inv: u64, core: &BusState) -> Option<Duration> {
        let svc = self.services.get(id)?;
        if svc.state() != ServiceState::Running || svc.invocation != inv {
            return None;
        }
        let timeout = svc.def.idle_timeout?;
        let Some(peer) = svc.peer else {
            return Some(timeout);
        };
        if core.calls_pending_to(peer) > 0 {
            // Busy answering: look again soon.
            return Some(timeout.min(Duration::from_secs(1)));
        }
        let idle = core.idle_for(peer).unwrap_or_default();
        Some(timeout.saturating_sub(idle))
    }
}

/// Put a reloaded policy in place; a configuration that no longer parses
/// keeps the old one, and ReloadConfig's callers get the error (as
/// dbus-daemon does).
fn install_policy(
    policy: Option<Result<crate::policy::Policy, crate::config::ConfigError>>,
    core: &mut BusState,
) -> Result<(), BusError> {
    match policy {
        None => Ok(()),
        Some(Ok(p)) => {
            core.set_policy(p);
            Ok(())
        }
        Some(Err(e)) => {
            warn!("configuration reload failed, the old policy stays: {e}");
            Err(BusError::failed(e.to_string()))
        }
    }
}
