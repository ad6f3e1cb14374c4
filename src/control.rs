//! The control API, `org.busvisor.Supervisor1`, answered inside the
//! routing core like the driver. Start, Stop and Restart reply when the
//! operation has finished: the supervisor answers a oneshot, and a small
//! task sends the D-Bus reply then.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::oneshot;
use zbus::message::{Message, Type};
use zbus::wire::{ObjectPath, OwnedVariant, Variant};

use crate::lifecycle::{self, IFACE, PATH, SERVICE_IFACE, SERVICE_PATH_PREFIX};
use crate::peer::PeerId;
use crate::router::{Bus, State, Verdict, bus_error, bus_reply, err};
use crate::supervision::{Cmd, Service};

const NO_SUCH_SERVICE: &str = "org.busvisor.Supervisor1.Error.NoSuchService";
const START_FAILED: &str = "org.busvisor.Supervisor1.Error.StartFailed";
const IFACE_PROPS: &str = "org.freedesktop.DBus.Properties";
const IFACE_INTROSPECT: &str = "org.freedesktop.DBus.Introspectable";
const IFACE_PEER: &str = "org.freedesktop.DBus.Peer";

type Answer = Result<Option<Message>, (&'static str, String)>;

/// (id, names, state, reason, main pid, object path) for ListServices.
type Row<'a> = (
    &'a str,
    &'a [String],
    &'a str,
    &'a str,
    u32,
    ObjectPath<'static>,
);

fn row(svc: &Service) -> Row<'_> {
    let path = ObjectPath::try_from(lifecycle::service_path(&svc.def.id))
        .expect("escaped ids make valid paths");
    (
        &svc.def.id,
        &svc.def.names,
        svc.state.as_str(),
        &svc.reason,
        svc.main_pid.unwrap_or(0) as u32,
        path,
    )
}

/// The service named by an id or by one of its bus names.
fn find<'a>(st: &'a State, name: &str) -> Result<&'a Service, (&'static str, String)> {
    st.services
        .get(name)
        .or_else(|| st.catalog.lookup(name).and_then(|d| st.services.get(&d.id)))
        .ok_or_else(|| (NO_SUCH_SERVICE, format!("no such service: {name}")))
}

fn invalid(e: impl std::fmt::Display) -> (&'static str, String) {
    (err::INVALID_ARGS, format!("invalid arguments: {e}"))
}

/// Handle a message addressed to org.busvisor.Supervisor1.
pub fn handle(bus: &Arc<Bus>, st: &mut State, from: PeerId, msg: &Message) -> Verdict {
    if msg.message_type() != Type::MethodCall {
        return Verdict::Continue;
    }
    let outcome = dispatch(bus, st, from, msg);
    st.answer(from, msg, outcome);
    Verdict::Continue
}

fn dispatch(bus: &Arc<Bus>, st: &mut State, from: PeerId, msg: &Message) -> Answer {
    let hdr = msg.header();
    let path = hdr.path().map(|p| p.as_str()).unwrap_or("/");
    let iface = hdr.interface().map(|i| i.as_str());
    let member = hdr.member().map(|m| m.as_str()).unwrap_or("");
    let sig = crate::matching::body_signature(msg);
    let service_id = path
        .strip_prefix(SERVICE_PATH_PREFIX)
        .and_then(lifecycle::unescape_id);

    match (iface, member) {
        (Some(IFACE_PEER) | None, "Ping") if sig.is_empty() => return Ok(bus_reply(msg, &())),
        (Some(IFACE_PEER) | None, "GetMachineId") if sig.is_empty() => {
            return Ok(bus_reply(msg, &(&bus.machine_id,)));
        }
        (Some(IFACE_INTROSPECT) | None, "Introspect") if sig.is_empty() => {
            let xml = introspect(st, path);
            return Ok(bus_reply(msg, &(&xml,)));
        }
        _ => {}
    }
    if path == PATH {
        return manager(bus, st, from, msg, iface, member, sig);
    }
    let Some(id) = service_id.filter(|id| st.services.contains_key(id)) else {
        return Err((err::UNKNOWN_METHOD, format!("No such object path '{path}'")));
    };
    match (iface, member, sig) {
        (Some(IFACE_PROPS), "Get", "ss") => {
            let body = msg.body();
            let (i, prop): (&str, &str) = body.deserialize().map_err(invalid)?;
            if i != SERVICE_IFACE {
                return Err((err::UNKNOWN_INTERFACE, format!("No such interface '{i}'")));
            }
            let props = lifecycle::properties(&st.services[&id]);
            let Some((_, v)) = props.iter().find(|(k, _)| *k == prop) else {
                return Err((err::UNKNOWN_PROPERTY, format!("No such property '{prop}'")));
            };
            let v: Variant<'_> = (**v).try_clone().map_err(invalid)?;
            Ok(bus_reply(msg, &(v,)))
        }
        (Some(IFACE_PROPS), "GetAll", "s") => {
            let body = msg.body();
            let i: &str = body.deserialize().map_err(invalid)?;
            let all: HashMap<&str, OwnedVariant> = if i == SERVICE_IFACE || i.is_empty() {
                lifecycle::properties(&st.services[&id])
                    .into_iter()
                    .collect()
            } else {
                HashMap::new()
            };
            Ok(bus_reply(msg, &(&all,)))
        }
        (Some(IFACE_PROPS), "Set", "ssv") => Err((
            err::PROPERTY_READ_ONLY,
            "The properties of a service are read-only".into(),
        )),
        (Some(SERVICE_IFACE) | None, "Start" | "Stop" | "Restart", "") => {
            operation(bus, st, from, msg, member, &id)
        }
        (Some(SERVICE_IFACE) | None, "GetLogs", "u") => {
            let body = msg.body();
            let n: u32 = body.deserialize().map_err(invalid)?;
            Ok(bus_reply(msg, &(logs(&st.services[&id], n),)))
        }
        _ => Err(unknown(iface, member, sig)),
    }
}

fn unknown(iface: Option<&str>, member: &str, sig: &str) -> (&'static str, String) {
    (
        err::UNKNOWN_METHOD,
        format!(
            "Method \"{member}\" with signature \"{sig}\" on interface \"{}\" doesn't exist",
            iface.unwrap_or("(null)")
        ),
    )
}

fn logs(svc: &Service, n: u32) -> Vec<String> {
    let n = if n == 0 { svc.logs.len() } else { n as usize };
    let skip = svc.logs.len().saturating_sub(n);
    svc.logs.iter().skip(skip).cloned().collect()
}

fn manager(
    bus: &Arc<Bus>,
    st: &mut State,
    from: PeerId,
    msg: &Message,
    iface: Option<&str>,
    member: &str,
    sig: &str,
) -> Answer {
    match (iface, member, sig) {
        (Some(IFACE) | None, "ListServices", "") => {
            let rows: Vec<Row<'_>> = st.services.values().map(row).collect();
            Ok(bus_reply(msg, &(rows,)))
        }
        (Some(IFACE) | None, "Snapshot", "") => {
            let rows: Vec<Row<'_>> = st.services.values().map(row).collect();
            Ok(bus_reply(msg, &(st.event_serial, rows)))
        }
        (Some(IFACE) | None, "GetService", "s") => {
            let body = msg.body();
            let name: &str = body.deserialize().map_err(invalid)?;
            let svc = find(st, name)?;
            let path =
                ObjectPath::try_from(lifecycle::service_path(&svc.def.id)).map_err(invalid)?;
            Ok(bus_reply(msg, &(path,)))
        }
        (Some(IFACE) | None, "Start" | "Stop" | "Restart", "s") => {
            let body = msg.body();
            let name: &str = body.deserialize().map_err(invalid)?;
            let id = find(st, name)?.def.id.clone();
            operation(bus, st, from, msg, member, &id)
        }
        (Some(IFACE) | None, "Reload", "") => {
            crate::driver::request_reload(bus, st, Some((from, msg.clone())));
            Ok(None)
        }
        (Some(IFACE) | None, "GetLogs", "su") => {
            let body = msg.body();
            let (name, n): (&str, u32) = body.deserialize().map_err(invalid)?;
            let svc = find(st, name)?;
            Ok(bus_reply(msg, &(logs(svc, n),)))
        }
        (Some(IFACE_PROPS), "GetAll", "s") => {
            let all: HashMap<&str, OwnedVariant> = HashMap::new();
            Ok(bus_reply(msg, &(&all,)))
        }
        (Some(IFACE_PROPS), "Get", "ss") => Err((
            err::UNKNOWN_PROPERTY,
            "The manager has no properties".into(),
        )),
        _ => Err(unknown(iface, member, sig)),
    }
}

/// Start, Stop or Restart: hand it to the supervisor, reply when it is done.
fn operation(
    bus: &Arc<Bus>,
    st: &mut State,
    from: PeerId,
    msg: &Message,
    op: &str,
    id: &str,
) -> Answer {
    let Some(sup) = st.supervisor.clone() else {
        return Err((err::FAILED, "supervision is not running".into()));
    };
    let (tx, rx) = oneshot::channel();
    match op {
        "Start" => sup.send(Cmd::Start(id.to_owned(), tx)),
        "Stop" => sup.send(Cmd::Stop(id.to_owned(), tx)),
        _ => {
            // Restart = Stop, then Start, in one task.
            let (stop_tx, stop_rx) = oneshot::channel();
            sup.send(Cmd::Stop(id.to_owned(), stop_tx));
            let sup = sup.clone();
            let id = id.to_owned();
            tokio::spawn(async move {
                match stop_rx.await {
                    Ok(Ok(())) => sup.send(Cmd::Start(id, tx)),
                    Ok(Err(e)) => {
                        let _ = tx.send(Err(e));
                    }
                    Err(_) => {}
                }
            });
        }
    }
    let bus = bus.clone();
    let call = msg.clone();
    tokio::spawn(async move {
        let reply = match rx.await {
            Ok(Ok(())) => bus_reply(&call, &()),
            Ok(Err(e)) => bus_error(&call, START_FAILED, &e),
            Err(_) => bus_error(&call, err::FAILED, "the supervisor dropped the request"),
        };
        if let Some(r) = reply
            && crate::router::wants_reply(&call)
        {
            bus.lock().send_to(from, r);
        }
    });
    Ok(None)
}

const MANAGER_XML: &str = r#"  <interface name="org.busvisor.Supervisor1">
    <method name="ListServices">
      <arg name="services" type="a(sasssuo)" direction="out"/>
    </method>
    <method name="GetService">
      <arg name="name" type="s" direction="in"/>
      <arg name="path" type="o" direction="out"/>
    </method>
    <method name="Start">
      <arg name="name" type="s" direction="in"/>
    </method>
    <method name="Stop">
      <arg name="name" type="s" direction="in"/>
    </method>
    <method name="Restart">
      <arg name="name" type="s" direction="in"/>
    </method>
    <method name="Reload"/>
    <method name="GetLogs">
      <arg name="name" type="s" direction="in"/>
      <arg name="lines" type="u" direction="in"/>
      <arg name="output" type="as" direction="out"/>
    </method>
    <method name="Snapshot">
      <arg name="serial" type="t" direction="out"/>
      <arg name="services" type="a(sasssuo)" direction="out"/>
    </method>
    <signal name="ActivationRequested">
      <arg name="serial" type="t"/>
      <arg name="id" type="s"/>
      <arg name="requester" type="s"/>
      <arg name="requester_pid" type="u"/>
    </signal>
    <signal name="Started">
      <arg name="serial" type="t"/>
      <arg name="id" type="s"/>
      <arg name="pid" type="u"/>
    </signal>
    <signal name="Ready">
      <arg name="serial" type="t"/>
      <arg name="id" type="s"/>
      <arg name="main_pid" type="u"/>
    </signal>
    <signal name="Exited">
      <arg name="serial" type="t"/>
      <arg name="id" type="s"/>
      <arg name="pid" type="u"/>
      <arg name="how" type="s"/>
      <arg name="status" type="i"/>
      <arg name="failure" type="b"/>
    </signal>
    <signal name="Restarting">
      <arg name="serial" type="t"/>
      <arg name="id" type="s"/>
      <arg name="attempt" type="u"/>
      <arg name="delay_ms" type="t"/>
    </signal>
    <signal name="Failed">
      <arg name="serial" type="t"/>
      <arg name="id" type="s"/>
      <arg name="reason" type="s"/>
    </signal>
    <signal name="Stopping">
      <arg name="serial" type="t"/>
      <arg name="id" type="s"/>
    </signal>
    <signal name="Stopped">
      <arg name="serial" type="t"/>
      <arg name="id" type="s"/>
    </signal>
    <signal name="IdleStopped">
      <arg name="serial" type="t"/>
      <arg name="id" type="s"/>
    </signal>
    <signal name="LogLine">
      <arg name="id" type="s"/>
      <arg name="pid" type="u"/>
      <arg name="line" type="s"/>
    </signal>
  </interface>
"#;

const SERVICE_XML: &str = r#"  <interface name="org.busvisor.Service1">
    <method name="Start"/>
    <method name="Stop"/>
    <method name="Restart"/>
    <method name="GetLogs">
      <arg name="lines" type="u" direction="in"/>
      <arg name="output" type="as" direction="out"/>
    </method>
    <property name="Id" type="s" access="read"/>
    <property name="Names" type="as" access="read"/>
    <property name="DefinitionFile" type="s" access="read"/>
    <property name="State" type="s" access="read"/>
    <property name="Reason" type="s" access="read"/>
    <property name="MainPID" type="u" access="read"/>
    <property name="PIDs" type="au" access="read"/>
    <property name="Requester" type="s" access="read"/>
    <property name="RequesterPID" type="u" access="read"/>
    <property name="StartTime" type="t" access="read"/>
    <property name="StateChangeTime" type="t" access="read"/>
    <property name="Restarts" type="u" access="read"/>
    <property name="LastExitPID" type="u" access="read"/>
    <property name="LastExitStatus" type="i" access="read"/>
    <property name="LastExitSignal" type="i" access="read"/>
    <property name="LastExitTime" type="t" access="read"/>
    <property name="NextRestartTime" type="t" access="read"/>
    <property name="IdleTimeout" type="t" access="read"/>
  </interface>
"#;

const STANDARD_XML: &str = r#"  <interface name="org.freedesktop.DBus.Properties">
    <method name="Get">
      <arg name="interface_name" type="s" direction="in"/>
      <arg name="property_name" type="s" direction="in"/>
      <arg name="value" type="v" direction="out"/>
    </method>
    <method name="GetAll">
      <arg name="interface_name" type="s" direction="in"/>
      <arg name="properties" type="a{sv}" direction="out"/>
    </method>
    <method name="Set">
      <arg name="interface_name" type="s" direction="in"/>
      <arg name="property_name" type="s" direction="in"/>
      <arg name="value" type="v" direction="in"/>
    </method>
    <signal name="PropertiesChanged">
      <arg name="interface_name" type="s"/>
      <arg name="changed_properties" type="a{sv}"/>
      <arg name="invalidated_properties" type="as"/>
    </signal>
  </interface>
  <interface name="org.freedesktop.DBus.Introspectable">
    <method name="Introspect">
      <arg name="xml_data" type="s" direction="out"/>
    </method>
  </interface>
  <interface name="org.freedesktop.DBus.Peer">
    <method name="Ping"/>
    <method name="GetMachineId">
      <arg name="machine_uuid" type="s" direction="out"/>
    </method>
  </interface>
"#;

fn introspect(st: &State, path: &str) -> String {
    let mut xml = String::from(
        "<!DOCTYPE node PUBLIC \"-//freedesktop//DTD D-BUS Object Introspection 1.0//EN\"\n\"http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd\">\n<node>\n",
    );
    let service_dir = SERVICE_PATH_PREFIX.trim_end_matches('/');
    if path == PATH {
        xml.push_str(MANAGER_XML);
        xml.push_str(STANDARD_XML);
        xml.push_str("  <node name=\"service\"/>\n");
    } else if path == service_dir {
        for id in st.services.keys() {
            xml.push_str(&format!(
                "  <node name=\"{}\"/>\n",
                lifecycle::escape_id(id)
            ));
        }
    } else if let Some(id) = path
        .strip_prefix(SERVICE_PATH_PREFIX)
        .and_then(lifecycle::unescape_id)
        && st.services.contains_key(&id)
    {
        xml.push_str(SERVICE_XML);
        xml.push_str(STANDARD_XML);
    } else {
        // Ancestors of the manager's path list the next element.
        let rest = PATH.strip_prefix(path.trim_end_matches('/')).unwrap_or("");
        if let Some(next) = rest.trim_start_matches('/').split('/').next()
            && !next.is_empty()
            && (path == "/" || rest.starts_with('/'))
        {
            xml.push_str(&format!("  <node name=\"{next}\"/>\n"));
        }
    }
    xml.push_str("</node>\n");
    xml
}
