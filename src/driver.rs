//! `org.freedesktop.DBus`: the bus driver, answered by hand inside the
//! routing core (no object server, no extra hop), with dbus-daemon 1.14's
//! error names and texts.

use std::collections::HashMap;
use std::sync::Arc;

use tracing::{info, warn};
use zbus::message::Message;
use zbus::names::{BusName, WellKnownName};
use zbus::wire::Variant;

use crate::activation::scan_definitions;
use crate::matching::MatchRule;
use crate::peer::{PeerId, parse_unique_name, unique_name};
use crate::router::{BUS_NAME, BUS_PATH, Bus, State, Verdict, bus_reply, err};

const IFACE_DBUS: &str = "org.freedesktop.DBus";
const IFACE_PROPS: &str = "org.freedesktop.DBus.Properties";
const IFACE_INTROSPECT: &str = "org.freedesktop.DBus.Introspectable";
const IFACE_PEER: &str = "org.freedesktop.DBus.Peer";
const IFACE_MONITORING: &str = "org.freedesktop.DBus.Monitoring";

/// Bus features advertised in the Features property.
pub const FEATURES: &[&str] = &["ActivatableServicesChanged", crate::lifecycle::NAME];
/// Extra interfaces advertised in the Interfaces property.
pub const INTERFACES: &[&str] = &[IFACE_MONITORING];

/// Methods: (interface, member, signature in, needs the canonical path).
const METHODS: &[(&str, &str, &str, bool)] = &[
    (IFACE_DBUS, "Hello", "", false),
    (IFACE_DBUS, "RequestName", "su", false),
    (IFACE_DBUS, "ReleaseName", "s", false),
    (IFACE_DBUS, "StartServiceByName", "su", false),
    (IFACE_DBUS, "UpdateActivationEnvironment", "a{ss}", true),
    (IFACE_DBUS, "NameHasOwner", "s", false),
    (IFACE_DBUS, "ListNames", "", false),
    (IFACE_DBUS, "ListActivatableNames", "", false),
    (IFACE_DBUS, "AddMatch", "s", false),
    (IFACE_DBUS, "RemoveMatch", "s", false),
    (IFACE_DBUS, "GetNameOwner", "s", false),
    (IFACE_DBUS, "ListQueuedOwners", "s", false),
    (IFACE_DBUS, "GetConnectionUnixUser", "s", false),
    (IFACE_DBUS, "GetConnectionUnixProcessID", "s", false),
    (IFACE_DBUS, "GetAdtAuditSessionData", "s", false),
    (
        IFACE_DBUS,
        "GetConnectionSELinuxSecurityContext",
        "s",
        false,
    ),
    (IFACE_DBUS, "GetConnectionCredentials", "s", false),
    (IFACE_DBUS, "ReloadConfig", "", false),
    (IFACE_DBUS, "GetId", "", false),
    (IFACE_MONITORING, "BecomeMonitor", "asu", true),
    (IFACE_INTROSPECT, "Introspect", "", false),
    (IFACE_PEER, "Ping", "", false),
    (IFACE_PEER, "GetMachineId", "", false),
    (IFACE_PROPS, "Get", "ss", true),
    (IFACE_PROPS, "GetAll", "s", true),
    (IFACE_PROPS, "Set", "ssv", true),
];

pub const INTROSPECTION: &str = r#"<!DOCTYPE node PUBLIC "-//freedesktop//DTD D-BUS Object Introspection 1.0//EN"
"http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd">
<node>
  <interface name="org.freedesktop.DBus">
    <method name="Hello">
      <arg direction="out" type="s"/>
    </method>
    <method name="RequestName">
      <arg direction="in" type="s"/>
      <arg direction="in" type="u"/>
      <arg direction="out" type="u"/>
    </method>
    <method name="ReleaseName">
      <arg direction="in" type="s"/>
      <arg direction="out" type="u"/>
    </method>
    <method name="StartServiceByName">
      <arg direction="in" type="s"/>
      <arg direction="in" type="u"/>
      <arg direction="out" type="u"/>
    </method>
    <method name="UpdateActivationEnvironment">
      <arg direction="in" type="a{ss}"/>
    </method>
    <method name="NameHasOwner">
      <arg direction="in" type="s"/>
      <arg direction="out" type="b"/>
    </method>
    <method name="ListNames">
      <arg direction="out" type="as"/>
    </method>
    <method name="ListActivatableNames">
      <arg direction="out" type="as"/>
    </method>
    <method name="AddMatch">
      <arg direction="in" type="s"/>
    </method>
    <method name="RemoveMatch">
      <arg direction="in" type="s"/>
    </method>
    <method name="GetNameOwner">
      <arg direction="in" type="s"/>
      <arg direction="out" type="s"/>
    </method>
    <method name="ListQueuedOwners">
      <arg direction="in" type="s"/>
      <arg direction="out" type="as"/>
    </method>
    <method name="GetConnectionUnixUser">
      <arg direction="in" type="s"/>
      <arg direction="out" type="u"/>
    </method>
    <method name="GetConnectionUnixProcessID">
      <arg direction="in" type="s"/>
      <arg direction="out" type="u"/>
    </method>
    <method name="GetAdtAuditSessionData">
      <arg direction="in" type="s"/>
      <arg direction="out" type="ay"/>
    </method>
    <method name="GetConnectionSELinuxSecurityContext">
      <arg direction="in" type="s"/>
      <arg direction="out" type="ay"/>
    </method>
    <method name="GetConnectionCredentials">
      <arg direction="in" type="s"/>
      <arg direction="out" type="a{sv}"/>
    </method>
    <method name="ReloadConfig">
    </method>
    <method name="GetId">
      <arg direction="out" type="s"/>
    </method>
    <signal name="NameOwnerChanged">
      <arg type="s"/>
      <arg type="s"/>
      <arg type="s"/>
    </signal>
    <signal name="NameLost">
      <arg type="s"/>
    </signal>
    <signal name="NameAcquired">
      <arg type="s"/>
    </signal>
    <signal name="ActivatableServicesChanged">
    </signal>
    <property name="Features" type="as" access="read">
      <annotation name="org.freedesktop.DBus.Property.EmitsChangedSignal" value="const"/>
    </property>
    <property name="Interfaces" type="as" access="read">
      <annotation name="org.freedesktop.DBus.Property.EmitsChangedSignal" value="const"/>
    </property>
  </interface>
  <interface name="org.freedesktop.DBus.Properties">
    <method name="Get">
      <arg direction="in" type="s"/>
      <arg direction="in" type="s"/>
      <arg direction="out" type="v"/>
    </method>
    <method name="GetAll">
      <arg direction="in" type="s"/>
      <arg direction="out" type="a{sv}"/>
    </method>
    <method name="Set">
      <arg direction="in" type="s"/>
      <arg direction="in" type="s"/>
      <arg direction="in" type="v"/>
    </method>
    <signal name="PropertiesChanged">
      <arg type="s" name="interface_name"/>
      <arg type="a{sv}" name="changed_properties"/>
      <arg type="as" name="invalidated_properties"/>
    </signal>
  </interface>
  <interface name="org.freedesktop.DBus.Introspectable">
    <method name="Introspect">
      <arg direction="out" type="s"/>
    </method>
  </interface>
  <interface name="org.freedesktop.DBus.Monitoring">
    <method name="BecomeMonitor">
      <arg direction="in" type="as"/>
      <arg direction="in" type="u"/>
    </method>
  </interface>
  <interface name="org.freedesktop.DBus.Peer">
    <method name="GetMachineId">
      <arg direction="out" type="s"/>
    </method>
    <method name="Ping">
    </method>
  </interface>
"#;

/// The result of a driver method: a reply to send, or an error.
type Answer = Result<Option<Message>, (&'static str, String)>;

fn invalid(text: String) -> (&'static str, String) {
    (err::INVALID_ARGS, text)
}

/// Handle a message addressed to `org.freedesktop.DBus`.
pub(crate) fn handle(bus: &Arc<Bus>, st: &mut State, from: PeerId, msg: &Message) -> Verdict {
    if msg.message_type() != zbus::message::Type::MethodCall {
        // Signals to the bus are allowed and ignored, as dbus-daemon does.
        return Verdict::Continue;
    }
    let hdr = msg.header();
    let member = hdr.member().map(|m| m.as_str()).unwrap_or("");
    let iface = hdr.interface().map(|i| i.as_str());
    let path = hdr.path().map(|p| p.as_str()).unwrap_or("/");
    let signature = crate::matching::body_signature(msg);
    let found = METHODS
        .iter()
        .find(|(i, m, _, _)| *m == member && iface.is_none_or(|want| want == *i));
    let answer: Answer = match found {
        None => {
            let known_iface = iface.is_none_or(|want| METHODS.iter().any(|(i, ..)| *i == want));
            if known_iface {
                Err((
                    err::UNKNOWN_METHOD,
                    format!(
                        "Method \"{member}\" with signature \"{signature}\" on interface \"{}\" doesn't exist",
                        iface.unwrap_or("(null)")
                    ),
                ))
            } else {
                Err((
                    err::UNKNOWN_INTERFACE,
                    format!("Interface \"{}\" doesn't exist", iface.unwrap_or("(null)")),
                ))
            }
        }
        Some((i, m, sig, canonical)) => {
            if *canonical && path != BUS_PATH {
                let text =
                    format!("{i}.{m} is only available at the canonical object path {BUS_PATH}");
                if *i == IFACE_PROPS {
                    Err((err::UNKNOWN_INTERFACE, text))
                } else {
                    Err((err::ACCESS_DENIED, text))
                }
            } else if signature != *sig {
                Err(invalid(format!(
                    "Call to {m} has wrong args ({signature}, expected {sig})"
                )))
            } else {
                call(bus, st, from, msg, i, m)
            }
        }
    };
    // Hello and BecomeMonitor send their own replies, in order with the
    // signals they cause.
    let answered_already = matches!(member, "Hello" | "BecomeMonitor") && answer.is_ok();
    if !answered_already {
        st.answer(from, msg, answer);
    }
    Verdict::Continue
}

fn call(
    bus: &Arc<Bus>,
    st: &mut State,
    from: PeerId,
    msg: &Message,
    iface: &str,
    member: &str,
) -> Answer {
    match (iface, member) {
        (IFACE_DBUS, "Hello") => hello(st, from, msg),
        (IFACE_DBUS, "RequestName") => {
            let body = msg.body();
            let (name, flags): (&str, u32) = body
                .deserialize()
                .map_err(|e| invalid(format!("invalid arguments: {e}")))?;
            request_name(bus, st, from, msg, name, flags)
        }
        (IFACE_DBUS, "ReleaseName") => {
            let body = msg.body();
            let name: &str = body.deserialize().map_err(|e| invalid(e.to_string()))?;
            check_well_known(name, "release")?;
            let (r, changes) = st.names.release(name, from);
            st.announce(changes);
            Ok(bus_reply(msg, &(r,)))
        }
        (IFACE_DBUS, "StartServiceByName") => {
            let body = msg.body();
            let (name, _flags): (&str, u32) =
                body.deserialize().map_err(|e| invalid(e.to_string()))?;
            check_bus_name(name)?;
            // The definition is looked up first: an owned name without one is unknown.
            if st.catalog.lookup(name).is_none() {
                return Err((
                    err::SERVICE_UNKNOWN,
                    format!("The name {name} was not provided by any .service files"),
                ));
            }
            if owner_of(st, name).is_some() {
                return Ok(bus_reply(msg, &(2u32,)));
            }
            st.activate(
                name,
                crate::activation::Waiter::Start {
                    call: msg.clone(),
                    from,
                },
            )?;
            Ok(None)
        }
        (IFACE_DBUS, "UpdateActivationEnvironment") => {
            let uid = st.peers.get(&from).and_then(|p| p.creds.uid);
            if uid != Some(bus.uid) && uid != Some(0) {
                return Err((
                    err::ACCESS_DENIED,
                    "Cannot change activation environment on a system bus or as another user"
                        .into(),
                ));
            }
            let body = msg.body();
            let env: HashMap<String, String> =
                body.deserialize().map_err(|e| invalid(e.to_string()))?;
            for (k, v) in env {
                st.activation_env.retain(|(key, _)| *key != k);
                st.activation_env.push((k, v));
            }
            Ok(bus_reply(msg, &()))
        }
        (IFACE_DBUS, "NameHasOwner") => {
            let body = msg.body();
            let name: &str = body.deserialize().map_err(|e| invalid(e.to_string()))?;
            check_bus_name(name)?;
            let has = is_bus_owned(name) || owner_of(st, name).is_some();
            Ok(bus_reply(msg, &(has,)))
        }
        (IFACE_DBUS, "ListNames") => {
            let mut list = vec![BUS_NAME.to_owned(), crate::lifecycle::NAME.to_owned()];
            list.extend(
                st.peers
                    .iter()
                    .filter(|(_, p)| p.hello && p.monitor.is_none())
                    .map(|(id, _)| unique_name(*id)),
            );
            list.extend(st.names.names().map(str::to_owned));
            Ok(bus_reply(msg, &(&list,)))
        }
        (IFACE_DBUS, "ListActivatableNames") => {
            let mut list = vec![BUS_NAME.to_owned()];
            list.extend(st.catalog.names().map(str::to_owned));
            Ok(bus_reply(msg, &(&list,)))
        }
        (IFACE_DBUS, "AddMatch") => {
            let body = msg.body();
            let text: &str = body.deserialize().map_err(|e| invalid(e.to_string()))?;
            let rule =
                MatchRule::parse(text).map_err(|e| (err::MATCH_RULE_INVALID, e.to_string()))?;
            if st.matches.count(from) as u64 >= bus.limits.max_match_rules_per_connection {
                return Err((
                    err::LIMITS_EXCEEDED,
                    format!(
                        "Connection \"{}\" is not allowed to add more match rules (increase limits in configuration file if required; max_match_rules_per_connection={})",
                        unique_name(from),
                        bus.limits.max_match_rules_per_connection
                    ),
                ));
            }
            if rule.eavesdrop() {
                st.eavesdrop_rules += 1;
                if let Some(p) = st.peers.get_mut(&from) {
                    p.eavesdrop_rules += 1;
                }
            }
            st.matches.add(from, rule);
            Ok(bus_reply(msg, &()))
        }
        (IFACE_DBUS, "RemoveMatch") => {
            let body = msg.body();
            let text: &str = body.deserialize().map_err(|e| invalid(e.to_string()))?;
            let rule =
                MatchRule::parse(text).map_err(|e| (err::MATCH_RULE_INVALID, e.to_string()))?;
            if !st.matches.remove(from, &rule) {
                return Err((
                    err::MATCH_RULE_NOT_FOUND,
                    "The given match rule wasn't found and can't be removed".into(),
                ));
            }
            if rule.eavesdrop() {
                st.eavesdrop_rules -= 1;
                if let Some(p) = st.peers.get_mut(&from) {
                    p.eavesdrop_rules -= 1;
                }
            }
            Ok(bus_reply(msg, &()))
        }
        (IFACE_DBUS, "GetNameOwner") => {
            let body = msg.body();
            let name: &str = body.deserialize().map_err(|e| invalid(e.to_string()))?;
            check_bus_name(name)?;
            let owner = if is_bus_owned(name) {
                BUS_NAME.to_owned()
            } else {
                match owner_of(st, name) {
                    Some(p) => unique_name(p),
                    None => {
                        return Err((
                            err::NAME_HAS_NO_OWNER,
                            format!("Could not get owner of name '{name}': no such name"),
                        ));
                    }
                }
            };
            Ok(bus_reply(msg, &(&owner,)))
        }
        (IFACE_DBUS, "ListQueuedOwners") => {
            let body = msg.body();
            let name: &str = body.deserialize().map_err(|e| invalid(e.to_string()))?;
            check_bus_name(name)?;
            let list: Vec<String> = if is_bus_owned(name) {
                vec![BUS_NAME.to_owned()]
            } else if name.starts_with(':') {
                owner_of(st, name).map(unique_name).into_iter().collect()
            } else {
                st.names.queued(name).into_iter().map(unique_name).collect()
            };
            if list.is_empty() {
                return Err((
                    err::NAME_HAS_NO_OWNER,
                    format!("Could not get owners of name '{name}': no such name"),
                ));
            }
            Ok(bus_reply(msg, &(&list,)))
        }
        (IFACE_DBUS, "GetConnectionUnixUser") => {
            let (uid, _) = creds_of(bus, st, msg, "UID")?;
            match uid {
                Some(uid) => Ok(bus_reply(msg, &(uid,))),
                None => Err((err::FAILED, "Could not determine UID".into())),
            }
        }
        (IFACE_DBUS, "GetConnectionUnixProcessID") => {
            let (_, pid) = creds_of(bus, st, msg, "PID")?;
            match pid {
                Some(pid) => Ok(bus_reply(msg, &(pid,))),
                None => Err((
                    err::UNIX_PROCESS_ID_UNKNOWN,
                    "Could not determine PID".into(),
                )),
            }
        }
        (IFACE_DBUS, "GetAdtAuditSessionData") => {
            creds_of(bus, st, msg, "audit session data")?;
            Err((
                err::ADT_AUDIT_DATA_UNKNOWN,
                "Could not determine audit session data".into(),
            ))
        }
        (IFACE_DBUS, "GetConnectionSELinuxSecurityContext") => {
            creds_of(bus, st, msg, "security context")?;
            Err((
                err::SELINUX_CONTEXT_UNKNOWN,
                "Could not determine security context".into(),
            ))
        }
        (IFACE_DBUS, "GetConnectionCredentials") => credentials(bus, st, from, msg),
        (IFACE_DBUS, "ReloadConfig") => {
            info!("ReloadConfig requested by {}", unique_name(from));
            request_reload(bus, st, Some((from, msg.clone())));
            Ok(None)
        }
        (IFACE_DBUS, "GetId") => Ok(bus_reply(msg, &(&bus.guid,))),
        (IFACE_MONITORING, "BecomeMonitor") => become_monitor(bus, st, from, msg),
        (IFACE_INTROSPECT, "Introspect") => {
            let path = msg
                .header()
                .path()
                .map(|p| p.as_str().to_owned())
                .unwrap_or_default();
            let xml = introspect(&path);
            Ok(bus_reply(msg, &(&xml,)))
        }
        (IFACE_PEER, "Ping") => Ok(bus_reply(msg, &())),
        (IFACE_PEER, "GetMachineId") => Ok(bus_reply(msg, &(&bus.machine_id,))),
        (IFACE_PROPS, "Get") => {
            let body = msg.body();
            let (i, prop): (&str, &str) = body.deserialize().map_err(|e| invalid(e.to_string()))?;
            let value = property(i, prop)?;
            Ok(bus_reply(msg, &(Variant::from(value.clone()),)))
        }
        (IFACE_PROPS, "GetAll") => {
            let body = msg.body();
            let i: &str = body.deserialize().map_err(|e| invalid(e.to_string()))?;
            let mut all: HashMap<&str, Variant<'_>> = HashMap::new();
            if i == IFACE_DBUS || i.is_empty() {
                all.insert("Features", Variant::from(string_list(FEATURES)));
                all.insert("Interfaces", Variant::from(string_list(INTERFACES)));
            } else if !METHODS.iter().any(|(x, ..)| *x == i) {
                return Err((
                    err::UNKNOWN_INTERFACE,
                    format!("Interface \"{i}\" doesn't exist"),
                ));
            }
            Ok(bus_reply(msg, &(&all,)))
        }
        (IFACE_PROPS, "Set") => {
            let body = msg.body();
            let (i, prop, _v): (&str, &str, Variant<'_>) =
                body.deserialize().map_err(|e| invalid(e.to_string()))?;
            property(i, prop)?;
            Err((
                err::PROPERTY_READ_ONLY,
                format!("Property '{prop}' cannot be changed"),
            ))
        }
        _ => Err((
            err::UNKNOWN_METHOD,
            format!("Method \"{member}\" doesn't exist"),
        )),
    }
}

fn string_list(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

fn property(iface: &str, prop: &str) -> Result<Vec<String>, (&'static str, String)> {
    if iface != IFACE_DBUS && !iface.is_empty() {
        return Err((
            err::UNKNOWN_INTERFACE,
            format!("Interface \"{iface}\" doesn't exist"),
        ));
    }
    match prop {
        "Features" => Ok(string_list(FEATURES)),
        "Interfaces" => Ok(string_list(INTERFACES)),
        _ => Err((
            err::UNKNOWN_PROPERTY,
            format!("Property \"{prop}\" doesn't exist on interface \"{IFACE_DBUS}\""),
        )),
    }
}

fn introspect(path: &str) -> String {
    let mut xml = String::from(INTROSPECTION);
    if path == "/" {
        xml.push_str("  <node name=\"org/freedesktop/DBus\"/>\n");
    } else if path == "/org" {
        xml.push_str("  <node name=\"freedesktop/DBus\"/>\n");
    } else if path == "/org/freedesktop" {
        xml.push_str("  <node name=\"DBus\"/>\n");
    }
    xml.push_str("</node>\n");
    xml
}

/// Names the bus itself owns.
fn is_bus_owned(name: &str) -> bool {
    name == BUS_NAME || name == crate::lifecycle::NAME
}

fn check_bus_name(name: &str) -> Result<(), (&'static str, String)> {
    BusName::try_from(name)
        .map(|_| ())
        .map_err(|_| invalid(format!("Name \"{name}\" is not valid")))
}

fn check_well_known(name: &str, verb: &str) -> Result<(), (&'static str, String)> {
    if name.starts_with(':') {
        return Err(invalid(format!(
            "Cannot {verb} a service starting with ':' such as \"{name}\""
        )));
    }
    if WellKnownName::try_from(name).is_err() {
        return Err(invalid(format!("Given bus name \"{name}\" is not valid")));
    }
    if name == BUS_NAME {
        return Err(invalid(format!(
            "Connection is not allowed to own the service \"{name}\" because it is reserved for D-Bus' use only"
        )));
    }
    if name == crate::lifecycle::NAME {
        return Err((
            err::ACCESS_DENIED,
            format!(
                "Connection is not allowed to own the service \"{name}\": busvisor itself owns it"
            ),
        ));
    }
    Ok(())
}

/// The peer owning `name` (a unique name of a connected peer, or a well-known name's owner).
fn owner_of(st: &State, name: &str) -> Option<PeerId> {
    if name.starts_with(':') {
        parse_unique_name(name).filter(|id| {
            st.peers
                .get(id)
                .is_some_and(|p| p.hello && p.monitor.is_none())
        })
    } else {
        st.names.owner(name)
    }
}

fn hello(st: &mut State, from: PeerId, msg: &Message) -> Answer {
    let Some(p) = st.peers.get_mut(&from) else {
        return Err((err::FAILED, "unknown peer".into()));
    };
    if p.hello {
        return Err((err::FAILED, "Already handled an Hello message".into()));
    }
    p.hello = true;
    let me = unique_name(from);
    if let Some(r) = bus_reply(msg, &(&me,)) {
        st.send_to(from, r);
    }
    st.announce_owner(&me, None, Some(&me));
    st.name_signal("NameAcquired", from, &me);
    Ok(None)
}

fn request_name(
    bus: &Bus,
    st: &mut State,
    from: PeerId,
    msg: &Message,
    name: &str,
    flags: u32,
) -> Answer {
    check_well_known(name, "acquire")?;
    // The unique name counts, as in dbus-daemon.
    if st.names.count_for(from) as u64 + 1 >= bus.limits.max_names_per_connection
        && !st.names.queued(name).contains(&from)
    {
        return Err((
            err::LIMITS_EXCEEDED,
            format!(
                "Connection \"{}\" is not allowed to own more services (increase limits in configuration file if required; max_names_per_connection={})",
                unique_name(from),
                bus.limits.max_names_per_connection
            ),
        ));
    }
    let (r, changes) = st.names.request(name, from, flags);
    st.announce(changes);
    // The RequestName reply comes last, after the owner-change signals.
    Ok(bus_reply(msg, &(r,)))
}

type Creds = (Option<u32>, Option<u32>);

fn creds_of(
    bus: &Bus,
    st: &State,
    msg: &Message,
    what: &str,
) -> Result<Creds, (&'static str, String)> {
    let body = msg.body();
    let name: &str = body.deserialize().map_err(|e| invalid(e.to_string()))?;
    check_bus_name(name)?;
    if is_bus_owned(name) {
        return Ok((Some(bus.uid), Some(bus.pid)));
    }
    let Some(peer) = owner_of(st, name).and_then(|id| st.peers.get(&id)) else {
        return Err((
            err::NAME_HAS_NO_OWNER,
            format!("Could not get {what} of name '{name}': no such name"),
        ));
    };
    Ok((peer.creds.uid, peer.creds.pid))
}

fn credentials(bus: &Bus, st: &State, from: PeerId, msg: &Message) -> Answer {
    let body = msg.body();
    let name: &str = body.deserialize().map_err(|e| invalid(e.to_string()))?;
    check_bus_name(name)?;
    let mut dict: HashMap<&str, Variant<'_>> = HashMap::new();
    let pidfd = if is_bus_owned(name) {
        dict.insert("UnixUserID", Variant::from(bus.uid));
        dict.insert("ProcessID", Variant::from(bus.pid));
        None
    } else {
        let Some(peer) = owner_of(st, name).and_then(|id| st.peers.get(&id)) else {
            return Err((
                err::NAME_HAS_NO_OWNER,
                format!("Could not get credentials of name '{name}': no such name"),
            ));
        };
        if let Some(uid) = peer.creds.uid {
            dict.insert("UnixUserID", Variant::from(uid));
        }
        if let (Some(uid), Some(gid)) = (peer.creds.uid, peer.creds.gid) {
            // From the socket; the user database only on kernels without
            // SO_PEERGROUPS.
            let gids = match peer.cutter.groups() {
                Some(mut g) => {
                    g.push(gid);
                    g.sort_unstable();
                    g.dedup();
                    g
                }
                None => bus.groups_of(uid, gid),
            };
            if !gids.is_empty() {
                dict.insert("UnixGroupIDs", Variant::from(gids));
            }
        }
        if let Some(pid) = peer.creds.pid {
            dict.insert("ProcessID", Variant::from(pid));
        }
        peer.cutter.pidfd()
    };
    let caller_takes_fds = st.peers.get(&from).is_some_and(|p| p.outbox.fds_ok());
    if let (Some(fd), true) = (pidfd, caller_takes_fds) {
        dict.insert("ProcessFD", Variant::from(zbus::wire::Fd::from(fd)));
    }
    Ok(bus_reply(msg, &(&dict,)))
}

fn become_monitor(bus: &Bus, st: &mut State, from: PeerId, msg: &Message) -> Answer {
    let uid = st.peers.get(&from).and_then(|p| p.creds.uid);
    if uid != Some(bus.uid) && uid != Some(0) {
        return Err((
            err::ACCESS_DENIED,
            "Only the bus owner or root may become a monitor".into(),
        ));
    }
    let body = msg.body();
    let (texts, _flags): (Vec<&str>, u32) =
        body.deserialize().map_err(|e| invalid(e.to_string()))?;
    let mut rules = Vec::with_capacity(texts.len());
    for t in texts {
        rules.push(MatchRule::parse(t).map_err(|e| (err::MATCH_RULE_INVALID, e.to_string()))?);
    }
    if let Some(r) = bus_reply(msg, &()) {
        st.send_to(from, r);
    }
    // A monitor gives up its names and rules, then only listens.
    let changes = st.names.remove_peer(from);
    st.announce(changes);
    st.matches.remove_all(from);
    let me = unique_name(from);
    st.announce_owner(&me, Some(&me), None);
    st.name_signal("NameLost", from, &me);
    if let Some(p) = st.peers.get_mut(&from) {
        st.eavesdrop_rules -= p.eavesdrop_rules;
        p.eavesdrop_rules = 0;
        p.monitor = Some(rules);
    }
    st.monitors.push(from);
    info!(peer = %me, "became a monitor");
    if st.monitors.len() > 64 {
        warn!("{} monitors attached", st.monitors.len());
    }
    Ok(None)
}

/// Re-read the service definitions and announce them, as dbus-daemon does
/// (ActivatableServicesChanged even when nothing changed). A caller, if
/// any, is answered once definitions read after its request are installed.
/// The files are read on the blocking pool, without the lock; requests that
/// come during a scan share the next one, so a client calling ReloadConfig
/// in a loop costs the bus little.
pub fn request_reload(bus: &Arc<Bus>, st: &mut State, caller: Option<(PeerId, Message)>) {
    st.reload_waiters.extend(caller);
    st.reload_requested = true;
    if st.reloading {
        return;
    }
    st.reloading = true;
    let bus = bus.clone();
    tokio::spawn(async move {
        loop {
            let (dirs, waiters) = {
                let mut st = bus.lock();
                st.reload_requested = false;
                (
                    st.service_dirs.clone(),
                    std::mem::take(&mut st.reload_waiters),
                )
            };
            let scanned = tokio::task::spawn_blocking(move || scan_definitions(&dirs)).await;
            let mut st = bus.lock();
            match scanned {
                Ok(scanned) => {
                    st.install_definitions(scanned);
                    if let Ok(sig) =
                        Message::signal(BUS_PATH, BUS_NAME, "ActivatableServicesChanged")
                            .sender(BUS_NAME)
                            .build(&())
                    {
                        st.broadcast_from_bus(&sig);
                    }
                }
                Err(e) => warn!("reload failed: {e}"),
            }
            for (from, call) in waiters {
                if crate::router::wants_reply(&call)
                    && let Some(r) = bus_reply(&call, &())
                {
                    st.send_to(from, r);
                }
            }
            if !st.reload_requested {
                st.reloading = false;
                return;
            }
        }
    });
}
