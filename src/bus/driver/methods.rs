//! One function per driver method; `mod.rs` has the table that finds them.

use std::collections::HashMap;

use tracing::{info, warn};

use super::{Ctx, FEATURES, INTERFACES};
use crate::bus::matching::MatchRule;
use crate::bus::peer::{PeerEntry, PeerId, unique_name};
use crate::bus::pending::Waiter;
use crate::bus::{Answer, CallRef};
use crate::wire::names::{BUS_NAME, IFACE_DBUS, SYSTEMD_NAME};
use crate::wire::{self, BusError, ErrorName, Fd, Message, Variant};

fn ok<B>(msg: &Message, body: &B) -> Answer
where
    B: serde::Serialize + wire::DynamicType,
{
    Ok(wire::reply(msg, body))
}

fn err(name: ErrorName, text: impl Into<String>) -> Answer {
    Err(BusError::new(name, text))
}

pub(super) fn hello(cx: &mut Ctx<'_>, msg: &Message) -> Answer {
    let from = cx.from;
    let Some(p) = cx.core.peers.get_mut(&from) else {
        return err(ErrorName::Failed, "unknown peer");
    };
    if p.hello {
        return err(ErrorName::Failed, "Already handled an Hello message");
    }
    let uid = p.creds.uid;
    // Refused, the connection stays and may say Hello again (as dbus-daemon).
    cx.core.check_completion(uid)?;
    cx.core.count_completed(uid);
    let p = cx.core.peers.get_mut(&from).expect("looked up above");
    p.hello = true;
    cx.core.assign_policy(from);
    let me = unique_name(from);
    if let Some(r) = wire::reply(msg, &(&me,)) {
        cx.core.send_to(from, r);
    }
    cx.core.announce_owner(&me, None, Some(&me));
    cx.core.name_signal("NameAcquired", from, &me);
    Ok(None)
}

fn check_bus_name(name: &str) -> Result<(), BusError> {
    if wire::validate::bus_name(name) {
        Ok(())
    } else {
        Err(BusError::invalid_args(format!(
            "Name \"{name}\" is not valid"
        )))
    }
}

fn check_well_known(cx: &Ctx<'_>, name: &str, verb: &str) -> Result<(), BusError> {
    if name.starts_with(':') {
        return Err(BusError::invalid_args(format!(
            "Cannot {verb} a service starting with ':' such as \"{name}\""
        )));
    }
    if wire::validate::well_known_name(name).is_err() {
        return Err(BusError::invalid_args(format!(
            "Given bus name \"{name}\" is not valid"
        )));
    }
    if name == BUS_NAME {
        return Err(BusError::invalid_args(format!(
            "Connection is not allowed to own the service \"{name}\" because it is reserved for D-Bus' use only"
        )));
    }
    if cx.core.is_bus_owned(name) {
        return Err(BusError::new(
            ErrorName::AccessDenied,
            format!(
                "Connection is not allowed to own the service \"{name}\": busvisor itself owns it"
            ),
        ));
    }
    Ok(())
}

pub(super) fn request_name(cx: &mut Ctx<'_>, msg: &Message) -> Answer {
    let body = msg.body();
    let (name, flags): (&str, u32) = wire::args(&body)?;
    check_well_known(cx, name, "acquire")?;
    let from = cx.from;
    cx.core.check_own(from, name)?;
    let max = cx.facts.limits.max_names_per_connection;
    // The unique name counts, as in dbus-daemon.
    if cx.core.names.count_for(from) as u64 + 1 >= max && !cx.core.names.of(from).contains(name) {
        return err(
            ErrorName::LimitsExceeded,
            format!(
                "Connection \"{}\" is not allowed to own more services (increase limits in configuration file if required; max_names_per_connection={max})",
                unique_name(from)
            ),
        );
    }
    let (r, changes) = cx.core.names.request(name, from, flags);
    cx.core.announce(changes, cx.sup);
    // The RequestName reply comes last, after the owner-change signals.
    ok(msg, &(r,))
}

pub(super) fn release_name(cx: &mut Ctx<'_>, msg: &Message) -> Answer {
    let body = msg.body();
    let name: &str = wire::args(&body)?;
    check_well_known(cx, name, "release")?;
    let (r, changes) = cx.core.names.release(name, cx.from);
    cx.core.announce(changes, cx.sup);
    ok(msg, &(r,))
}

pub(super) fn start_service_by_name(cx: &mut Ctx<'_>, msg: &Message) -> Answer {
    let body = msg.body();
    let (name, _flags): (&str, u32) = wire::args(&body)?;
    check_bus_name(name)?;
    // The definition is looked up first: an owned name without one is unknown.
    if !cx.sup.provides(name) {
        return err(
            ErrorName::ServiceUnknown,
            format!("The name {name} was not provided by any .service files"),
        );
    }
    if owner_of(cx, name).is_some() {
        return ok(msg, &(2u32,));
    }
    let call = CallRef {
        from: cx.from,
        call: msg.clone(),
    };
    cx.core.activate(cx.sup, name, Waiter::Start(call))?;
    Ok(None)
}

/// Only the bus's own user or root may call `member`; AccessDenied with
/// dbus-daemon's text otherwise (`bus_driver_check_caller_is_privileged`).
pub(super) fn privileged(cx: &Ctx<'_>, member: &str) -> Result<(), BusError> {
    let peer = cx.core.peers.get(&cx.from);
    let uid = peer.and_then(|p| p.creds.uid);
    if cx.facts.is_privileged(uid) {
        return Ok(());
    }
    let name = unique_name(cx.from);
    let loginfo = peer.map_or("", |p| &*p.loginfo);
    let who = match uid {
        Some(uid) => format!("uid {uid}"),
        None => "unknown uid".to_owned(),
    };
    let text =
        format!("rejected attempt to call {member} by connection {name} ({loginfo}) with {who}");
    warn!("{text}");
    Err(BusError::new(ErrorName::AccessDenied, text))
}

/// systemd's ActivationFailure(s unit, s error_name, s error_message), as
/// dbus-daemon's driver takes it: from the bus's user or root (else an
/// AccessDenied, though it is a signal), from the owner of systemd's name
/// (else ignored), with --systemd-activation (else ignored); then every start
/// waiting for that unit fails with systemd's error, before monitors see
/// the signal. Arguments that are not three strings fail the unit's starts
/// with InvalidArgs, if the first names one.
pub(super) fn activation_failure(cx: &mut Ctx<'_>, msg: &Message) {
    if let Err(e) = privileged(cx, "ActivationFailure") {
        return cx.core.deny(cx.from, msg, &e);
    }
    if cx.core.names.owner(SYSTEMD_NAME) != Some(cx.from) {
        let loginfo = cx.core.peers.get(&cx.from).map_or("", |p| &*p.loginfo);
        warn!(
            "Ignoring forged ActivationFailure message from connection {} ({loginfo})",
            unique_name(cx.from)
        );
        return;
    }
    if !cx.facts.systemd_activation {
        warn!("Ignoring unexpected ActivationFailure message while not using systemd activation");
        return;
    }
    let args = wire::args::decode_args(msg, 3);
    let string = |i: usize| {
        args.get(i)
            .copied()
            .flatten()
            .filter(|a| !a.is_path)
            .map(|a| a.value)
    };
    let Some(unit) = string(0) else {
        warn!("Ignoring an ActivationFailure without a unit");
        return;
    };
    let e = match (string(1), string(2)) {
        (Some(name), Some(text)) => BusError::named(name, text),
        _ => BusError::invalid_args(format!(
            "ActivationFailure has wrong arguments ({}, expected sss)",
            wire::args::body_signature(msg)
        )),
    };
    info!(
        "Activation via systemd failed for unit '{unit}': {}",
        e.text
    );
    let Ctx { core, sup, .. } = cx;
    core.apart(|core| sup.systemd_failed(unit, &e, core));
}

pub(super) fn update_env(cx: &mut Ctx<'_>, msg: &Message) -> Answer {
    if cx.facts.system_bus {
        // bus/driver.c, after the privilege check, where a servicehelper
        // is configured: the helper wipes the environment anyway.
        return Err(BusError::new(
            ErrorName::AccessDenied,
            "Cannot change activation environment on a system bus.",
        ));
    }
    let body = msg.body();
    // Sorted: the same order for the same variables, whatever the caller's
    // dictionary order (systemd receives them in it).
    let env: std::collections::BTreeMap<String, String> = wire::args(&body)?;
    cx.sup
        .set_activation_env(env.into_iter().collect(), cx.core);
    ok(msg, &())
}

pub(super) fn name_has_owner(cx: &mut Ctx<'_>, msg: &Message) -> Answer {
    let body = msg.body();
    let name: &str = wire::args(&body)?;
    check_bus_name(name)?;
    let has = cx.core.is_bus_owned(name) || owner_of(cx, name).is_some();
    ok(msg, &(has,))
}

pub(super) fn list_names(cx: &mut Ctx<'_>, msg: &Message) -> Answer {
    let mut list = vec![BUS_NAME.to_owned(), cx.core.own_name.to_owned()];
    list.extend(
        cx.core
            .peers
            .iter()
            .filter(|(_, p)| p.is_addressable())
            .map(|(id, _)| unique_name(*id)),
    );
    list.extend(cx.core.names.names().map(str::to_owned));
    ok(msg, &(&list,))
}

pub(super) fn list_activatable_names(cx: &mut Ctx<'_>, msg: &Message) -> Answer {
    let mut list = vec![BUS_NAME.to_owned()];
    list.extend(cx.sup.activatable_names());
    ok(msg, &(&list,))
}

fn parse_rule(text: &str) -> Result<MatchRule, BusError> {
    Ok(MatchRule::parse(text)?)
}

fn count_eavesdrop(cx: &mut Ctx<'_>, rule: &MatchRule, added: bool) {
    if !rule.eavesdrop() {
        return;
    }
    let p = cx.core.peers.get_mut(&cx.from);
    if added {
        cx.core.eavesdrop_rules += 1;
        if let Some(p) = p {
            p.eavesdrop_rules += 1;
        }
    } else {
        cx.core.eavesdrop_rules -= 1;
        if let Some(p) = p {
            p.eavesdrop_rules -= 1;
        }
    }
}

pub(super) fn add_match(cx: &mut Ctx<'_>, msg: &Message) -> Answer {
    let body = msg.body();
    let text: &str = wire::args(&body)?;
    let rule = parse_rule(text)?;
    let max = cx.facts.limits.max_match_rules_per_connection;
    if cx.core.matches.count(cx.from) as u64 >= max {
        return err(
            ErrorName::LimitsExceeded,
            format!(
                "Connection \"{}\" is not allowed to add more match rules (increase limits in configuration file if required; max_match_rules_per_connection={max})",
                unique_name(cx.from)
            ),
        );
    }
    count_eavesdrop(cx, &rule, true);
    cx.core.matches.add(cx.from, rule);
    ok(msg, &())
}

pub(super) fn remove_match(cx: &mut Ctx<'_>, msg: &Message) -> Answer {
    let body = msg.body();
    let text: &str = wire::args(&body)?;
    let rule = parse_rule(text)?;
    if !cx.core.matches.remove(cx.from, &rule) {
        return err(
            ErrorName::MatchRuleNotFound,
            "The given match rule wasn't found and can't be removed",
        );
    }
    count_eavesdrop(cx, &rule, false);
    ok(msg, &())
}

/// The addressable peer owning `name`.
fn owner_of(cx: &Ctx<'_>, name: &str) -> Option<PeerId> {
    cx.core.resolve(name)
}

fn no_such_name(what: &str, name: &str) -> BusError {
    BusError::new(
        ErrorName::NameHasNoOwner,
        format!("Could not get {what} of name '{name}': no such name"),
    )
}

pub(super) fn get_name_owner(cx: &mut Ctx<'_>, msg: &Message) -> Answer {
    let body = msg.body();
    let name: &str = wire::args(&body)?;
    check_bus_name(name)?;
    let owner = if cx.core.is_bus_owned(name) {
        BUS_NAME.to_owned()
    } else {
        match owner_of(cx, name) {
            Some(p) => unique_name(p),
            None => return Err(no_such_name("owner", name)),
        }
    };
    ok(msg, &(&owner,))
}

pub(super) fn list_queued_owners(cx: &mut Ctx<'_>, msg: &Message) -> Answer {
    let body = msg.body();
    let name: &str = wire::args(&body)?;
    check_bus_name(name)?;
    let list: Vec<String> = if cx.core.is_bus_owned(name) {
        vec![BUS_NAME.to_owned()]
    } else if name.starts_with(':') {
        owner_of(cx, name).map(unique_name).into_iter().collect()
    } else {
        cx.core
            .names
            .queued(name)
            .into_iter()
            .map(unique_name)
            .collect()
    };
    if list.is_empty() {
        return Err(no_such_name("owners", name));
    }
    ok(msg, &(&list,))
}

/// The peer a credentials query names, or None for the bus itself.
fn queried<'c>(
    cx: &'c Ctx<'_>,
    msg: &Message,
    what: &str,
) -> Result<Option<&'c PeerEntry>, BusError> {
    let body = msg.body();
    let name: &str = wire::args(&body)?;
    check_bus_name(name)?;
    if cx.core.is_bus_owned(name) {
        return Ok(None);
    }
    owner_of(cx, name)
        .and_then(|id| cx.core.peers.get(&id))
        .map(Some)
        .ok_or_else(|| no_such_name(what, name))
}

pub(super) fn unix_user(cx: &mut Ctx<'_>, msg: &Message) -> Answer {
    let uid = match queried(cx, msg, "UID")? {
        None => Some(cx.facts.uid),
        Some(p) => p.creds.uid,
    };
    match uid {
        Some(uid) => ok(msg, &(uid,)),
        None => err(ErrorName::Failed, "Could not determine UID"),
    }
}

pub(super) fn unix_process_id(cx: &mut Ctx<'_>, msg: &Message) -> Answer {
    let pid = match queried(cx, msg, "PID")? {
        None => Some(cx.facts.pid),
        Some(p) => p.creds.pid,
    };
    match pid {
        Some(pid) => ok(msg, &(pid,)),
        None => err(ErrorName::UnixProcessIdUnknown, "Could not determine PID"),
    }
}

pub(super) fn audit_session_data(cx: &mut Ctx<'_>, msg: &Message) -> Answer {
    queried(cx, msg, "audit session data")?;
    err(
        ErrorName::AdtAuditDataUnknown,
        "Could not determine audit session data",
    )
}

pub(super) fn selinux_context(cx: &mut Ctx<'_>, msg: &Message) -> Answer {
    queried(cx, msg, "security context")?;
    err(
        ErrorName::SELinuxSecurityContextUnknown,
        "Could not determine security context",
    )
}

pub(super) fn credentials(cx: &mut Ctx<'_>, msg: &Message) -> Answer {
    let mut dict: HashMap<&str, Variant<'_>> = HashMap::new();
    let pidfd = match queried(cx, msg, "credentials")? {
        None => {
            dict.insert("UnixUserID", Variant::from(cx.facts.uid));
            dict.insert("ProcessID", Variant::from(cx.facts.pid));
            None
        }
        Some(peer) => {
            let c = peer.creds;
            if let Some(uid) = c.uid {
                dict.insert("UnixUserID", Variant::from(uid));
            }
            if !peer.groups.is_empty() {
                dict.insert("UnixGroupIDs", Variant::from(peer.groups.to_vec()));
            }
            if let Some(pid) = c.pid {
                dict.insert("ProcessID", Variant::from(pid));
            }
            peer.cutter.pidfd()
        }
    };
    let caller_takes_fds = cx
        .core
        .peers
        .get(&cx.from)
        .is_some_and(|p| p.outbox.fds_ok());
    if let (Some(fd), true) = (pidfd, caller_takes_fds) {
        dict.insert("ProcessFD", Variant::from(Fd::from(fd)));
    }
    ok(msg, &(&dict,))
}

pub(super) fn reload_config(cx: &mut Ctx<'_>, msg: &Message) -> Answer {
    info!("ReloadConfig requested by {}", unique_name(cx.from));
    cx.sup.reload(Some(CallRef {
        from: cx.from,
        call: msg.clone(),
    }));
    Ok(None)
}

pub(super) fn get_id(cx: &mut Ctx<'_>, msg: &Message) -> Answer {
    ok(msg, &(&cx.facts.guid,))
}

pub(super) fn become_monitor(cx: &mut Ctx<'_>, msg: &Message) -> Answer {
    let body = msg.body();
    let (texts, flags): (Vec<&str>, u32) = wire::args(&body)?;
    if flags != 0 {
        return err(
            ErrorName::InvalidArgs,
            "BecomeMonitor does not support any flags yet",
        );
    }
    let rules = texts
        .into_iter()
        .map(parse_rule)
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(r) = wire::reply(msg, &()) {
        cx.core.send_to(cx.from, r);
    }
    // A monitor gives up its names and rules, then only listens.
    cx.core.goodbye(cx.from, Some(rules), cx.sup);
    info!(peer = %unique_name(cx.from), "became a monitor");
    if cx.core.monitors.len() > 64 {
        warn!("{} monitors attached", cx.core.monitors.len());
    }
    Ok(None)
}

/// Names owned or queued for, unique names included (dbus-daemon's
/// `BusNames` count).
fn bus_names(cx: &Ctx<'_>, peer: PeerId) -> u32 {
    let unique = cx.core.peers.get(&peer).is_some_and(|p| p.hello) as usize;
    (unique + cx.core.names.count_for(peer)) as u32
}

/// The stats serial, counting from 0 as dbus-daemon's.
fn next_stats_serial(cx: &mut Ctx<'_>) -> u32 {
    let serial = cx.core.stats_serial;
    cx.core.stats_serial = serial.wrapping_add(1);
    serial
}

pub(super) fn get_stats(cx: &mut Ctx<'_>, msg: &Message) -> Answer {
    let serial = next_stats_serial(cx);
    let core = &*cx.core;
    let incomplete = core.peers.values().filter(|p| !p.hello).count() as u32;
    let names: u32 = core.peers.keys().map(|p| bus_names(cx, *p)).sum();
    let stats: HashMap<&str, Variant<'_>> = HashMap::from([
        ("Serial", Variant::from(serial)),
        ("ActiveConnections", Variant::from(core.completed as u32)),
        ("IncompleteConnections", Variant::from(incomplete)),
        ("MatchRules", Variant::from(core.matches.total() as u32)),
        ("BusNames", Variant::from(names)),
    ]);
    ok(msg, &(&stats,))
}

pub(super) fn get_connection_stats(cx: &mut Ctx<'_>, msg: &Message) -> Answer {
    let body = msg.body();
    let name: &str = wire::args(&body)?;
    check_bus_name(name)?;
    if cx.core.is_bus_owned(name) {
        return err(
            ErrorName::InvalidArgs,
            format!("GetConnectionStats is not meaningful for the message bus \"{name}\" itself"),
        );
    }
    let Some(id) = owner_of(cx, name) else {
        return Err(no_such_name("statistics", name));
    };
    let serial = next_stats_serial(cx);
    let outbox = &cx.core.peers[&id].outbox;
    let (messages, bytes, fds) = outbox.queued();
    let stats: HashMap<&str, Variant<'_>> = HashMap::from([
        ("Serial", Variant::from(serial)),
        ("UniqueName", Variant::from(unique_name(id))),
        (
            "MatchRules",
            Variant::from(cx.core.matches.count(id) as u32),
        ),
        ("BusNames", Variant::from(bus_names(cx, id))),
        // Incoming messages are never queued by busvisor: read, routed.
        ("IncomingMessages", Variant::from(0u32)),
        ("IncomingBytes", Variant::from(0u32)),
        ("IncomingFDs", Variant::from(0u32)),
        ("OutgoingMessages", Variant::from(messages as u32)),
        ("OutgoingBytes", Variant::from(bytes as u32)),
        ("OutgoingFDs", Variant::from(fds as u32)),
    ]);
    ok(msg, &(&stats,))
}

pub(super) fn get_all_match_rules(cx: &mut Ctx<'_>, msg: &Message) -> Answer {
    let all: HashMap<String, Vec<String>> = cx
        .core
        .matches
        .rules_by_key()
        .into_iter()
        .map(|(peer, rules)| {
            let texts = rules.iter().map(|r| r.to_string()).collect();
            (unique_name(peer), texts)
        })
        .collect();
    ok(msg, &(&all,))
}

pub(super) fn introspect(_cx: &mut Ctx<'_>, msg: &Message) -> Answer {
    let path = msg.header().path().map(|p| p.as_str().to_owned());
    let mut xml = super::introspection();
    match path.as_deref() {
        Some("/") => xml.push_str("  <node name=\"org/freedesktop/DBus\"/>\n"),
        Some("/org") => xml.push_str("  <node name=\"freedesktop/DBus\"/>\n"),
        Some("/org/freedesktop") => xml.push_str("  <node name=\"DBus\"/>\n"),
        _ => {}
    }
    xml.push_str("</node>\n");
    ok(msg, &(&xml,))
}

pub(super) fn ping(_cx: &mut Ctx<'_>, msg: &Message) -> Answer {
    ok(msg, &())
}

pub(super) fn get_machine_id(cx: &mut Ctx<'_>, msg: &Message) -> Answer {
    ok(msg, &(&cx.facts.machine_id,))
}

fn string_list(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

/// The Features property: fixed, and SystemdActivation with
/// `--systemd-activation`.
fn features(cx: &Ctx<'_>) -> Vec<String> {
    let mut list = string_list(FEATURES);
    if cx.facts.systemd_activation {
        list.push("SystemdActivation".to_owned());
    }
    list
}

fn property(cx: &Ctx<'_>, iface: &str, prop: &str) -> Result<Vec<String>, BusError> {
    if iface != IFACE_DBUS && !iface.is_empty() {
        return Err(BusError::new(
            ErrorName::UnknownInterface,
            format!("Interface \"{iface}\" doesn't exist"),
        ));
    }
    match prop {
        "Features" => Ok(features(cx)),
        "Interfaces" => Ok(string_list(INTERFACES)),
        _ => Err(BusError::new(
            ErrorName::UnknownProperty,
            format!("Property \"{prop}\" doesn't exist on interface \"{IFACE_DBUS}\""),
        )),
    }
}

pub(super) fn prop_get(cx: &mut Ctx<'_>, msg: &Message) -> Answer {
    let body = msg.body();
    let (i, prop): (&str, &str) = wire::args(&body)?;
    let value = property(cx, i, prop)?;
    ok(msg, &(Variant::from(value),))
}

pub(super) fn prop_get_all(cx: &mut Ctx<'_>, msg: &Message) -> Answer {
    let body = msg.body();
    let i: &str = wire::args(&body)?;
    let mut all: HashMap<&str, Variant<'_>> = HashMap::new();
    if i == IFACE_DBUS || i.is_empty() {
        all.insert("Features", Variant::from(features(cx)));
        all.insert("Interfaces", Variant::from(string_list(INTERFACES)));
    } else if !super::METHODS.iter().any(|r| r.iface == i) {
        return err(
            ErrorName::UnknownInterface,
            format!("Interface \"{i}\" doesn't exist"),
        );
    }
    ok(msg, &(&all,))
}

pub(super) fn prop_set(cx: &mut Ctx<'_>, msg: &Message) -> Answer {
    let body = msg.body();
    let (i, prop, _v): (&str, &str, Variant<'_>) = wire::args(&body)?;
    property(cx, i, prop)?;
    err(
        ErrorName::PropertyReadOnly,
        format!("Property '{prop}' cannot be changed"),
    )
}
