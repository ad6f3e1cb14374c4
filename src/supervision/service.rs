//! One service's runtime state and every transition of its state machine.
//!
//! `inactive → activating → running → stopping → inactive`; `restarting`
//! while a restart waits out its backoff; `failed`. The state is written
//! only here (`set_state` is private); the decisions that pick the next
//! state are pure functions ([`decide_restart`], [`attribute_exit`]) with
//! unit tests, and the supervisor task applies them.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tracing::info;

use super::output::LogEntry;
use super::reaper::ExitKind;
use crate::activation::definition::{LOG_BYTES_PER_LINE, RestartPolicy, ServiceDef, Skipped};
use crate::bus::{CallRef, PeerId, Requester};
use crate::wire::ErrorName;

/// Part of the reason of an idle service whose name another connection owns.
pub(crate) const PROVIDED_ELSEWHERE: &str = "is already provided by";

/// Bytes of output kept per service, at least (lines are up to
/// `output::MAX_LINE`): a small buffer still holds a few long lines.
const LOG_BYTES_MIN: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ServiceState {
    Inactive,
    Activating,
    Running,
    Stopping,
    Restarting,
    Failed,
    /// Its definition file could not be read or parsed: it cannot start.
    BadDefinition,
}

impl ServiceState {
    pub(crate) fn as_str(&self) -> &'static str {
        match self {
            ServiceState::Inactive => "inactive",
            ServiceState::Activating => "activating",
            ServiceState::Running => "running",
            ServiceState::Stopping => "stopping",
            ServiceState::Restarting => "restarting",
            ServiceState::Failed => "failed",
            ServiceState::BadDefinition => "bad-definition",
        }
    }
}

/// Why a stop is happening: decides what follows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StopReason {
    /// Asked for (control API, shutdown): no restart.
    Requested,
    /// Idle timeout: the next message activates it again.
    Idle,
    /// The main process or the name went away: the restart policy decides.
    Ended,
    /// Start timeout or start failure: waiters were told already.
    Failed,
}

impl StopReason {
    fn text(self) -> &'static str {
        match self {
            StopReason::Requested => "stop requested",
            StopReason::Idle => "idle timeout",
            StopReason::Ended => "main process or name gone",
            StopReason::Failed => "start failed",
        }
    }
}

/// The last failure of a service: what `busvisor status` shows until
/// `reset-failed`, whatever happened since (a restart, a launcher's exit 0).
#[derive(Debug, Clone)]
pub(crate) struct LastFailure {
    pub(crate) text: String,
    pub(crate) at: SystemTime,
}

#[derive(Debug, Clone)]
pub(crate) struct LastExit {
    pub(crate) pid: i32,
    pub(crate) kind: ExitKind,
    pub(crate) at: SystemTime,
}

/// One service's runtime state.
pub(crate) struct Service {
    pub(crate) def: Arc<ServiceDef>,
    state: ServiceState,
    reason: String,
    /// Bumped at every start; timers carry it so stale ones are ignored.
    pub(crate) invocation: u64,
    pub(crate) token: String,
    pub(crate) launched_pid: Option<i32>,
    /// The session of the current invocation (busvisor starts each in a
    /// session of its own, led by the launched process). Kept after that
    /// process is gone: a daemon it left behind, without the token, is
    /// still known by it (the kernel reuses no pid that names a session).
    pub(crate) session: Option<i32>,
    pub(crate) main_pid: Option<i32>,
    pub(crate) pids: super::procs::ProcSet,
    pub(crate) peer: Option<PeerId>,
    pub(crate) requester: Option<Requester>,
    pub(crate) started_at: Option<SystemTime>,
    pub(crate) changed_at: SystemTime,
    pub(crate) restarts: u32,
    pub(crate) consecutive_failures: u32,
    pub(crate) recent_starts: VecDeque<Instant>,
    pub(crate) last_exit: Option<LastExit>,
    pub(crate) next_restart: Option<SystemTime>,
    pub(crate) stop_reason: Option<StopReason>,
    /// The failure of the previous main process, for the restart decision.
    pub(crate) ended_with_failure: bool,
    /// When the start limit was hit: activation is refused for the
    /// start-limit interval from then, or until an explicit start.
    pub(crate) start_limited: Option<Instant>,
    pub(crate) logs: VecDeque<LogEntry>,
    /// The bytes in `logs`.
    logs_bytes: usize,
    /// Why its definition file could not be loaded (state `bad-definition`
    /// while idle; a running service keeps the definition it started with).
    pub(crate) definition_error: Option<String>,
    /// The last failure, kept until `reset-failed`.
    pub(crate) last_failure: Option<LastFailure>,
    /// False when `busvisor disable` stopped messages from activating it.
    pub(crate) enabled: bool,
    /// Control calls waiting for this service to stop, to start, or to stop
    /// and start again; answered where that completes.
    pub(crate) waiting_stop: Vec<CallRef>,
    pub(crate) waiting_start: Vec<CallRef>,
    pub(crate) waiting_restart: Vec<CallRef>,
    /// The current start is an automatic restart (its failure goes back to
    /// the restart policy instead of ending the activation).
    pub(crate) auto_restart: bool,
    /// This start was handed to systemd (`--systemd-activation`): its
    /// processes are not busvisor's.
    pub(crate) via_systemd: bool,
    /// The error of the last failed restart attempt, for the final report.
    pub(crate) last_start_error: Option<String>,
}

impl Service {
    /// A definition file that could not be loaded, shown as its own entry.
    pub(crate) fn bad(skipped: &Skipped) -> Self {
        let def = ServiceDef::with_defaults(
            skipped.id.clone(),
            Vec::new(),
            Ok(Vec::new()),
            skipped.file.clone(),
            skipped.source,
        );
        let mut svc = Service::new(Arc::new(def));
        svc.definition_broken(Some(skipped.error.clone()));
        svc
    }

    pub(crate) fn new(def: Arc<ServiceDef>) -> Self {
        Service {
            def,
            state: ServiceState::Inactive,
            reason: String::new(),
            invocation: 0,
            token: String::new(),
            launched_pid: None,
            session: None,
            main_pid: None,
            pids: super::procs::ProcSet::default(),
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
            start_limited: None,
            logs: VecDeque::new(),
            logs_bytes: 0,
            definition_error: None,
            last_failure: None,
            enabled: true,
            waiting_stop: Vec::new(),
            waiting_start: Vec::new(),
            waiting_restart: Vec::new(),
            auto_restart: false,
            via_systemd: false,
            last_start_error: None,
        }
    }

    pub(crate) fn state(&self) -> ServiceState {
        self.state
    }

    pub(crate) fn reason(&self) -> &str {
        &self.reason
    }

    fn set_state(&mut self, state: ServiceState, reason: impl Into<String>) {
        let reason = reason.into();
        // A broken definition is logged once, as the scan's warning.
        if (state != self.state || reason != self.reason) && state != ServiceState::BadDefinition {
            info!(service = %self.def.id, from = self.state.as_str(), to = state.as_str(), %reason, "state");
        }
        self.state = state;
        self.reason = reason;
        self.changed_at = SystemTime::now();
    }

    /// A service in these states takes new messages into its queue instead of
    /// being started again.
    pub(crate) fn is_starting(&self) -> bool {
        matches!(
            self.state,
            ServiceState::Activating | ServiceState::Restarting
        ) || (self.state == ServiceState::Stopping && self.stop_reason == Some(StopReason::Idle))
    }

    /// Neither running nor on its way somewhere: its definition may change.
    pub(crate) fn is_idle(&self) -> bool {
        matches!(
            self.state,
            ServiceState::Inactive | ServiceState::Failed | ServiceState::BadDefinition
        )
    }

    pub(crate) fn push_log(&mut self, entry: LogEntry) {
        let lines = self.def.log_lines as usize;
        let bytes = (lines * LOG_BYTES_PER_LINE).max(LOG_BYTES_MIN);
        self.logs_bytes += entry.size();
        self.logs.push_back(entry);
        while self.logs.len() > lines || self.logs_bytes > bytes {
            let Some(old) = self.logs.pop_front() else {
                break;
            };
            self.logs_bytes -= old.size();
        }
    }

    /// Remember a failure (see [`LastFailure`]).
    pub(crate) fn record_failure(&mut self, text: impl Into<String>) {
        self.last_failure = Some(LastFailure {
            text: text.into(),
            at: SystemTime::now(),
        });
    }

    /// Whether the reason says another connection provides its name.
    pub(crate) fn is_provided_elsewhere(&self) -> bool {
        self.reason.contains(PROVIDED_ELSEWHERE)
    }

    // The transitions.

    /// → activating, for a start asked for by a message or a call.
    pub(crate) fn activation_requested(&mut self, requester: Option<Requester>) {
        self.via_systemd = false;
        self.requester = requester;
        self.launched_pid = None;
        self.auto_restart = false;
        self.set_state(ServiceState::Activating, "activation requested");
    }

    /// The token the next invocation will have. It names the invocation's
    /// cgroup too, so it is a valid file name: the id's unusual characters
    /// replaced, its length bounded.
    pub(crate) fn next_token(&self, bus_pid: u32) -> String {
        let id: String = self
            .def
            .id
            .chars()
            .take(160)
            .map(|c| match c {
                'A'..='Z' | 'a'..='z' | '0'..='9' | '.' | '_' | '-' => c,
                _ => '_',
            })
            .collect();
        format!("{id}-{bus_pid}-{}", self.invocation + 1)
    }

    /// A new process is about to be spawned: a new invocation and token.
    pub(crate) fn new_invocation(&mut self, bus_pid: u32) {
        self.token = self.next_token(bus_pid);
        self.invocation += 1;
        self.recent_starts.push_back(Instant::now());
    }

    /// The process is spawned (still activating, until the name is taken).
    pub(crate) fn spawned(&mut self, pid: i32) {
        self.launched_pid = Some(pid);
        self.session = Some(pid);
        self.pids.insert(pid);
        self.started_at = Some(SystemTime::now());
        self.set_state(ServiceState::Activating, format!("started pid {pid}"));
    }

    /// Its name was taken by `owner` (pid `main` if inside the tree): running.
    pub(crate) fn ready(&mut self, name: &str, owner: PeerId, main: Option<i32>) {
        if let Some(pid) = main {
            self.main_pid = Some(pid);
            self.pids.insert(pid);
        }
        self.peer = Some(owner);
        self.auto_restart = false;
        self.last_start_error = None;
        self.set_state(ServiceState::Running, format!("{name} taken"));
    }

    /// An idle service: another connection owns one of its names (`by`:
    /// which and who), or no longer. The state stays.
    pub(crate) fn provided_elsewhere(&mut self, by: Option<String>) {
        let reason = by.unwrap_or_else(|| "its name was released".to_owned());
        self.set_state(self.state, reason);
    }

    /// The start failed for good: failed.
    pub(crate) fn start_failed(&mut self, text: &str) {
        self.set_state(ServiceState::Failed, text.to_owned());
    }

    /// The stop signal went out: stopping.
    pub(crate) fn stopping(&mut self, reason: StopReason) {
        self.stop_reason = Some(reason);
        self.peer = None;
        self.set_state(ServiceState::Stopping, reason.text());
    }

    /// A pending restart is cancelled (stop request, shutdown).
    pub(crate) fn cancel_restart(&mut self, why: &str) {
        self.next_restart = None;
        self.invocation += 1; // fences the restart timer
        self.set_state(ServiceState::Inactive, why.to_owned());
    }

    /// Every process is gone: forget them, and say what the stop was for.
    pub(crate) fn processes_gone(&mut self) -> (Option<StopReason>, bool) {
        self.launched_pid = None;
        self.main_pid = None;
        self.peer = None;
        let failure = std::mem::take(&mut self.ended_with_failure);
        (self.stop_reason.take(), failure)
    }

    /// After a stop with nothing to follow: inactive, or failed.
    pub(crate) fn settle(&mut self, state: ServiceState, why: &str) {
        debug_assert!(matches!(
            state,
            ServiceState::Inactive | ServiceState::Failed
        ));
        match &self.definition_error {
            // Its file broke while it ran: now it shows.
            Some(e) if state == ServiceState::Inactive => {
                let e = e.clone();
                self.set_state(ServiceState::BadDefinition, e);
            }
            _ => self.set_state(state, why.to_owned()),
        }
    }

    /// After a failed start, leftovers went: failed unless something moved
    /// on, with the cause of the failure (a timeout stays a timeout).
    pub(crate) fn failed_start_cleaned(&mut self) {
        if self.state == ServiceState::Stopping {
            let why = self
                .last_failure
                .as_ref()
                .map_or_else(|| "start failed".to_owned(), |f| f.text.clone());
            self.set_state(ServiceState::Failed, why);
        }
    }

    /// `reset-failed`: a failed service becomes inactive, its start limit,
    /// backoff and last failure forgotten. False when it was not failed.
    pub(crate) fn reset_failed(&mut self) -> bool {
        let was_failed = self.state == ServiceState::Failed;
        self.start_limited = None;
        self.consecutive_failures = 0;
        self.restarts = 0;
        self.last_failure = None;
        if was_failed {
            self.set_state(ServiceState::Inactive, "failure reset");
        }
        was_failed
    }

    /// Its definition file can no longer be loaded (`error`), or again
    /// (`None`). Only an idle service changes state: a running one keeps
    /// the definition it started with.
    pub(crate) fn definition_broken(&mut self, error: Option<String>) {
        self.definition_error = error;
        match (&self.definition_error, self.is_idle()) {
            (Some(e), true) => {
                let e = e.clone();
                self.set_state(ServiceState::BadDefinition, e);
            }
            (None, true) if self.state == ServiceState::BadDefinition => {
                self.set_state(ServiceState::Inactive, "definition fixed");
            }
            _ => {}
        }
    }

    /// Apply a restart decision for a stop that ended the run.
    pub(crate) fn apply_restart(&mut self, decision: Decision) {
        self.consecutive_failures = decision.consecutive_failures;
        match decision.next {
            Next::Inactive => self.set_state(ServiceState::Inactive, "exited"),
            Next::Failed => self.set_state(ServiceState::Failed, "exited with failure"),
            Next::StartLimited => {
                self.start_limited = Some(Instant::now());
                self.auto_restart = false;
                self.set_state(ServiceState::Failed, "start limit hit");
            }
            Next::Restart(delay) => {
                self.restarts += 1;
                self.next_restart = Some(SystemTime::now() + delay);
                self.set_state(ServiceState::Restarting, format!("restart in {delay:?}"));
            }
        }
    }

    /// The restart delay ran out: activating again, as an automatic restart.
    pub(crate) fn restart_due(&mut self) {
        self.next_restart = None;
        self.auto_restart = true;
        self.set_state(ServiceState::Activating, "restarting");
    }

    /// How long activation is still refused for the start limit (None: not
    /// refused). Once the interval has passed since the limit was hit, the
    /// limit and the backoff start over, as after an explicit start; the
    /// failure stays in the state until the next activation changes it.
    pub(crate) fn start_limit_left(&mut self) -> Option<Duration> {
        let at = self.start_limited?;
        let left = self.def.start_limit_interval.saturating_sub(at.elapsed());
        if left.is_zero() {
            self.start_limited = None;
            self.consecutive_failures = 0;
            return None;
        }
        Some(left)
    }

    /// An explicit start: the start limit and the backoff start over.
    pub(crate) fn explicit_start(&mut self) {
        self.start_limited = None;
        self.restarts = 0;
        self.consecutive_failures = 0;
    }

    /// The restart decision for this service's run that just ended.
    pub(crate) fn decide_restart(&mut self, failure: bool) -> Decision {
        let now = Instant::now();
        let interval = self.def.start_limit_interval;
        while self
            .recent_starts
            .front()
            .is_some_and(|t| now.duration_since(*t) > interval)
        {
            self.recent_starts.pop_front();
        }
        let ran_for = self.started_at.and_then(|t| t.elapsed().ok());
        decide_restart(
            &RestartRules::of(&self.def),
            failure,
            ran_for,
            self.consecutive_failures,
            self.recent_starts.len(),
        )
    }
}

/// The parts of a definition the restart decision reads.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RestartRules {
    pub(crate) policy: RestartPolicy,
    pub(crate) delay: Duration,
    pub(crate) delay_max: Duration,
    pub(crate) limit_burst: u32,
    pub(crate) limit_interval: Duration,
}

impl RestartRules {
    pub(crate) fn of(def: &ServiceDef) -> Self {
        RestartRules {
            policy: def.restart,
            delay: def.restart_delay,
            delay_max: def.restart_delay_max,
            limit_burst: def.start_limit_burst,
            limit_interval: def.start_limit_interval,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    Inactive,
    Failed,
    /// More than `limit_burst` starts within `limit_interval`: failed until
    /// an explicit start.
    StartLimited,
    Restart(Duration),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Decision {
    pub(crate) next: Next,
    pub(crate) consecutive_failures: u32,
}

/// What follows a run that ended (its main process or its name gone):
/// the policy (`no`, `on-failure`, `always`), a delay that doubles per
/// consecutive failure up to the cap, reset by a run longer than the
/// start-limit interval and the cap, and the start limit, counted over
/// `recent_starts` starts within the interval.
pub(crate) fn decide_restart(
    rules: &RestartRules,
    failure: bool,
    ran_for: Option<Duration>,
    consecutive_failures: u32,
    recent_starts: usize,
) -> Decision {
    let stable = ran_for.is_some_and(|d| d > rules.limit_interval.max(rules.delay_max));
    let mut failures = if stable { 0 } else { consecutive_failures };
    if failure {
        failures += 1;
    }
    let restart = match rules.policy {
        RestartPolicy::Always => true,
        RestartPolicy::OnFailure => failure,
        RestartPolicy::No => false,
    };
    let next = if !restart {
        if failure {
            Next::Failed
        } else {
            Next::Inactive
        }
    } else if !rules.limit_interval.is_zero() && recent_starts as u32 >= rules.limit_burst {
        Next::StartLimited
    } else {
        let shift = failures.saturating_sub(1).min(20);
        Next::Restart(
            rules
                .delay
                .saturating_mul(1u32 << shift)
                .min(rules.delay_max),
        )
    };
    Decision {
        next,
        consecutive_failures: failures,
    }
}

/// What the supervisor knows about a process that just exited.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ExitFacts {
    pub(crate) state: ServiceState,
    pub(crate) stop_reason: Option<StopReason>,
    pub(crate) kind: ExitKind,
    /// The process busvisor spawned for this start.
    pub(crate) is_launched: bool,
    /// The process that took the name.
    pub(crate) is_main: bool,
    pub(crate) launched_known: bool,
    pub(crate) main_known: bool,
    /// No other process of the service is left.
    pub(crate) nothing_left: bool,
}

/// What an exit means for its service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ExitMeaning {
    /// Nothing to do (a helper process of a running service, say).
    Nothing,
    /// The launcher of a daemon that forked: keep waiting for the name.
    DaemonForked,
    /// Exit 0 and no process found: look again shortly (a process can be
    /// caught between fork and exec) before concluding.
    RecheckSoon,
    /// The start failed before the name was taken.
    StartFailed(ErrorName, String),
    /// The running service's main process (or all of it) ended.
    RunEnded,
    /// The last process of a stopping service is gone.
    StopComplete,
}

/// Whether the exit counts as a failure, and what it means. Dying of the
/// stop signal busvisor sent is no failure.
pub(crate) fn attribute_exit(f: &ExitFacts, first_name: &str) -> (bool, ExitMeaning) {
    let asked_to_stop = f.state == ServiceState::Stopping
        && matches!(
            f.stop_reason,
            Some(StopReason::Requested) | Some(StopReason::Idle)
        );
    let failure = !f.kind.is_success() && !asked_to_stop;
    let meaning = match f.state {
        ServiceState::Activating if f.is_launched || !f.launched_known => {
            match f.kind {
                ExitKind::Code(0) if f.is_launched && !f.nothing_left => ExitMeaning::DaemonForked,
                // A forked process of a daemon ended, others remain.
                _ if !f.is_launched && !f.nothing_left => ExitMeaning::Nothing,
                ExitKind::Code(0) => ExitMeaning::RecheckSoon,
                ExitKind::Code(c) => ExitMeaning::StartFailed(
                    ErrorName::SpawnChildExited,
                    format!("Process {first_name} exited with status {c}"),
                ),
                ExitKind::Signal(s) => ExitMeaning::StartFailed(
                    ErrorName::SpawnChildSignaled,
                    format!("Process {first_name} received signal {s}"),
                ),
            }
        }
        ServiceState::Running
            if f.is_main || (f.is_launched && !f.main_known) || f.nothing_left =>
        {
            ExitMeaning::RunEnded
        }
        ServiceState::Stopping if f.nothing_left => ExitMeaning::StopComplete,
        _ => ExitMeaning::Nothing,
    };
    (failure, meaning)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn rules(policy: RestartPolicy) -> RestartRules {
        RestartRules {
            policy,
            delay: 100 * MS,
            delay_max: 1000 * MS,
            limit_burst: 5,
            limit_interval: 10_000 * MS,
        }
    }

    #[test]
    fn policy_decides_whether_to_restart() {
        let r = |p, failure| decide_restart(&rules(p), failure, Some(MS), 0, 1).next;
        assert_eq!(r(RestartPolicy::No, true), Next::Failed);
        assert_eq!(r(RestartPolicy::No, false), Next::Inactive);
        assert_eq!(r(RestartPolicy::OnFailure, false), Next::Inactive);
        assert_eq!(r(RestartPolicy::OnFailure, true), Next::Restart(100 * MS));
        assert_eq!(r(RestartPolicy::Always, false), Next::Restart(100 * MS));
    }

    #[test]
    fn the_delay_doubles_per_consecutive_failure_up_to_the_cap() {
        let rules = rules(RestartPolicy::OnFailure);
        let mut failures = 0;
        let mut delays = Vec::new();
        for _ in 0..6 {
            let d = decide_restart(&rules, true, Some(MS), failures, 0);
            failures = d.consecutive_failures;
            let Next::Restart(delay) = d.next else {
                panic!("{d:?}")
            };
            delays.push(delay.as_millis());
        }
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
        // A clean exit under `always` does not lengthen it.
        let d = decide_restart(&self::rules(RestartPolicy::Always), false, Some(MS), 3, 0);
        assert_eq!(
            (d.next, d.consecutive_failures),
            (Next::Restart(400 * MS), 3)
        );
    }

    #[test]
    fn a_stable_run_resets_the_backoff() {
        let rules = rules(RestartPolicy::OnFailure);
        let long = Some(10_001 * MS);
        let d = decide_restart(&rules, true, long, 4, 0);
        assert_eq!(
            (d.next, d.consecutive_failures),
            (Next::Restart(100 * MS), 1)
        );
        // Exactly the interval is not longer than it.
        let d = decide_restart(&rules, true, Some(10_000 * MS), 4, 0);
        assert_eq!(d.consecutive_failures, 5);
    }

    #[test]
    fn the_start_limit_ends_in_failed() {
        let rules = rules(RestartPolicy::Always);
        assert_eq!(
            decide_restart(&rules, true, None, 0, 4).next,
            Next::Restart(100 * MS)
        );
        assert_eq!(
            decide_restart(&rules, true, None, 0, 5).next,
            Next::StartLimited
        );
        // A zero interval switches the limit off.
        let off = RestartRules {
            limit_interval: Duration::ZERO,
            ..rules
        };
        assert!(matches!(
            decide_restart(&off, true, None, 0, 50).next,
            Next::Restart(_)
        ));
        // No restart wanted: the limit does not matter.
        let no = RestartRules {
            policy: RestartPolicy::No,
            ..rules
        };
        assert_eq!(decide_restart(&no, true, None, 0, 50).next, Next::Failed);
    }

    fn service() -> Service {
        let def = ServiceDef::with_defaults(
            "x".into(),
            vec!["org.x.Y".into()],
            Ok(vec!["/bin/true".into()]),
            "/x.toml".into(),
            crate::activation::definition::Source::Toml,
        );
        Service::new(Arc::new(def))
    }

    #[test]
    fn a_broken_definition_shows_once_the_service_is_idle() {
        let mut s = service();
        s.activation_requested(None);
        s.definition_broken(Some("/x.toml:1:1: bad".into()));
        assert_eq!(s.state(), ServiceState::Activating, "a start goes on");
        s.stopping(StopReason::Requested);
        s.settle(ServiceState::Inactive, "stopped");
        assert_eq!(s.state(), ServiceState::BadDefinition);
        assert_eq!(s.reason(), "/x.toml:1:1: bad");
        s.definition_broken(None);
        assert_eq!(s.state(), ServiceState::Inactive);
    }

    #[test]
    fn a_failure_stays_until_reset() {
        let mut s = service();
        s.activation_requested(None);
        s.record_failure("timed out");
        s.start_failed("timed out");
        s.stopping(StopReason::Failed);
        s.failed_start_cleaned();
        assert_eq!((s.state(), s.reason()), (ServiceState::Failed, "timed out"));
        assert!(s.reset_failed());
        assert_eq!(s.state(), ServiceState::Inactive);
        assert!(s.last_failure.is_none());
        assert!(!s.reset_failed(), "not failed any more");
    }

    fn exit(state: ServiceState, kind: ExitKind) -> ExitFacts {
        ExitFacts {
            state,
            stop_reason: None,
            kind,
            is_launched: true,
            is_main: false,
            launched_known: true,
            main_known: false,
            nothing_left: true,
        }
    }

    #[test]
    fn exits_while_activating() {
        let a = |f: ExitFacts| attribute_exit(&f, "org.x.Y");
        let forked = ExitFacts {
            nothing_left: false,
            ..exit(ServiceState::Activating, ExitKind::Code(0))
        };
        assert_eq!(a(forked), (false, ExitMeaning::DaemonForked));
        let gone = exit(ServiceState::Activating, ExitKind::Code(0));
        assert_eq!(a(gone), (false, ExitMeaning::RecheckSoon));
        let (failure, m) = a(exit(ServiceState::Activating, ExitKind::Code(3)));
        assert!(failure);
        assert_eq!(
            m,
            ExitMeaning::StartFailed(
                ErrorName::SpawnChildExited,
                "Process org.x.Y exited with status 3".into()
            )
        );
        let (_, m) = a(exit(ServiceState::Activating, ExitKind::Signal(9)));
        assert!(matches!(
            m,
            ExitMeaning::StartFailed(ErrorName::SpawnChildSignaled, _)
        ));
        let helper = ExitFacts {
            is_launched: false,
            nothing_left: false,
            ..exit(ServiceState::Activating, ExitKind::Code(1))
        };
        assert_eq!(a(helper).1, ExitMeaning::Nothing);
    }

    #[test]
    fn exits_while_running_and_stopping() {
        let a = |f: ExitFacts| attribute_exit(&f, "org.x.Y");
        let main = ExitFacts {
            is_launched: false,
            is_main: true,
            main_known: true,
            nothing_left: false,
            ..exit(ServiceState::Running, ExitKind::Code(1))
        };
        assert_eq!(a(main), (true, ExitMeaning::RunEnded));
        let helper = ExitFacts {
            is_launched: false,
            main_known: true,
            nothing_left: false,
            ..exit(ServiceState::Running, ExitKind::Code(1))
        };
        assert_eq!(a(helper).1, ExitMeaning::Nothing);
        // Killed by the stop busvisor asked for: no failure.
        let stopped = ExitFacts {
            stop_reason: Some(StopReason::Requested),
            ..exit(ServiceState::Stopping, ExitKind::Signal(15))
        };
        assert_eq!(a(stopped), (false, ExitMeaning::StopComplete));
        let ended = ExitFacts {
            stop_reason: Some(StopReason::Ended),
            ..exit(ServiceState::Stopping, ExitKind::Signal(15))
        };
        assert_eq!(a(ended), (true, ExitMeaning::StopComplete));
    }
}
