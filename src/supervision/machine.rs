//! Commands applied under the core lock: what each event means for a
//! service, through the transitions of `service.rs`, with the lifecycle
//! event and the timer that go with it.

use std::time::Duration;

use nix::sys::signal::Signal;
use tracing::{info, warn};

use super::output::LogEntry;
use super::procs;
use super::reaper::ExitKind;
use super::service::{
    ExitFacts, ExitMeaning, LastExit, Next, ServiceState, StopReason, attribute_exit,
};
use super::spawner::SpawnRequest;
use super::{Cmd, SupervisorState};
use crate::activation::definition::RestartPolicy;
use crate::bus::{BusState, CallRef, Facts};
use crate::supervision::lifecycle::Event;
use crate::wire::{BusError, ErrorName};

/// Signal every process of a set, through its pidfd where it has one.
fn signal_all(killer: &super::host::Killer, pids: &procs::ProcSet, sig: Signal) {
    for (pid, fd) in pids.held() {
        killer.kill(pid, fd, sig);
    }
}

/// SIGKILL every process of a service: its whole cgroup at once where it
/// has one (written here or by the warden), and each process it is known
/// to have unless the cgroup is known killed.
fn kill_all(killer: &super::host::Killer, svc: &super::service::Service) {
    if !killer.kill_cgroup(&svc.token) {
        signal_all(killer, &svc.pids, Signal::SIGKILL);
    }
}

impl SupervisorState {
    /// Apply a command that needs nothing awaited.
    pub(super) fn apply(&mut self, cmd: Cmd, core: &mut BusState, scan: &procs::Scan) {
        match cmd {
            Cmd::Exited(pid, kind) => self.exited(pid, kind, core, scan),
            Cmd::NameLost(id) => self.name_lost(&id, core, scan),
            Cmd::StartTimeout(id, inv) => self.start_timeout(&id, inv, core, scan),
            Cmd::RestartDue(id, inv) => self.restart_due(&id, inv),
            Cmd::StopTimeout(id, inv) => self.stop_timeout(&id, inv, core, scan),
            Cmd::Recheck(id, inv) => self.recheck(&id, inv, core, scan),
            Cmd::IdleCheck(id, inv) => self.idle_check(&id, inv, core, scan),
            Cmd::Stop(id, call) => self.stop_request(&id, call, core, scan),
            Cmd::Start(id, call) => self.start_request(&id, call, core),
            Cmd::Restart(id, call) => self.restart_request(&id, call, core, scan),
            Cmd::Properties(id, call) => self.properties_request(&id, &call, core, scan),
            Cmd::Kill(id, main, sig, call) => self.kill_request(&id, main, sig, &call, core, scan),
            Cmd::ResetFailed(id, call) => self.reset_failed(id.as_deref(), &call, core),
            Cmd::Spawn(_)
            | Cmd::Resolve
            | Cmd::Reload
            | Cmd::Shutdown(_)
            | Cmd::RunCommand(..)
            | Cmd::SetEnabled(..) => {
                unreachable!("handled by the task")
            }
        }
    }

    /// The service, if it is still in `state` in invocation `inv`: timers
    /// carry both, so that one armed for an earlier start or state does nothing.
    fn current(&mut self, id: &str, state: ServiceState, inv: u64) -> bool {
        self.services
            .get(id)
            .is_some_and(|s| s.state() == state && s.invocation == inv)
    }

    /// The service's processes now: what we know, plus what the latest scan
    /// found with its token.
    fn refresh_pids(&mut self, id: &str, scan: &procs::Scan) -> bool {
        let Some(svc) = self.svc_mut(id) else {
            return true;
        };
        if !svc.token.is_empty() {
            // What is gone goes (zombies stay until reaped: see retain_live).
            svc.pids.retain_live();
            if let Some(found) = scan.get(&svc.token) {
                for (pid, fd) in found {
                    svc.pids.insert_held(*pid, fd);
                }
            }
        }
        svc.pids.is_empty()
    }

    /// Build the spawn request of an activating service, or fail its start.
    pub(super) fn prepare_spawn(
        &mut self,
        id: &str,
        address: &str,
        core: &mut BusState,
    ) -> Option<(SpawnRequest, String)> {
        let svc = self.services.get(id)?;
        if svc.state() != ServiceState::Activating || svc.launched_pid.is_some() {
            return None;
        }
        let token = svc.next_token(std::process::id());
        let launch = super::launch::Launch {
            def: &svc.def,
            token: &token,
            address,
            activation_env: &self.activation_env,
            system: self.system_bus,
        };
        match launch.request() {
            Ok(req) => {
                self.svc_mut(id)?.new_invocation(std::process::id());
                Some((req, token))
            }
            Err(e) => {
                // Every start passes here, whoever asked: a refusal reaches
                // every waiter as its D-Bus error, and nothing is spawned.
                warn!(service = %id, "Activated service '{id}' failed: {}", e.text.trim_end());
                self.activation_failed(id, &e, core);
                None
            }
        }
    }

    /// The process is spawned: announce it and arm the start timer. False
    /// when the service is gone meanwhile.
    pub(super) fn spawned(
        &mut self,
        id: &str,
        pid: i32,
        facts: &Facts,
        core: &mut BusState,
    ) -> bool {
        let Some(svc) = self.svc_mut(id) else {
            return false;
        };
        svc.spawned(pid);
        let timeout = svc
            .def
            .start_timeout
            .unwrap_or(Duration::from_millis(facts.limits.service_start_timeout_ms));
        let inv = svc.invocation;
        self.event(core, id, Event::Started(pid));
        self.cmd
            .after(timeout, Cmd::StartTimeout(id.to_owned(), inv));
        true
    }

    /// Lines a service printed.
    pub(super) fn output(&mut self, id: &str, entries: Vec<LogEntry>, core: &mut BusState) {
        if !self.services.contains_key(id) {
            return;
        }
        crate::supervision::lifecycle::log_lines(core, id, &entries);
        if let Some(svc) = self.services.get_mut(id) {
            for e in entries {
                svc.push_log(e);
            }
        }
    }

    fn exited(&mut self, pid: i32, kind: ExitKind, core: &mut BusState, scan: &procs::Scan) {
        let Some(id) = self.service_of(pid) else {
            // An orphan nobody claimed (e.g. from a service stopped earlier).
            return;
        };
        let svc = self.svc_mut(&id).expect("found above");
        svc.pids.remove(&pid);
        let nothing_left = self.refresh_pids(&id, scan);
        let svc = self.services.get_mut(&id).expect("found above");
        let facts = ExitFacts {
            state: svc.state(),
            stop_reason: svc.stop_reason,
            kind,
            is_launched: svc.launched_pid == Some(pid),
            is_main: svc.main_pid == Some(pid),
            launched_known: svc.launched_pid.is_some(),
            main_known: svc.main_pid.is_some(),
            nothing_left,
        };
        let (failure, meaning) = attribute_exit(&facts, &svc.def.names[0]);
        info!(service = %id, pid, "process {kind}");
        let owned = facts.is_launched || facts.is_main;
        // The last exit is the main process's, or the launcher's when it
        // fails a start. A launcher that exits 0 before the name is taken
        // has forked its daemon (or the recheck will say it failed), and one
        // killed by a stop is a leftover: neither hides the exit before.
        let failed_start = facts.state == ServiceState::Activating
            && facts.is_launched
            && !matches!(kind, ExitKind::Code(0));
        if facts.is_main || failed_start {
            svc.last_exit = Some(LastExit {
                pid,
                kind,
                at: std::time::SystemTime::now(),
            });
        }
        if facts.is_launched && facts.state == ServiceState::Activating {
            svc.launched_pid = None;
        }
        let exited = Event::Exited {
            pid,
            kind,
            failure: failure && owned,
        };
        self.event(core, &id, exited);
        self.exit_means(&id, meaning, failure, core, scan);
    }

    fn exit_means(
        &mut self,
        id: &str,
        meaning: ExitMeaning,
        failure: bool,
        core: &mut BusState,
        scan: &procs::Scan,
    ) {
        let svc = self.svc_mut(id).expect("caller checked");
        match meaning {
            ExitMeaning::Nothing => {}
            ExitMeaning::DaemonForked => {
                info!(service = %id, "launcher exited 0; waiting for its daemon to take {}", svc.def.names[0]);
            }
            ExitMeaning::RecheckSoon => {
                let inv = svc.invocation;
                let cmd = Cmd::Recheck(id.to_owned(), inv);
                self.cmd.after(Duration::from_millis(100), cmd);
            }
            ExitMeaning::StartFailed(name, text) => {
                self.start_failed(id, &BusError::new(name, text), core, scan);
            }
            ExitMeaning::RunEnded => {
                if failure && let Some(e) = &svc.last_exit {
                    let text = format!("main process {} {}", e.pid, e.kind);
                    svc.record_failure(text);
                }
                svc.ended_with_failure |= failure;
                svc.main_pid = None;
                self.begin_stop(id, StopReason::Ended, core, scan);
            }
            ExitMeaning::StopComplete => self.stopped(id, core),
        }
    }

    /// A start failed before the name was taken. A first activation tells
    /// its waiters now; an automatic restart goes back to the restart policy
    /// (with a longer delay, and the start limit), keeping its waiters queued.
    pub(super) fn start_failed(
        &mut self,
        id: &str,
        e: &BusError,
        core: &mut BusState,
        scan: &procs::Scan,
    ) {
        let Some(svc) = self.svc_mut(id) else {
            return;
        };
        if svc.auto_restart && svc.def.restart != RestartPolicy::No {
            warn!(service = id, "restart failed: {}", e.text);
            svc.record_failure(e.text.clone());
            svc.last_start_error = Some(e.text.clone());
            svc.ended_with_failure = true;
            self.begin_stop(id, StopReason::Ended, core, scan);
            return;
        }
        self.activation_failed(id, e, core);
        if !self.services[id].pids.is_empty() {
            // Leftovers of a failed start go too.
            self.begin_stop(id, StopReason::Failed, core, scan);
        }
    }

    fn name_lost(&mut self, id: &str, core: &mut BusState, scan: &procs::Scan) {
        let Some(svc) = self.svc_mut(id) else {
            return;
        };
        if svc.state() == ServiceState::Running {
            // A service that drops its name while alive is not working.
            svc.record_failure("its bus name was released while it ran");
            svc.ended_with_failure = true;
            self.begin_stop(id, StopReason::Ended, core, scan);
        }
    }

    /// Send the stop signal to the whole tree and arm the kill timer.
    fn begin_stop(
        &mut self,
        id: &str,
        reason: StopReason,
        core: &mut BusState,
        scan: &procs::Scan,
    ) {
        let nothing = self.refresh_pids(id, scan);
        let Some(svc) = self.svc_mut(id) else {
            return;
        };
        if let Some(peer) = svc.peer {
            self.peer_service.remove(&peer);
            if reason == StopReason::Idle {
                core.hold(peer, true);
            }
        }
        let killer = self.killer.clone();
        let svc = self.svc_mut(id).expect("looked up above");
        if nothing {
            // Nothing to signal: straight to what follows the stop.
            svc.stop_reason = Some(reason);
            svc.peer = None;
            self.stopped(id, core);
            return;
        }
        svc.stopping(reason);
        signal_all(&killer, &svc.pids, svc.def.stop_signal);
        // SIGCONT so that stopped processes see the signal (as s6 does).
        signal_all(&killer, &svc.pids, Signal::SIGCONT);
        let (timeout, inv) = (svc.def.stop_timeout, svc.invocation);
        self.event(core, id, Event::Stopping);
        self.cmd
            .after(timeout, Cmd::StopTimeout(id.to_owned(), inv));
    }

    fn stop_timeout(&mut self, id: &str, inv: u64, core: &mut BusState, scan: &procs::Scan) {
        if !self.current(id, ServiceState::Stopping, inv) {
            return;
        }
        if self.refresh_pids(id, scan) {
            self.stopped(id, core);
            return;
        }
        let svc = &self.services[id];
        warn!(service = id, pids = ?svc.pids, "did not stop in time; sending SIGKILL");
        kill_all(&self.killer, svc);
        // Descendants re-parented by the kills are found by the next scan.
        let cmd = Cmd::StopTimeout(id.to_owned(), inv);
        self.cmd.after(Duration::from_millis(100), cmd);
    }

    /// Every process of the service is gone: decide what comes next. The
    /// state after the stop is set before Stopped is announced, so that the
    /// PropertiesChanged that goes with it shows it.
    fn stopped(&mut self, id: &str, core: &mut BusState) {
        let shutting_down = self.shutting_down;
        let Some(svc) = self.svc_mut(id) else {
            return;
        };
        let (reason, failure) = svc.processes_gone();
        let stopped_callers = std::mem::take(&mut svc.waiting_stop);
        let restart_callers = std::mem::take(&mut svc.waiting_restart);
        for c in &stopped_callers {
            core.complete(c, Ok(()));
        }
        match reason {
            _ if shutting_down => {
                svc.settle(ServiceState::Inactive, "bus shutting down");
                self.event(core, id, Event::Stopped);
            }
            // Messages that arrived during the stop start a new instance.
            Some(StopReason::Requested) | None => {
                svc.settle(ServiceState::Inactive, "stopped");
                self.event(core, id, Event::Stopped);
                self.start_if_waited_for(id, core);
            }
            Some(StopReason::Failed) => {
                svc.failed_start_cleaned();
                self.event(core, id, Event::Stopped);
                self.start_if_waited_for(id, core);
            }
            Some(StopReason::Idle) => {
                svc.settle(ServiceState::Inactive, "idle");
                self.event(core, id, Event::Stopped);
                self.event(core, id, Event::IdleStopped);
                self.start_if_waited_for(id, core);
            }
            Some(StopReason::Ended) => {
                self.event(core, id, Event::Stopped);
                self.run_ended(id, failure, core);
            }
        }
        if !restart_callers.is_empty() && !shutting_down {
            let svc = self.svc_mut(id).expect("looked up above");
            svc.waiting_start.extend(restart_callers);
            self.explicit_start(id, core);
        }
    }

    /// Messages that came in meanwhile start a new instance.
    fn start_if_waited_for(&mut self, id: &str, core: &mut BusState) {
        let waited = self
            .services
            .get(id)
            .is_some_and(|s| core.has_pending(&s.def.names));
        if waited {
            self.begin_activation(id, None, core);
        }
    }

    /// The run ended by itself: the restart policy decides.
    fn run_ended(&mut self, id: &str, failure: bool, core: &mut BusState) {
        let svc = self.svc_mut(id).expect("caller checked");
        let decision = svc.decide_restart(failure);
        svc.apply_restart(decision);
        match decision.next {
            Next::Inactive => self.start_if_waited_for(id, core),
            Next::Failed => {
                self.event(core, id, Event::Failed("exited"));
                self.start_if_waited_for(id, core);
            }
            Next::StartLimited => {
                let mut text = format!(
                    "Service {id} was restarted too often ({} starts within {:?}); it stays failed for {:?} (its start limit) or until started explicitly",
                    svc.def.start_limit_burst,
                    svc.def.start_limit_interval,
                    svc.def.start_limit_interval
                );
                if let Some(last) = svc.last_start_error.take() {
                    text.push_str(&format!(" (last attempt: {last})"));
                }
                svc.record_failure(text.clone());
                let names = svc.def.names.clone();
                let callers = std::mem::take(&mut svc.waiting_start);
                self.event(core, id, Event::Failed("start-limit"));
                core.fail_pending(&names, &BusError::failed(text.clone()));
                for c in callers {
                    core.complete(&c, Err(BusError::new(ErrorName::StartFailed, text.clone())));
                }
            }
            Next::Restart(delay) => {
                let (inv, attempt) = (svc.invocation, svc.restarts);
                self.event(core, id, Event::Restarting { attempt, delay });
                self.cmd.after(delay, Cmd::RestartDue(id.to_owned(), inv));
            }
        }
    }

    fn restart_due(&mut self, id: &str, inv: u64) {
        if !self.current(id, ServiceState::Restarting, inv) {
            return;
        }
        self.svc_mut(id).expect("current").restart_due();
        self.cmd.send(Cmd::Spawn(id.to_owned()));
    }

    fn recheck(&mut self, id: &str, inv: u64, core: &mut BusState, scan: &procs::Scan) {
        if !self.current(id, ServiceState::Activating, inv) || !self.refresh_pids(id, scan) {
            return;
        }
        let text = format!(
            "Process {} exited with status 0 and left no process to take the name",
            self.services[id].def.names[0]
        );
        let e = BusError::new(ErrorName::SpawnChildExited, text);
        self.start_failed(id, &e, core, scan);
    }

    fn start_timeout(&mut self, id: &str, inv: u64, core: &mut BusState, scan: &procs::Scan) {
        if !self.current(id, ServiceState::Activating, inv) {
            return;
        }
        self.refresh_pids(id, scan);
        let svc = &self.services[id];
        let ms = svc
            .def
            .start_timeout
            .map_or(core.limits().service_start_timeout_ms, |d| {
                d.as_millis() as u64
            });
        let text = format!(
            "Failed to activate service '{}': timed out (service_start_timeout={ms}ms)",
            svc.def.names[0]
        );
        warn!(service = id, "{text}");
        // dbus-daemon kills the process it spawned; busvisor kills the tree.
        kill_all(&self.killer, svc);
        self.start_failed(id, &BusError::new(ErrorName::TimedOut, text), core, scan);
    }

    fn idle_check(&mut self, id: &str, inv: u64, core: &mut BusState, scan: &procs::Scan) {
        match self.idle_remaining(id, inv, core) {
            None => {}
            Some(Duration::ZERO) => {
                info!(service = %id, "idle; stopping");
                self.begin_stop(id, StopReason::Idle, core, scan);
            }
            Some(left) => self.cmd.after(left, Cmd::IdleCheck(id.to_owned(), inv)),
        }
    }

    fn stop_request(&mut self, id: &str, call: CallRef, core: &mut BusState, scan: &procs::Scan) {
        let Some(svc) = self.svc_mut(id) else {
            return core.complete(&call, Err(no_such_service(id)));
        };
        let names = svc.def.names.clone();
        let stopped = BusError::failed(format!("Service {id} was stopped"));
        // A Start still waiting for this service will not see it run.
        for c in std::mem::take(&mut svc.waiting_start) {
            let e = BusError::new(ErrorName::StartFailed, stopped.text.clone());
            core.complete(&c, Err(e));
        }
        match svc.state() {
            ServiceState::Inactive | ServiceState::Failed => core.complete(&call, Ok(())),
            ServiceState::Restarting => {
                svc.cancel_restart("stopped");
                core.fail_pending(&names, &stopped);
                core.complete(&call, Ok(()));
                // An events follower waits for the restart otherwise.
                self.event(core, id, Event::Stopped);
            }
            ServiceState::Stopping => svc.waiting_stop.push(call),
            _ => {
                svc.waiting_stop.push(call);
                core.fail_pending(&names, &stopped);
                self.begin_stop(id, StopReason::Requested, core, scan);
            }
        }
    }

    /// A Get or GetAll of a service, answered with its processes as they
    /// are now.
    fn properties_request(
        &mut self,
        id: &str,
        call: &CallRef,
        core: &mut BusState,
        scan: &procs::Scan,
    ) {
        self.refresh_pids(id, scan);
        let answer = match self.services.get(id) {
            Some(svc) => super::control::properties_reply(svc, &call.call),
            None => Err(no_such_service(id)),
        };
        core.answer(call, answer);
    }

    /// Send `sig` to every process of the service, or to its main process,
    /// through the pidfds it is held by: a pid reused by another process is
    /// never signalled. Answers how many processes were signalled.
    fn kill_request(
        &mut self,
        id: &str,
        main: bool,
        sig: Signal,
        call: &CallRef,
        core: &mut BusState,
        scan: &procs::Scan,
    ) {
        self.refresh_pids(id, scan);
        let Some(svc) = self.services.get(id) else {
            return core.complete(call, Err(no_such_service(id)));
        };
        let targets: Vec<_> = svc
            .pids
            .held()
            .filter(|(pid, _)| !main || svc.main_pid == Some(*pid))
            .collect();
        if targets.is_empty() {
            let what = if main { "main process" } else { "process" };
            let e = BusError::failed(format!("Service {id} has no {what} to signal"));
            return core.complete(call, Err(e));
        }
        info!(service = %id, ?sig, pids = ?targets.iter().map(|t| t.0).collect::<Vec<_>>(), "signalled by request");
        for (pid, fd) in &targets {
            self.killer.kill(*pid, *fd, sig);
        }
        let n = targets.len() as u32;
        core.answer(call, Ok(crate::wire::reply(&call.call, &(n,))));
    }

    /// `reset-failed`: one service, or every failed one.
    fn reset_failed(&mut self, id: Option<&str>, call: &CallRef, core: &mut BusState) {
        let ids: Vec<String> = match id {
            Some(id) => vec![id.to_owned()],
            None => self
                .services
                .iter()
                .filter(|(_, s)| s.state() == ServiceState::Failed)
                .map(|(id, _)| id.clone())
                .collect(),
        };
        for id in ids {
            if let Some(svc) = self.svc_mut(&id) {
                svc.reset_failed();
            }
        }
        core.complete(call, Ok(()));
    }

    /// `enable`/`disable` once the marker file was written (or not:
    /// `written`): the setting holds until the bus stops where the file
    /// could not be. Answers whether it persists.
    pub(super) fn set_enabled(
        &mut self,
        id: &str,
        enable: bool,
        written: std::io::Result<()>,
        call: &CallRef,
        core: &mut BusState,
    ) {
        let persistent = match written {
            Ok(()) => true,
            Err(e) => {
                let file = self.services.get(id).map(|s| s.def.file.clone());
                warn!(service = %id, "cannot {} it persistently beside {:?} ({e}): until the bus stops", if enable { "enable" } else { "disable" }, file.unwrap_or_default());
                false
            }
        };
        let c = &mut self.catalog;
        if enable {
            c.disabled.remove(id);
            if persistent {
                c.marked.remove(id);
                c.enabled.remove(id);
            } else {
                c.enabled.insert(id.to_owned());
            }
        } else {
            c.enabled.remove(id);
            if persistent {
                c.marked.insert(id.to_owned());
            } else {
                c.disabled.insert(id.to_owned());
            }
        }
        let now = self.catalog.is_enabled(id);
        if let Some(svc) = self.svc_mut(id) {
            svc.enabled = now;
        }
        core.answer(call, Ok(crate::wire::reply(&call.call, &(persistent,))));
    }

    fn start_request(&mut self, id: &str, call: CallRef, core: &mut BusState) {
        let Some(svc) = self.svc_mut(id) else {
            return core.complete(&call, Err(no_such_service(id)));
        };
        if let Some(e) = bad_definition(id, svc) {
            return core.complete(&call, Err(e));
        }
        if svc.state() == ServiceState::Running {
            svc.explicit_start();
            return core.complete(&call, Ok(()));
        }
        if !svc.is_starting()
            && let Some(text) = self.provided_elsewhere(id, core)
        {
            // A second instance would wait for a name it cannot get.
            let e = BusError::new(ErrorName::StartFailed, format!("Service {id}: {text}"));
            return core.complete(&call, Err(e));
        }
        let svc = self.svc_mut(id).expect("looked up above");
        svc.waiting_start.push(call);
        self.explicit_start(id, core);
    }

    /// An explicit start clears the start limit and the backoff.
    fn explicit_start(&mut self, id: &str, core: &mut BusState) {
        let svc = self.svc_mut(id).expect("caller checked");
        svc.explicit_start();
        if !svc.is_starting() && svc.state() != ServiceState::Running {
            self.begin_activation(id, None, core);
        }
    }

    /// Stop, then start, answering once running again.
    fn restart_request(
        &mut self,
        id: &str,
        call: CallRef,
        core: &mut BusState,
        scan: &procs::Scan,
    ) {
        let Some(svc) = self.svc_mut(id) else {
            return core.complete(&call, Err(no_such_service(id)));
        };
        if let Some(e) = bad_definition(id, svc) {
            return core.complete(&call, Err(e));
        }
        match svc.state() {
            ServiceState::Inactive | ServiceState::Failed => {
                if let Some(text) = self.provided_elsewhere(id, core) {
                    let e = BusError::new(ErrorName::StartFailed, format!("Service {id}: {text}"));
                    return core.complete(&call, Err(e));
                }
                let svc = self.svc_mut(id).expect("looked up above");
                svc.waiting_start.push(call);
                self.explicit_start(id, core);
            }
            ServiceState::Restarting => {
                svc.cancel_restart("stopped");
                svc.waiting_start.push(call);
                self.explicit_start(id, core);
            }
            ServiceState::Stopping => svc.waiting_restart.push(call),
            _ => {
                svc.waiting_restart.push(call);
                let names = svc.def.names.clone();
                core.fail_pending(
                    &names,
                    &BusError::failed(format!("Service {id} was stopped")),
                );
                self.begin_stop(id, StopReason::Requested, core, scan);
            }
        }
    }

    /// Shutdown: stop every service; nothing restarts.
    pub(super) fn stop_everything(&mut self, core: &mut BusState, scan: &procs::Scan) {
        self.shutting_down = true;
        let ids: Vec<String> = self.services.keys().cloned().collect();
        for id in ids {
            let names = self.services[&id].def.names.clone();
            core.fail_pending(&names, &BusError::failed("The bus is shutting down"));
            let nothing = self.refresh_pids(&id, scan);
            let svc = self.svc_mut(&id).expect("listed");
            if !nothing && svc.state() != ServiceState::Stopping {
                self.begin_stop(&id, StopReason::Requested, core, scan);
            } else if svc.state() == ServiceState::Restarting {
                svc.cancel_restart("bus shutting down");
            }
        }
    }

    /// Shutdown asked for, and no service is still stopping.
    pub(super) fn shutdown_done(&self) -> bool {
        self.shutting_down
            && !self
                .services
                .values()
                .any(|s| s.state() == ServiceState::Stopping)
    }
}

/// A service whose definition file cannot be loaded cannot start.
fn bad_definition(id: &str, svc: &super::service::Service) -> Option<BusError> {
    (svc.state() == ServiceState::BadDefinition).then(|| {
        let e = svc.definition_error.as_deref().unwrap_or("");
        BusError::new(
            ErrorName::StartFailed,
            format!("the definition of {id} cannot be loaded: {e}"),
        )
    })
}

fn no_such_service(id: &str) -> BusError {
    BusError::new(ErrorName::NoSuchService, format!("no such service: {id}"))
}
