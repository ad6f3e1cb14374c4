//! The control API, `org.busvisor.Supervisor1` and its service objects,
//! answered inside the core lock like the driver. Every method is a row of
//! a table (path kind, interface, member, signature, handler). Start, Stop,
//! Restart and Reload store the call and are answered where the work
//! completes (see `machine.rs`).

use std::collections::HashMap;

use super::output::LogEntry;
use super::service::Service;
use super::{Cmd, SupervisorState};
use crate::bus::{Answer, BusState, CallRef, Facts};
use crate::supervision::lifecycle::{self, properties, service_path, unescape_id};
use crate::wire::names::{
    IFACE_INTROSPECT, IFACE_PEER, IFACE_PROPS, INTROSPECT_HEADER, SERVICE_IFACE,
    SERVICE_PATH_PREFIX, STANDARD_XML, SUPERVISOR_IFACE, SUPERVISOR_PATH,
};
use crate::wire::{self, BusError, ErrorName, Message, ObjectPath, OwnedVariant, Variant};

/// What a handler works with.
struct Ctx<'a> {
    sup: &'a mut SupervisorState,
    facts: &'a Facts,
    call: &'a CallRef,
    /// The service whose object was called, for service-object methods.
    service: String,
}

/// Which objects a row serves.
#[derive(Clone, Copy, PartialEq, Eq)]
enum On {
    Manager,
    Service,
    Any,
}

struct Method {
    on: On,
    iface: &'static str,
    member: &'static str,
    sig: &'static str,
    handler: fn(&mut Ctx<'_>, &Message) -> Answer,
}

const fn m(
    on: On,
    iface: &'static str,
    member: &'static str,
    sig: &'static str,
    handler: fn(&mut Ctx<'_>, &Message) -> Answer,
) -> Method {
    Method {
        on,
        iface,
        member,
        sig,
        handler,
    }
}

const METHODS: &[Method] = &[
    m(On::Any, IFACE_PEER, "Ping", "", ping),
    m(On::Any, IFACE_PEER, "GetMachineId", "", machine_id),
    m(On::Any, IFACE_INTROSPECT, "Introspect", "", introspect),
    m(
        On::Manager,
        SUPERVISOR_IFACE,
        "ListServices",
        "",
        list_services,
    ),
    m(On::Manager, SUPERVISOR_IFACE, "Snapshot", "", snapshot),
    m(
        On::Manager,
        SUPERVISOR_IFACE,
        "GetService",
        "s",
        get_service,
    ),
    m(On::Manager, SUPERVISOR_IFACE, "Start", "s", start_named),
    m(On::Manager, SUPERVISOR_IFACE, "Stop", "s", stop_named),
    m(On::Manager, SUPERVISOR_IFACE, "Restart", "s", restart_named),
    m(On::Manager, SUPERVISOR_IFACE, "Reload", "", reload),
    m(On::Manager, SUPERVISOR_IFACE, "GetLogs", "su", logs_named),
    m(
        On::Manager,
        SUPERVISOR_IFACE,
        "GetLogEntries",
        "sut",
        log_entries_named,
    ),
    m(
        On::Manager,
        SUPERVISOR_IFACE,
        "ListServiceProperties",
        "",
        list_service_properties,
    ),
    m(
        On::Manager,
        SUPERVISOR_IFACE,
        "ResetFailed",
        "s",
        reset_failed_named,
    ),
    m(On::Manager, SUPERVISOR_IFACE, "Kill", "ssi", kill_named),
    m(On::Manager, SUPERVISOR_IFACE, "Enable", "s", enable_named),
    m(On::Manager, SUPERVISOR_IFACE, "Disable", "s", disable_named),
    m(On::Manager, IFACE_PROPS, "GetAll", "s", manager_get_all),
    m(On::Manager, IFACE_PROPS, "Get", "ss", manager_get),
    m(On::Service, IFACE_PROPS, "Get", "ss", prop_read),
    m(On::Service, IFACE_PROPS, "GetAll", "s", prop_read),
    m(On::Service, IFACE_PROPS, "Set", "ssv", prop_set),
    m(On::Service, SERVICE_IFACE, "Start", "", start_this),
    m(On::Service, SERVICE_IFACE, "Stop", "", stop_this),
    m(On::Service, SERVICE_IFACE, "Restart", "", restart_this),
    m(On::Service, SERVICE_IFACE, "GetLogs", "u", logs_this),
    m(
        On::Service,
        SERVICE_IFACE,
        "GetLogEntries",
        "ut",
        log_entries_this,
    ),
    m(
        On::Service,
        SERVICE_IFACE,
        "ResetFailed",
        "",
        reset_failed_this,
    ),
    m(On::Service, SERVICE_IFACE, "Kill", "si", kill_this),
    m(On::Service, SERVICE_IFACE, "Enable", "", enable_this),
    m(On::Service, SERVICE_IFACE, "Disable", "", disable_this),
];

/// Handle a method call to org.busvisor.Supervisor1.
pub(super) fn call(
    sup: &mut SupervisorState,
    call: &CallRef,
    facts: &Facts,
    _core: &mut BusState,
) -> Answer {
    let msg = &call.call;
    let hdr = msg.header();
    let path = hdr.path().map(|p| p.as_str()).unwrap_or("/");
    let iface = hdr.interface().map(|i| i.as_str());
    let member = hdr.member().map(|m| m.as_str()).unwrap_or("");
    let sig = crate::bus::matching::body_signature(msg);
    let service = path
        .strip_prefix(SERVICE_PATH_PREFIX)
        .and_then(unescape_id)
        .filter(|id| sup.services.contains_key(id));
    let on = match (&service, path == SUPERVISOR_PATH) {
        (_, true) => On::Manager,
        (Some(_), _) => On::Service,
        (None, _) => On::Any,
    };
    let row = METHODS.iter().find(|r| {
        r.member == member
            && r.sig == sig
            && iface.is_none_or(|i| i == r.iface)
            && (r.on == On::Any || r.on == on)
    });
    let Some(row) = row else {
        // A method that exists, called with other arguments: InvalidArgs,
        // as the driver, dbus-daemon, GDBus and sd-bus answer.
        if let Some(r) = METHODS.iter().find(|r| {
            r.member == member
                && iface.is_none_or(|i| i == r.iface)
                && (r.on == On::Any || r.on == on)
        }) {
            return Err(BusError::invalid_args(format!(
                "Call to {member} has wrong args ({sig}, expected {})",
                r.sig
            )));
        }
        if on == On::Any
            && !METHODS
                .iter()
                .any(|r| r.on == On::Any && r.member == member)
        {
            return Err(BusError::new(
                ErrorName::UnknownMethod,
                format!("No such object path '{path}'"),
            ));
        }
        return Err(BusError::new(
            ErrorName::UnknownMethod,
            format!(
                "Method \"{member}\" with signature \"{sig}\" on interface \"{}\" doesn't exist",
                iface.unwrap_or("(null)")
            ),
        ));
    };
    let mut cx = Ctx {
        sup,
        facts,
        call,
        service: service.unwrap_or_default(),
    };
    (row.handler)(&mut cx, msg)
}

fn ok<B>(msg: &Message, body: &B) -> Answer
where
    B: serde::Serialize + wire::DynamicType,
{
    Ok(wire::reply(msg, body))
}

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
    let path =
        ObjectPath::try_from(service_path(&svc.def.id)).expect("escaped ids make valid paths");
    (
        &svc.def.id,
        &svc.def.names,
        svc.state().as_str(),
        svc.reason(),
        svc.main_pid.unwrap_or(0) as u32,
        path,
    )
}

/// The id of the service named by an id or by one of its bus names.
fn find(sup: &SupervisorState, name: &str) -> Result<String, BusError> {
    let id = match sup.services.get(name) {
        Some(_) => Some(name.to_owned()),
        None => sup.catalog.catalog.lookup(name).map(|d| d.id.clone()),
    };
    id.filter(|id| sup.services.contains_key(id))
        .ok_or_else(|| BusError::new(ErrorName::NoSuchService, format!("no such service: {name}")))
}

fn named(msg: &Message) -> Result<String, BusError> {
    let body = msg.body();
    let name: &str = wire::args(&body)?;
    Ok(name.to_owned())
}

fn ping(_cx: &mut Ctx<'_>, msg: &Message) -> Answer {
    ok(msg, &())
}

fn machine_id(cx: &mut Ctx<'_>, msg: &Message) -> Answer {
    ok(msg, &(&cx.facts.machine_id,))
}

fn list_services(cx: &mut Ctx<'_>, msg: &Message) -> Answer {
    let rows: Vec<Row<'_>> = cx.sup.services.values().map(row).collect();
    ok(msg, &(rows,))
}

fn snapshot(cx: &mut Ctx<'_>, msg: &Message) -> Answer {
    let rows: Vec<Row<'_>> = cx.sup.services.values().map(row).collect();
    ok(msg, &(cx.sup.events.serial(), rows))
}

fn get_service(cx: &mut Ctx<'_>, msg: &Message) -> Answer {
    let id = find(cx.sup, &named(msg)?)?;
    let path = ObjectPath::try_from(service_path(&id))
        .map_err(|e| BusError::invalid_args(e.to_string()))?;
    ok(msg, &(path,))
}

/// Hand Start, Stop or Restart to the task; the call is answered when done.
fn operation(cx: &mut Ctx<'_>, id: String, op: fn(String, CallRef) -> Cmd) -> Answer {
    cx.sup.cmd.send(op(id, cx.call.clone()));
    Ok(None)
}

fn start_named(cx: &mut Ctx<'_>, msg: &Message) -> Answer {
    let id = find(cx.sup, &named(msg)?)?;
    operation(cx, id, Cmd::Start)
}

fn stop_named(cx: &mut Ctx<'_>, msg: &Message) -> Answer {
    let id = find(cx.sup, &named(msg)?)?;
    operation(cx, id, Cmd::Stop)
}

fn restart_named(cx: &mut Ctx<'_>, msg: &Message) -> Answer {
    let id = find(cx.sup, &named(msg)?)?;
    operation(cx, id, Cmd::Restart)
}

fn start_this(cx: &mut Ctx<'_>, _msg: &Message) -> Answer {
    let id = cx.service.clone();
    operation(cx, id, Cmd::Start)
}

fn stop_this(cx: &mut Ctx<'_>, _msg: &Message) -> Answer {
    let id = cx.service.clone();
    operation(cx, id, Cmd::Stop)
}

fn restart_this(cx: &mut Ctx<'_>, _msg: &Message) -> Answer {
    let id = cx.service.clone();
    operation(cx, id, Cmd::Restart)
}

fn reload(cx: &mut Ctx<'_>, _msg: &Message) -> Answer {
    crate::bus::Activator::reload(cx.sup, Some(cx.call.clone()));
    Ok(None)
}

/// The last `n` entries (0: all) of a service's output, from `since_us`
/// (µs since the epoch; 0: from the first kept).
fn entries(svc: &Service, n: u32, since_us: u64) -> impl Iterator<Item = &LogEntry> {
    let first = svc
        .logs
        .partition_point(|e| lifecycle::micros(Some(e.time)) < since_us);
    let kept = svc.logs.len() - first;
    let n = if n == 0 { kept } else { (n as usize).min(kept) };
    svc.logs.range(svc.logs.len() - n..)
}

fn logs(svc: &Service, n: u32) -> Vec<String> {
    entries(svc, n, 0).map(|e| e.line.clone()).collect()
}

/// (time in µs, pid, stream, line) for GetLogEntries.
type EntryRow<'a> = (u64, u32, &'static str, &'a str);

fn log_entries(svc: &Service, n: u32, since_us: u64) -> Vec<EntryRow<'_>> {
    entries(svc, n, since_us)
        .map(|e| {
            let t = lifecycle::micros(Some(e.time));
            (t, e.pid as u32, e.stream.as_str(), e.line.as_str())
        })
        .collect()
}

fn log_entries_named(cx: &mut Ctx<'_>, msg: &Message) -> Answer {
    let body = msg.body();
    let (name, n, since): (&str, u32, u64) = wire::args(&body)?;
    let id = find(cx.sup, name)?;
    ok(msg, &(log_entries(&cx.sup.services[&id], n, since),))
}

fn log_entries_this(cx: &mut Ctx<'_>, msg: &Message) -> Answer {
    let body = msg.body();
    let (n, since): (u32, u64) = wire::args(&body)?;
    ok(
        msg,
        &(log_entries(&cx.sup.services[&cx.service], n, since),),
    )
}

/// Every service's properties, by id, in one call (`busvisor list`).
fn list_service_properties(cx: &mut Ctx<'_>, msg: &Message) -> Answer {
    let all: HashMap<&str, HashMap<&str, OwnedVariant>> = cx
        .sup
        .services
        .iter()
        .map(|(id, svc)| (id.as_str(), properties(svc).into_iter().collect()))
        .collect();
    ok(msg, &(&all,))
}

fn reset_failed_named(cx: &mut Ctx<'_>, msg: &Message) -> Answer {
    let name = named(msg)?;
    // "": every failed service.
    let id = if name.is_empty() {
        None
    } else {
        Some(find(cx.sup, &name)?)
    };
    cx.sup.cmd.send(Cmd::ResetFailed(id, cx.call.clone()));
    Ok(None)
}

fn reset_failed_this(cx: &mut Ctx<'_>, _msg: &Message) -> Answer {
    cx.sup
        .cmd
        .send(Cmd::ResetFailed(Some(cx.service.clone()), cx.call.clone()));
    Ok(None)
}

/// `whom` (`all`: every process of the service, `main`: its main process)
/// and a signal number.
fn kill_args(whom: &str, signal: i32) -> Result<(bool, nix::sys::signal::Signal), BusError> {
    let main = match whom {
        "all" | "" => false,
        "main" => true,
        other => {
            return Err(BusError::invalid_args(format!(
                "whom must be \"all\" or \"main\", not {other:?}"
            )));
        }
    };
    let sig = nix::sys::signal::Signal::try_from(signal)
        .map_err(|_| BusError::invalid_args(format!("no such signal: {signal}")))?;
    Ok((main, sig))
}

fn kill_named(cx: &mut Ctx<'_>, msg: &Message) -> Answer {
    let body = msg.body();
    let (name, whom, signal): (&str, &str, i32) = wire::args(&body)?;
    let id = find(cx.sup, name)?;
    let (main, sig) = kill_args(whom, signal)?;
    cx.sup.cmd.send(Cmd::Kill(id, main, sig, cx.call.clone()));
    Ok(None)
}

fn kill_this(cx: &mut Ctx<'_>, msg: &Message) -> Answer {
    let body = msg.body();
    let (whom, signal): (&str, i32) = wire::args(&body)?;
    let (main, sig) = kill_args(whom, signal)?;
    let id = cx.service.clone();
    cx.sup.cmd.send(Cmd::Kill(id, main, sig, cx.call.clone()));
    Ok(None)
}

fn set_enabled(cx: &mut Ctx<'_>, id: String, enable: bool) -> Answer {
    let file = cx.sup.services[&id].def.file.clone();
    cx.sup
        .cmd
        .send(Cmd::SetEnabled(id, file, enable, cx.call.clone()));
    Ok(None)
}

fn enable_named(cx: &mut Ctx<'_>, msg: &Message) -> Answer {
    let id = find(cx.sup, &named(msg)?)?;
    set_enabled(cx, id, true)
}

fn disable_named(cx: &mut Ctx<'_>, msg: &Message) -> Answer {
    let id = find(cx.sup, &named(msg)?)?;
    set_enabled(cx, id, false)
}

fn enable_this(cx: &mut Ctx<'_>, _msg: &Message) -> Answer {
    let id = cx.service.clone();
    set_enabled(cx, id, true)
}

fn disable_this(cx: &mut Ctx<'_>, _msg: &Message) -> Answer {
    let id = cx.service.clone();
    set_enabled(cx, id, false)
}

fn logs_named(cx: &mut Ctx<'_>, msg: &Message) -> Answer {
    let body = msg.body();
    let (name, n): (&str, u32) = wire::args(&body)?;
    let id = find(cx.sup, name)?;
    ok(msg, &(logs(&cx.sup.services[&id], n),))
}

fn logs_this(cx: &mut Ctx<'_>, msg: &Message) -> Answer {
    let body = msg.body();
    let n: u32 = wire::args(&body)?;
    ok(msg, &(logs(&cx.sup.services[&cx.service], n),))
}

fn manager_get_all(_cx: &mut Ctx<'_>, msg: &Message) -> Answer {
    let all: HashMap<&str, OwnedVariant> = HashMap::new();
    ok(msg, &(&all,))
}

fn manager_get(_cx: &mut Ctx<'_>, _msg: &Message) -> Answer {
    Err(BusError::new(
        ErrorName::UnknownProperty,
        "The manager has no properties",
    ))
}

/// Get and GetAll of a service that has processes: answered by the task
/// after a look at them, so that `PIDs` is complete and current (a
/// service's helpers are otherwise found only when something happens to
/// it). An idle service is answered at once.
fn prop_read(cx: &mut Ctx<'_>, msg: &Message) -> Answer {
    let svc = &cx.sup.services[&cx.service];
    if svc.is_idle() && svc.pids.is_empty() {
        return properties_reply(svc, msg);
    }
    let id = cx.service.clone();
    cx.sup.cmd.send(Cmd::Properties(id, cx.call.clone()));
    Ok(None)
}

/// The answer to Get or GetAll (`msg`) of `svc`'s properties.
pub(super) fn properties_reply(svc: &Service, msg: &Message) -> Answer {
    let body = msg.body();
    if msg
        .header()
        .member()
        .is_some_and(|m| m.as_str() == "GetAll")
    {
        let i: &str = wire::args(&body)?;
        let all: HashMap<&str, OwnedVariant> = if i == SERVICE_IFACE || i.is_empty() {
            properties(svc).into_iter().collect()
        } else {
            HashMap::new()
        };
        return ok(msg, &(&all,));
    }
    let (i, prop): (&str, &str) = wire::args(&body)?;
    if i != SERVICE_IFACE {
        return Err(BusError::new(
            ErrorName::UnknownInterface,
            format!("No such interface '{i}'"),
        ));
    }
    let props = properties(svc);
    let Some((_, v)) = props.iter().find(|(k, _)| *k == prop) else {
        return Err(BusError::new(
            ErrorName::UnknownProperty,
            format!("No such property '{prop}'"),
        ));
    };
    let v: Variant<'_> = (**v)
        .try_clone()
        .map_err(|e| BusError::invalid_args(e.to_string()))?;
    ok(msg, &(v,))
}

fn prop_set(_cx: &mut Ctx<'_>, _msg: &Message) -> Answer {
    Err(BusError::new(
        ErrorName::PropertyReadOnly,
        "The properties of a service are read-only",
    ))
}

fn introspect(cx: &mut Ctx<'_>, msg: &Message) -> Answer {
    let path = msg
        .header()
        .path()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let xml = introspect_xml(cx.sup, &path);
    ok(msg, &(&xml,))
}

/// The manager's interface, with its arguments and signals.
const MANAGER_XML: &str = include_str!("manager.xml");

fn introspect_xml(sup: &SupervisorState, path: &str) -> String {
    let mut xml = format!("{INTROSPECT_HEADER}<node>\n");
    let service_dir = SERVICE_PATH_PREFIX.trim_end_matches('/');
    if path == SUPERVISOR_PATH {
        xml.push_str(MANAGER_XML);
        xml.push_str(STANDARD_XML);
        xml.push_str("  <node name=\"service\"/>\n");
    } else if path == service_dir {
        for id in sup.services.keys() {
            xml.push_str(&format!(
                "  <node name=\"{}\"/>\n",
                lifecycle::escape_id(id)
            ));
        }
    } else if let Some(id) = path.strip_prefix(SERVICE_PATH_PREFIX).and_then(unescape_id)
        && let Some(svc) = sup.services.get(&id)
    {
        service_xml(&mut xml, svc);
        xml.push_str(STANDARD_XML);
    } else {
        // Ancestors of the manager's path list the next element.
        let rest = SUPERVISOR_PATH
            .strip_prefix(path.trim_end_matches('/'))
            .unwrap_or("");
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

/// A service object's methods, with their arguments.
const SERVICE_XML: &str = include_str!("service.xml");

/// A service object's interface: its methods, and its properties from the
/// one property schema (`lifecycle::properties`).
fn service_xml(xml: &mut String, svc: &Service) {
    xml.push_str(SERVICE_XML);
    for (name, value) in properties(svc) {
        xml.push_str(&format!(
            "    <property name=\"{name}\" type=\"{}\" access=\"read\"/>\n",
            value.value_signature()
        ));
    }
    xml.push_str("  </interface>\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every method of the table is in the introspection data, with the
    /// signature the table answers.
    #[test]
    fn introspection_lists_every_method() {
        for r in METHODS
            .iter()
            .filter(|r| r.iface != IFACE_PROPS && r.on != On::Any)
        {
            let xml = if r.on == On::Manager {
                MANAGER_XML
            } else {
                SERVICE_XML
            };
            let start = xml
                .find(&format!("<method name=\"{}\"", r.member))
                .unwrap_or_else(|| panic!("{} missing", r.member));
            let tag_end = start + xml[start..].find('>').unwrap();
            let sig: String = if xml[..=tag_end].ends_with("/>") {
                // No arguments.
                String::new()
            } else {
                let end = start + xml[start..].find("</method>").unwrap();
                xml[start..end]
                    .split("<arg ")
                    .skip(1)
                    .filter(|a| a.contains("direction=\"in\""))
                    .filter_map(|a| a.split("type=\"").nth(1)?.split('"').next())
                    .collect()
            };
            assert_eq!(sig, r.sig, "{}", r.member);
        }
    }
}
