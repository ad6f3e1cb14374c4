//! busvisor's own lifecycle events: one signal per transition of every
//! service on `org.busvisor.Supervisor1`, each with the next event serial,
//! and `PropertiesChanged` on the service's object with what changed.
//!
//! Events are emitted under the routing core's lock, through the same
//! broadcast path as every signal, so match rules and monitors apply and the
//! serial order is the delivery order.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use zbus::message::Message;
use zbus::wire::{OwnedVariant, Variant};

use crate::router::{BUS_NAME, State};
use crate::supervision::Service;
use crate::supervision::reaper::ExitKind;

pub const NAME: &str = "org.busvisor.Supervisor1";
pub const PATH: &str = "/org/busvisor/Supervisor1";
pub const IFACE: &str = "org.busvisor.Supervisor1";
pub const SERVICE_IFACE: &str = "org.busvisor.Service1";
pub const SERVICE_PATH_PREFIX: &str = "/org/busvisor/Supervisor1/service/";

/// A service id as an object path element: bytes outside [A-Za-z0-9]
/// become `_xx` (systemd's escaping).
pub fn escape_id(id: &str) -> String {
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

pub fn unescape_id(elem: &str) -> Option<String> {
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

pub fn service_path(id: &str) -> String {
    format!("{SERVICE_PATH_PREFIX}{}", escape_id(id))
}

pub fn micros(t: Option<SystemTime>) -> u64 {
    t.and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_micros() as u64)
}

/// Every property of a service, in the order of the API document.
pub fn properties(svc: &Service) -> Vec<(&'static str, OwnedVariant)> {
    fn v<'a, T: Into<Variant<'a>>>(x: T) -> OwnedVariant {
        OwnedVariant::try_from(x.into()).expect("plain values always convert")
    }
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
    let (requester, requester_pid) = svc
        .requester
        .clone()
        .map(|(n, p)| (n, p.unwrap_or(0)))
        .unwrap_or_default();
    vec![
        ("Id", v(svc.def.id.clone())),
        ("Names", v(svc.def.names.clone())),
        (
            "DefinitionFile",
            v(svc.def.file.to_string_lossy().into_owned()),
        ),
        ("State", v(svc.state.as_str())),
        ("Reason", v(svc.reason.clone())),
        ("MainPID", v(svc.main_pid.unwrap_or(0) as u32)),
        (
            "PIDs",
            v(svc.pids.iter().map(|p| *p as u32).collect::<Vec<u32>>()),
        ),
        ("Requester", v(requester)),
        ("RequesterPID", v(requester_pid)),
        ("StartTime", v(micros(svc.started_at))),
        ("StateChangeTime", v(micros(Some(svc.changed_at)))),
        ("Restarts", v(svc.restarts)),
        ("LastExitPID", v(exit_pid)),
        ("LastExitStatus", v(exit_status)),
        ("LastExitSignal", v(exit_signal)),
        ("LastExitTime", v(exit_time)),
        ("NextRestartTime", v(micros(svc.next_restart))),
        (
            "IdleTimeout",
            v(svc.def.idle_timeout.map_or(0, |d| d.as_micros() as u64)),
        ),
    ]
}

fn emit<B>(st: &mut State, member: &str, body: &B)
where
    B: serde::Serialize + zbus::wire::DynamicType,
{
    match Message::signal(PATH, IFACE, member)
        .sender(BUS_NAME)
        .build(body)
    {
        Ok(sig) => st.broadcast_from_bus(&sig),
        Err(e) => tracing::warn!("cannot build {member}: {e}"),
    }
}

fn next_serial(st: &mut State) -> u64 {
    st.event_serial += 1;
    st.event_serial
}

/// Send PropertiesChanged for every service whose properties changed since
/// the last announcement.
pub fn flush_properties(st: &mut State) {
    let mut changes: Vec<(String, HashMap<&'static str, OwnedVariant>)> = Vec::new();
    for (id, svc) in &st.services {
        let now = properties(svc);
        let before = st.announced.get(id);
        let changed: HashMap<&'static str, OwnedVariant> = now
            .iter()
            .filter(|(k, v)| {
                before
                    .and_then(|b| b.iter().find(|(bk, _)| bk == k))
                    .is_none_or(|(_, bv)| bv != v)
            })
            .map(|(k, v)| (*k, v.try_clone().expect("plain values clone")))
            .collect();
        if !changed.is_empty() {
            changes.push((id.clone(), changed));
        }
    }
    for (id, changed) in changes {
        let path = service_path(&id);
        let invalidated: Vec<&str> = Vec::new();
        if let Ok(sig) = Message::signal(
            path.as_str(),
            "org.freedesktop.DBus.Properties",
            "PropertiesChanged",
        )
        .sender(BUS_NAME)
        .build(&(SERVICE_IFACE, &changed, &invalidated))
        {
            st.broadcast_from_bus(&sig);
        }
        if let Some(svc) = st.services.get(&id) {
            let snapshot = properties(svc);
            st.announced.insert(id, snapshot);
        }
    }
}

fn event<B>(st: &mut State, member: &str, body: impl FnOnce(u64) -> B)
where
    B: serde::Serialize + zbus::wire::DynamicType,
{
    // Properties first: a client acting on the event reads them up to date.
    flush_properties(st);
    let serial = next_serial(st);
    emit(st, member, &body(serial));
}

pub fn activation_requested(st: &mut State, id: &str, requester: Option<(String, Option<u32>)>) {
    let (who, pid) = requester
        .map(|(n, p)| (n, p.unwrap_or(0)))
        .unwrap_or_default();
    event(st, "ActivationRequested", |s| (s, id, who, pid));
}

pub fn started(st: &mut State, id: &str, pid: i32) {
    event(st, "Started", |s| (s, id, pid as u32));
}

pub fn ready(st: &mut State, id: &str, main_pid: Option<i32>) {
    event(st, "Ready", |s| (s, id, main_pid.unwrap_or(0) as u32));
}

pub fn exited(st: &mut State, id: &str, pid: i32, kind: ExitKind, failure: bool) {
    let (how, status) = match kind {
        ExitKind::Code(c) => ("exited", c),
        ExitKind::Signal(s) => ("killed", s),
    };
    event(st, "Exited", |s| (s, id, pid as u32, how, status, failure));
}

pub fn restarting(st: &mut State, id: &str, attempt: u32, delay: Duration) {
    event(st, "Restarting", |s| {
        (s, id, attempt, delay.as_millis() as u64)
    });
}

pub fn failed(st: &mut State, id: &str, reason: &str) {
    event(st, "Failed", |s| (s, id, reason));
}

pub fn stopping(st: &mut State, id: &str) {
    event(st, "Stopping", |s| (s, id));
}

pub fn stopped(st: &mut State, id: &str) {
    event(st, "Stopped", |s| (s, id));
}

pub fn idle_stopped(st: &mut State, id: &str) {
    event(st, "IdleStopped", |s| (s, id));
}

/// A line of a service's output, for `busvisor logs -f`.
pub fn log_line(st: &mut State, id: &str, pid: i32, line: &str) {
    if st.matches_nothing_from_bus() {
        return;
    }
    emit(st, "LogLine", &(id, pid as u32, line));
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
