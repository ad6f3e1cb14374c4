//! On-demand activation: service definitions, and the queues of messages
//! and StartServiceByName calls that wait for a service to take its name.
//!
//! The queues live in the routing core's [`State`] so that taking a name and
//! delivering what waited for it happen under one lock, in dbus-daemon's
//! order: NameOwnerChanged, StartServiceByName replies, NameAcquired, the
//! queued messages, and last the owner's RequestName reply.

pub mod definition;
pub mod desktop;
pub mod exec;
pub mod watch;

use std::sync::Arc;

use tracing::{info, warn};
use zbus::message::Message;

use crate::peer::{PeerId, unique_name};
use crate::router::{State, bus_error, bus_reply, err};
use crate::supervision::{Cmd, Service, ServiceState};

/// Something waiting for a name to be taken.
pub enum Waiter {
    /// A message to deliver to the new owner.
    Message { msg: Message, from: PeerId },
    /// A StartServiceByName call to answer with 1.
    Start { call: Message, from: PeerId },
}

impl Waiter {
    fn from(&self) -> PeerId {
        match self {
            Waiter::Message { from, .. } | Waiter::Start { from, .. } => *from,
        }
    }
}

/// Definitions read from the service directories, and the files skipped.
pub type Scanned = (definition::Catalog, Vec<String>);

/// The service definitions as the directories hold them now. It reads
/// files: callers that can run it without the lock, then install the result.
pub fn scan_definitions(
    (toml_dirs, service_dirs): &(Vec<std::path::PathBuf>, Vec<definition::ServiceDirSpec>),
) -> Scanned {
    definition::Catalog::scan(toml_dirs, service_dirs)
}

pub type ActivationError = (&'static str, String);

impl State {
    /// Queue `waiter` until `name` is taken, starting its service if needed.
    pub fn activate(&mut self, name: &str, waiter: Waiter) -> Result<(), ActivationError> {
        if self.catalog.lookup(name).is_none() && self.service_dirs_changed() {
            // As dbus-daemon: a miss rescans, so a new file works without a reload.
            self.rescan();
        }
        let Some(def) = self.catalog.lookup(name).cloned() else {
            return Err((
                err::SERVICE_UNKNOWN,
                format!("The name {name} was not provided by any .service files"),
            ));
        };
        if self.pending_count as u64 >= self.limits.max_pending_service_starts {
            return Err((
                err::LIMITS_EXCEEDED,
                format!(
                    "The maximum number of pending activations has been reached, activation of {name} failed (max_pending_service_starts={})",
                    self.limits.max_pending_service_starts
                ),
            ));
        }
        let id = def.id.clone();
        let svc = self
            .services
            .entry(id.clone())
            .or_insert_with(|| Service::new(def.clone()));
        if svc.start_limited {
            return Err((
                err::FAILED,
                format!(
                    "Service {id} hit its start limit and stays failed until started explicitly"
                ),
            ));
        }
        let requester = {
            let from = waiter.from();
            let pid = self.peers.get(&from).and_then(|p| p.creds.pid);
            (unique_name(from), pid)
        };
        self.pending
            .entry(name.to_owned())
            .or_default()
            .push(waiter);
        self.pending_count += 1;
        let svc = &self.services[&id];
        if !svc.is_starting() && svc.state != ServiceState::Stopping {
            if svc.state == ServiceState::Running {
                // Running but this name is not (yet) taken: wait for it.
                return Ok(());
            }
            self.begin_activation(&id, Some(requester));
        } else if svc.state == ServiceState::Stopping {
            // Queued; the service starts again once its old instance is gone.
            info!(service = %id, "message for a stopping service queued");
        }
        Ok(())
    }

    /// Mark a service activating and ask the supervisor to spawn it.
    pub fn begin_activation(&mut self, id: &str, requester: Option<(String, Option<u32>)>) {
        let fresh = self.catalog.get(id).cloned();
        let Some(svc) = self.services.get_mut(id) else {
            return;
        };
        // A new start picks up a reloaded definition.
        if let Some(def) = fresh {
            svc.def = def;
        }
        svc.requester = requester.clone();
        svc.launched_pid = None;
        svc.auto_restart = false;
        svc.set_state(ServiceState::Activating, "activation requested");
        crate::lifecycle::activation_requested(self, id, requester);
        if let Some(sup) = &self.supervisor {
            sup.send(Cmd::Spawn(id.to_owned()));
        }
    }

    /// The service could not be started: tell every waiter, mark it failed.
    pub fn activation_failed(&mut self, id: &str, name: &str, text: &str) {
        self.fail_waiters(id, name, text);
        if let Some(svc) = self.services.get_mut(id) {
            svc.set_state(ServiceState::Failed, text.to_owned());
            for w in svc.waiting_start.drain(..) {
                let _ = w.send(Err(text.to_owned()));
            }
        }
        let kind = match name {
            "org.freedesktop.DBus.Error.Spawn.ExecFailed" => "exec",
            "org.freedesktop.DBus.Error.Spawn.ChildExited" => "exit-before-ready",
            "org.freedesktop.DBus.Error.Spawn.ChildSignaled" => "signal-before-ready",
            "org.freedesktop.DBus.Error.TimedOut" => "timeout",
            _ => "error",
        };
        crate::lifecycle::failed(self, id, kind);
    }

    /// Answer every waiter of every name of service `id` with an error.
    pub fn fail_waiters(&mut self, id: &str, name: &str, text: &str) {
        let Some(svc) = self.services.get(id) else {
            return;
        };
        let names = svc.def.names.clone();
        for n in names {
            let Some(waiters) = self.pending.remove(&n) else {
                continue;
            };
            self.pending_count -= waiters.len();
            for w in waiters {
                let (msg, from) = match &w {
                    Waiter::Message { msg, from } => (msg, *from),
                    Waiter::Start { call, from } => (call, *from),
                };
                if crate::router::wants_reply(msg)
                    && let Some(e) = bus_error(msg, name, text)
                {
                    self.send_to(from, e);
                }
            }
        }
    }

    pub fn has_waiters_for(&self, id: &str) -> bool {
        self.services
            .get(id)
            .is_some_and(|s| s.def.names.iter().any(|n| self.pending.contains_key(n)))
    }

    pub fn has_calls_pending_to(&self, peer: PeerId) -> bool {
        self.replies.values().any(|r| *r == peer)
    }

    /// `name` was just taken by `owner`: the service that provides it is
    /// ready, StartServiceByName callers get their 1 now; the queued
    /// messages are returned to deliver right after NameAcquired.
    pub fn name_taken(&mut self, name: &str, owner: PeerId) -> Vec<Waiter> {
        if let Some(def) = self.catalog.lookup(name).cloned() {
            self.service_ready(&def.id, name, owner);
        }
        let Some(waiters) = self.pending.remove(name) else {
            return Vec::new();
        };
        self.pending_count -= waiters.len();
        let mut queued = Vec::new();
        for w in waiters {
            match w {
                Waiter::Start { call, from } => {
                    if let Some(r) = bus_reply(&call, &(1u32,)) {
                        self.send_to(from, r);
                    }
                }
                m @ Waiter::Message { .. } => queued.push(m),
            }
        }
        queued
    }

    fn service_ready(&mut self, id: &str, name: &str, owner: PeerId) {
        let owner_pid = self.peers.get(&owner).and_then(|p| p.creds.pid);
        let Some(svc) = self.services.get_mut(id) else {
            return;
        };
        if !matches!(
            svc.state,
            ServiceState::Activating | ServiceState::Restarting
        ) {
            return;
        }
        let inside = owner_pid.is_some_and(|pid| {
            svc.pids.contains(&(pid as i32))
                || crate::supervision::procs::token_of(pid as i32).as_deref()
                    == Some(svc.token.as_str())
        });
        if !inside {
            warn!(
                service = %id,
                %name,
                owner = %unique_name(owner),
                pid = ?owner_pid,
                "a connection from outside the service's process tree took its name while it was being activated"
            );
        }
        if let Some(pid) = owner_pid.filter(|_| inside) {
            svc.main_pid = Some(pid as i32);
            svc.pids.insert(pid as i32);
        }
        svc.peer = Some(owner);
        svc.auto_restart = false;
        svc.last_start_error = None;
        svc.last_activity = std::time::Instant::now();
        svc.set_state(ServiceState::Running, format!("{name} taken"));
        for w in svc.waiting_start.drain(..) {
            let _ = w.send(Ok(()));
        }
        self.peer_service.insert(owner, id.to_owned());
        let main = svc.main_pid;
        crate::lifecycle::ready(self, id, main);
    }

    /// The owner of `name` went away and nobody took over.
    pub fn name_released(&mut self, name: &str, old: PeerId) {
        let Some(id) = self.peer_service.get(&old).cloned() else {
            return;
        };
        let Some(svc) = self.services.get(&id) else {
            return;
        };
        if svc.def.names.iter().any(|n| n == name)
            && svc.state == ServiceState::Running
            && let Some(sup) = &self.supervisor
        {
            sup.send(Cmd::NameLost(id));
        }
    }

    /// Whether a service directory changed since the last scan (a cheap
    /// stat per directory: adding, removing or renaming a file changes it).
    pub fn service_dirs_changed(&self) -> bool {
        let (toml_dirs, service_dirs) = &self.service_dirs;
        toml_dirs
            .iter()
            .chain(service_dirs.iter().map(|d| &d.path))
            .filter_map(|d| std::fs::metadata(d).and_then(|m| m.modified()).ok())
            .any(|m| m >= self.scanned_at)
    }

    /// Re-read the definitions without announcing it (see driver::request_reload).
    pub fn rescan(&mut self) {
        let scanned = scan_definitions(&self.service_dirs);
        self.install_definitions(scanned);
    }

    /// Install scanned definitions, reporting the files that were skipped.
    pub fn install_definitions(&mut self, (catalog, warnings): Scanned) {
        for w in &warnings {
            warn!("{w}");
        }
        info!(services = catalog.len(), "service definitions loaded");
        self.set_catalog(catalog);
    }

    /// Replace the catalog (reload); running services keep their definition
    /// until they start again.
    pub fn set_catalog(&mut self, catalog: definition::Catalog) {
        let idle = |s: &Service| matches!(s.state, ServiceState::Inactive | ServiceState::Failed);
        // Services that are gone from the definitions leave once they stop.
        self.services
            .retain(|id, svc| catalog.get(id).is_some() || !idle(svc));
        for def in catalog.defs() {
            match self.services.get_mut(&def.id) {
                Some(svc) if idle(svc) => svc.def = Arc::clone(def),
                Some(_) => {}
                None => {
                    self.services
                        .insert(def.id.clone(), Service::new(Arc::clone(def)));
                }
            }
        }
        self.catalog = catalog;
        // A margin for changes made during the scan and for coarse timestamps:
        // at worst a miss soon after a scan reads the directories again.
        self.scanned_at = std::time::SystemTime::now() - std::time::Duration::from_secs(2);
        crate::lifecycle::flush_properties(self);
    }
}
