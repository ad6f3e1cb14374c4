//! The supervisor's D-Bus face: one signal per transition of every service
//! on `org.busvisor.Supervisor1`, each with the next event serial, and
//! `PropertiesChanged` on the service's object with what changed.
//!
//! Every lifecycle signal is built here, by [`Announcer::event`]. Events go
//! out under the core lock, through the bus's broadcast path, so match rules
//! and monitors apply and the serial order is the delivery order. Only
//! services marked dirty since the last announcement are compared: with
//! nothing happening, nothing is computed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::activation::definition::Source;
use crate::bus::{BusState, Requester};
use crate::supervision::output::LogEntry;
use crate::supervision::reaper::ExitKind;
use crate::supervision::service::Service;
use crate::wire::names::{
    IFACE_PROPS, SERVICE_IFACE, SERVICE_PATH_PREFIX, SUPERVISOR_IFACE, SUPERVISOR_PATH,
};
use crate::wire::{self, OwnedVariant};

/// A service id as an object path element: bytes outside [A-Za-z0-9]
/// become `_xx` (systemd's escaping).
pub(crate) fn escape_id(id: &str) -> String {
    let mut out = String::with_capacity(id.len() * 2);
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() {
            out.push(b as char);
        } else {
            out.push_str(&format!("_{b:02x}"));
        }
    }
    if out.is_empty() {
        out.push('_');
    }
    out
}

pub(crate) fn unescape_id(elem: &str) -> Option<String> {
    let bytes = elem.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'_' {
            let hex = elem.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

pub(crate) fn service_path(id: &str) -> String {
    format!("{SERVICE_PATH_PREFIX}{}", escape_id(id))
}

pub(crate) fn micros(t: Option<SystemTime>) -> u64 {
    t.and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_micros() as u64)
}

/// The properties of a service object, in the order of the API document
/// (and of `busvisor status`).
pub const PROPERTY_NAMES: &[&str] = &[
    "Id",
    "Names",
    "DefinitionFile",
    "ExecPath",
    "State",
    "Reason",
    "MainPID",
    "PIDs",
    "Requester",
    "RequesterPID",
    "StartTime",
    "StateChangeTime",
    "Restarts",
    "LastExitPID",
    "LastExitStatus",
    "LastExitSignal",
    "LastExitTime",
    "NextRestartTime",
    "IdleTimeout",
    "Source",
    "Enabled",
    "DefinitionError",
    "LastFailure",
    "LastFailureTime",
];

/// Every property of a service, in [`PROPERTY_NAMES`]' order.
pub(crate) fn properties(svc: &Service) -> Vec<(&'static str, OwnedVariant)> {
    use wire::owned as v;
    let (exit_pid, exit_status, exit_signal, exit_time) = match &svc.last_exit {
        Some(e) => {
            let (status, signal) = match e.kind {
                ExitKind::Code(c) => (c, 0),
                ExitKind::Signal(s) => (-1, s),
            };
            (e.pid as u32, status, signal, micros(Some(e.at)))
        }
        None => (0, -1, 0, 0),
    };
    let r = svc.requester.clone().unwrap_or_default();
    let values = [
        v(svc.def.id.clone()),
        v(svc.def.names.clone()),
        v(svc.def.file.to_string_lossy().into_owned()),
        v(svc
            .def
            .exec_path
            .as_ref()
            .map_or(String::new(), |p| p.to_string_lossy().into_owned())),
        v(svc.state().as_str()),
        v(svc.reason().to_owned()),
        v(svc.main_pid.unwrap_or(0) as u32),
        v(svc.pids.iter().map(|p| p as u32).collect::<Vec<u32>>()),
        v(r.name),
        v(r.pid.unwrap_or(0)),
        v(micros(svc.started_at)),
        v(micros(Some(svc.changed_at))),
        v(svc.restarts),
        v(exit_pid),
        v(exit_status),
        v(exit_signal),
        v(exit_time),
        v(micros(svc.next_restart)),
        v(svc.def.idle_timeout.map_or(0, |d| d.as_micros() as u64)),
        v(match svc.def.source {
            Source::Toml => "busvisor",
            Source::DBusService => "dbus",
        }),
        v(svc.enabled),
        v(svc.definition_error.clone().unwrap_or_default()),
        v(svc
            .last_failure
            .as_ref()
            .map_or(String::new(), |f| f.text.clone())),
        v(micros(svc.last_failure.as_ref().map(|f| f.at))),
    ];
    PROPERTY_NAMES.iter().copied().zip(values).collect()
}

/// One transition worth a signal.
pub(crate) enum Event<'a> {
    ActivationRequested(Option<&'a Requester>),
    Started(i32),
    Ready(Option<i32>),
    Exited {
        pid: i32,
        kind: ExitKind,
        failure: bool,
    },
    Restarting {
        attempt: u32,
        delay: Duration,
    },
    Failed(&'a str),
    Stopping,
    Stopped,
    IdleStopped,
}

/// The event serial, what was last announced of each service, and which
/// services changed since.
#[derive(Default)]
pub(crate) struct Announcer {
    serial: u64,
    announced: HashMap<String, Vec<(&'static str, OwnedVariant)>>,
    dirty: BTreeSet<String>,
}

impl Announcer {
    /// The serial of the last event.
    pub(crate) fn serial(&self) -> u64 {
        self.serial
    }

    /// `id`'s properties may have changed.
    pub(crate) fn touch(&mut self, id: &str) {
        if !self.dirty.contains(id) {
            self.dirty.insert(id.to_owned());
        }
    }

    /// Send PropertiesChanged for what changed in the dirty services.
    pub(crate) fn flush(&mut self, services: &BTreeMap<String, Service>, core: &mut BusState) {
        let listening = core.wants_signals();
        for id in std::mem::take(&mut self.dirty) {
            let Some(svc) = services.get(&id) else {
                self.announced.remove(&id);
                continue;
            };
            if !listening {
                // Nobody to tell: the next change announces everything.
                self.announced.remove(&id);
                continue;
            }
            let now = properties(svc);
            let before = self.announced.get(&id);
            let changed: HashMap<&'static str, &OwnedVariant> = now
                .iter()
                .filter(|(k, v)| {
                    before
                        .and_then(|b| b.iter().find(|(bk, _)| bk == k))
                        .is_none_or(|(_, bv)| bv != v)
                })
                .map(|(k, v)| (*k, v))
                .collect();
            if !changed.is_empty() {
                let invalidated: Vec<&str> = Vec::new();
                let body = (SERVICE_IFACE, &changed, &invalidated);
                let path = service_path(&id);
                if let Some(sig) =
                    wire::signal(&path, IFACE_PROPS, "PropertiesChanged", None, &body)
                {
                    core.emit_event(&sig);
                }
            }
            self.announced.insert(id, now);
        }
    }

    /// Announce `event` of service `id`, its properties first, so that a
    /// client acting on the event reads them up to date.
    pub(crate) fn event(
        &mut self,
        services: &BTreeMap<String, Service>,
        core: &mut BusState,
        id: &str,
        event: Event<'_>,
    ) {
        self.touch(id);
        self.flush(services, core);
        self.serial += 1;
        let s = self.serial;
        let sig = match event {
            Event::ActivationRequested(r) => {
                let (who, pid) =
                    r.map_or((String::new(), 0), |r| (r.name.clone(), r.pid.unwrap_or(0)));
                signal("ActivationRequested", &(s, id, who, pid))
            }
            Event::Started(pid) => signal("Started", &(s, id, pid as u32)),
            Event::Ready(main) => signal("Ready", &(s, id, main.unwrap_or(0) as u32)),
            Event::Exited { pid, kind, failure } => {
                let (how, status) = match kind {
                    ExitKind::Code(c) => ("exited", c),
                    ExitKind::Signal(sig) => ("killed", sig),
                };
                signal("Exited", &(s, id, pid as u32, how, status, failure))
            }
            Event::Restarting { attempt, delay } => {
                signal("Restarting", &(s, id, attempt, delay.as_millis() as u64))
            }
            Event::Failed(reason) => signal("Failed", &(s, id, reason)),
            Event::Stopping => signal("Stopping", &(s, id)),
            Event::Stopped => signal("Stopped", &(s, id)),
            Event::IdleStopped => signal("IdleStopped", &(s, id)),
        };
        if let Some(sig) = sig {
            core.emit_event(&sig);
        }
    }
}

fn signal<B>(member: &str, body: &B) -> Option<wire::Message>
where
    B: serde::Serialize + wire::DynamicType,
{
    wire::signal(SUPERVISOR_PATH, SUPERVISOR_IFACE, member, None, body)
}

/// What a subscriber may have queued before it gets no more `LogLine`s:
/// output is not worth the memory of a peer that does not read (a bus's
/// `max_outgoing_bytes` is 1 GB on a session bus).
const LOG_QUEUE_CAP: usize = 1024 * 1024;

/// Lines of a service's output, for `busvisor logs -f` (no serial: not a
/// transition): id, pid, line, then (added after the first three, so that
/// clients reading those keep working) the stream and the time in µs.
pub(crate) fn log_lines(core: &mut BusState, id: &str, entries: &[LogEntry]) {
    if !core.wants_signals() {
        return;
    }
    for e in entries {
        let body = (
            id,
            e.pid as u32,
            &e.line,
            e.stream.as_str(),
            micros(Some(e.time)),
        );
        if let Some(sig) = signal("LogLine", &body) {
            core.emit_lossy(&sig, LOG_QUEUE_CAP);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_escaping_round_trips() {
        for id in ["org.busvisor.Example.Echo", "a-b_c", "x"] {
            let e = escape_id(id);
            assert!(e.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'));
            assert_eq!(unescape_id(&e).as_deref(), Some(id));
        }
        assert_eq!(escape_id("a.b"), "a_2eb");
    }
}
