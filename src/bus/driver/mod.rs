//! `org.freedesktop.DBus`: the bus driver, answered by hand inside the bus
//! core (no object server, no extra hop), with dbus-daemon 1.14's error
//! names and texts.
//!
//! Every method is a row of [`METHODS`]: its interface, member and input
//! signature, whether it is served only at the canonical path, whether it
//! sends its own reply, and its handler (in `methods.rs`). One lookup both
//! validates and dispatches.

mod methods;

use super::peer::PeerId;
use super::{Activator, Answer, BusState, CallRef, Facts};
use crate::wire::names::{
    BUS_NAME, BUS_PATH, IFACE_DBUS, IFACE_INTROSPECT, IFACE_MONITORING, IFACE_PEER, IFACE_PROPS,
    IFACE_STATS, INTROSPECT_HEADER, SUPERVISOR_NAME, SYSTEMD_ACTIVATOR_IFACE,
};
use crate::wire::{BusError, ErrorName, Message, Type};

/// Bus features advertised in the Features property.
const FEATURES: &[&str] = &[
    "ActivatableServicesChanged",
    "HeaderFiltering",
    SUPERVISOR_NAME,
];
/// Extra interfaces advertised in the Interfaces property.
const INTERFACES: &[&str] = &[IFACE_MONITORING, IFACE_STATS];

/// The driver's introspection data, without the closing `</node>` (the
/// caller adds child nodes first).
pub(crate) fn introspection() -> String {
    format!("{INTROSPECT_HEADER}{}", include_str!("introspect.xml"))
}

/// What a handler works with.
struct Ctx<'a> {
    facts: &'a Facts,
    core: &'a mut BusState,
    sup: &'a mut dyn Activator,
    from: PeerId,
}

struct Method {
    iface: &'static str,
    member: &'static str,
    /// The input signature.
    sig: &'static str,
    /// Served only at /org/freedesktop/DBus (dbus-daemon's methods without
    /// METHOD_FLAG_ANY_PATH).
    canonical_path: bool,
    /// Only for the bus's own user and root (METHOD_FLAG_PRIVILEGED).
    privileged: bool,
    /// Sends its own reply, in order with the signals it causes.
    replies_itself: bool,
    handler: fn(&mut Ctx<'_>, &Message) -> Answer,
}

impl std::fmt::Debug for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.iface, self.member)
    }
}

const fn m(
    iface: &'static str,
    member: &'static str,
    sig: &'static str,
    handler: fn(&mut Ctx<'_>, &Message) -> Answer,
) -> Method {
    Method {
        iface,
        member,
        sig,
        canonical_path: false,
        privileged: false,
        replies_itself: false,
        handler,
    }
}

/// A method of the org.freedesktop.DBus interface itself.
const fn dbus(
    member: &'static str,
    sig: &'static str,
    handler: fn(&mut Ctx<'_>, &Message) -> Answer,
) -> Method {
    m(IFACE_DBUS, member, sig, handler)
}

const fn canonical(mut method: Method) -> Method {
    method.canonical_path = true;
    method
}

const fn privileged(mut method: Method) -> Method {
    method.privileged = true;
    method
}

const fn replies_itself(mut method: Method) -> Method {
    method.replies_itself = true;
    method
}

use methods as h;

const METHODS: &[Method] = &[
    replies_itself(dbus("Hello", "", h::hello)),
    dbus("RequestName", "su", h::request_name),
    dbus("ReleaseName", "s", h::release_name),
    dbus("StartServiceByName", "su", h::start_service_by_name),
    privileged(canonical(dbus(
        "UpdateActivationEnvironment",
        "a{ss}",
        h::update_env,
    ))),
    dbus("NameHasOwner", "s", h::name_has_owner),
    dbus("ListNames", "", h::list_names),
    dbus("ListActivatableNames", "", h::list_activatable_names),
    dbus("AddMatch", "s", h::add_match),
    dbus("RemoveMatch", "s", h::remove_match),
    dbus("GetNameOwner", "s", h::get_name_owner),
    dbus("ListQueuedOwners", "s", h::list_queued_owners),
    dbus("GetConnectionUnixUser", "s", h::unix_user),
    dbus("GetConnectionUnixProcessID", "s", h::unix_process_id),
    dbus("GetAdtAuditSessionData", "s", h::audit_session_data),
    dbus(
        "GetConnectionSELinuxSecurityContext",
        "s",
        h::selinux_context,
    ),
    dbus("GetConnectionCredentials", "s", h::credentials),
    dbus("ReloadConfig", "", h::reload_config),
    dbus("GetId", "", h::get_id),
    replies_itself(privileged(canonical(m(
        IFACE_MONITORING,
        "BecomeMonitor",
        "asu",
        h::become_monitor,
    )))),
    canonical(m(IFACE_STATS, "GetStats", "", h::get_stats)),
    canonical(m(
        IFACE_STATS,
        "GetConnectionStats",
        "s",
        h::get_connection_stats,
    )),
    canonical(m(
        IFACE_STATS,
        "GetAllMatchRules",
        "",
        h::get_all_match_rules,
    )),
    m(IFACE_INTROSPECT, "Introspect", "", h::introspect),
    m(IFACE_PEER, "Ping", "", h::ping),
    m(IFACE_PEER, "GetMachineId", "", h::get_machine_id),
    canonical(m(IFACE_PROPS, "Get", "ss", h::prop_get)),
    canonical(m(IFACE_PROPS, "GetAll", "s", h::prop_get_all)),
    canonical(m(IFACE_PROPS, "Set", "ssv", h::prop_set)),
];

/// Interfaces served at any object path (dbus-daemon's
/// INTERFACE_FLAG_ANY_PATH); the others only at /org/freedesktop/DBus.
const ANY_PATH_INTERFACES: &[&str] = &[IFACE_DBUS, IFACE_INTROSPECT, IFACE_PEER];

/// Whether `msg` is a Hello call (the only call an unregistered peer may make).
pub(crate) fn is_hello(msg: &Message) -> bool {
    let h = msg.header();
    msg.message_type() == Type::MethodCall
        && h.destination().map(|d| d.as_str()) == Some(BUS_NAME)
        && h.member().map(|m| m.as_str()) == Some("Hello")
}

/// Whether `msg` is systemd's ActivationFailure signal (any path, as
/// dbus-daemon takes it).
fn is_activation_failure(msg: &Message) -> bool {
    let h = msg.header();
    msg.message_type() == Type::Signal
        && h.interface().map(|i| i.as_str()) == Some(SYSTEMD_ACTIVATOR_IFACE)
        && h.member().map(|m| m.as_str()) == Some("ActivationFailure")
}

/// Handle a message addressed to `org.freedesktop.DBus`.
pub(super) fn handle(
    facts: &Facts,
    core: &mut BusState,
    sup: &mut dyn Activator,
    from: PeerId,
    msg: &Message,
) {
    let mut ctx = Ctx {
        facts,
        core,
        sup,
        from,
    };
    if msg.message_type() != Type::MethodCall {
        // Signals to the bus are allowed and ignored, as dbus-daemon does,
        // but for systemd's.
        if is_activation_failure(msg) {
            methods::activation_failure(&mut ctx, msg);
        }
        return;
    }
    let (answer, replied) = match find(msg).and_then(|m| admit(&ctx, m, msg)) {
        Err(e) => (Err(e), false),
        Ok(method) => {
            let answer = (method.handler)(&mut ctx, msg);
            let replied = method.replies_itself && answer.is_ok();
            (answer, replied)
        }
    };
    let core = ctx.core;
    if !replied {
        let call = CallRef {
            from,
            call: msg.clone(),
        };
        core.answer(&call, answer);
    }
}

/// The row for `msg`, as dbus-daemon's `bus_driver_handle_message` finds
/// it: interfaces in order, those not served at any path skipped away from
/// the canonical one, the first method of that name.
fn find(msg: &Message) -> Result<&'static Method, BusError> {
    let hdr = msg.header();
    let member = hdr.member().map(|m| m.as_str()).unwrap_or("");
    let iface = hdr.interface().map(|i| i.as_str());
    let canonical = hdr.path().map(|p| p.as_str()) == Some(BUS_PATH);
    let visible = |r: &Method| {
        (canonical || ANY_PATH_INTERFACES.contains(&r.iface)) && iface.is_none_or(|i| i == r.iface)
    };
    if let Some(method) = METHODS.iter().find(|r| visible(r) && r.member == member) {
        return Ok(method);
    }
    let name = if METHODS.iter().any(visible) {
        ErrorName::UnknownMethod
    } else {
        ErrorName::UnknownInterface
    };
    Err(BusError::new(
        name,
        format!("{BUS_NAME} does not understand message {member}"),
    ))
}

/// The checks between finding a method and running it, in dbus-daemon's
/// order: the caller's privilege, the object path, the signature.
fn admit(
    cx: &Ctx<'_>,
    method: &'static Method,
    msg: &Message,
) -> Result<&'static Method, BusError> {
    if method.privileged {
        methods::privileged(cx, method.member)?;
    }
    let hdr = msg.header();
    if method.canonical_path && hdr.path().map(|p| p.as_str()) != Some(BUS_PATH) {
        return Err(BusError::new(
            ErrorName::AccessDenied,
            format!(
                "Method '{}' is only available at the canonical object path '{BUS_PATH}'",
                method.member
            ),
        ));
    }
    let signature = crate::bus::matching::body_signature(msg);
    if signature != method.sig {
        // The newline is dbus-daemon's.
        return Err(BusError::invalid_args(format!(
            "Call to {} has wrong args ({signature}, expected {})\n",
            method.member, method.sig
        )));
    }
    Ok(method)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(iface: Option<&str>, member: &str, path: &str) -> Message {
        let mut b = Message::method_call(path, member).destination(BUS_NAME);
        if let Some(i) = iface {
            b = b.interface(i);
        }
        b.build(&()).unwrap()
    }

    #[test]
    fn every_row_is_unique_and_introspected() {
        let xml = introspection();
        for (i, r) in METHODS.iter().enumerate() {
            assert!(
                !METHODS[..i]
                    .iter()
                    .any(|o| o.iface == r.iface && o.member == r.member),
                "{} twice",
                r.member
            );
            assert!(xml.contains(&format!("<method name=\"{}\">", r.member)));
        }
    }

    #[test]
    fn lookup_is_dbus_daemons() {
        assert!(find(&call(None, "ListNames", "/")).is_ok());
        assert!(find(&call(None, "GetAll", BUS_PATH)).is_ok());
        let e = find(&call(Some("org.example.Nope"), "ListNames", "/")).unwrap_err();
        assert_eq!(e.name, ErrorName::UnknownInterface);
        assert_eq!(
            e.text,
            "org.freedesktop.DBus does not understand message ListNames"
        );
        let e = find(&call(Some(IFACE_DBUS), "Nope", "/")).unwrap_err();
        assert_eq!(e.name, ErrorName::UnknownMethod);
        // Interfaces not served at any path are not there elsewhere.
        let e = find(&call(Some(IFACE_MONITORING), "BecomeMonitor", "/")).unwrap_err();
        assert_eq!(e.name, ErrorName::UnknownInterface);
        let e = find(&call(Some(IFACE_PROPS), "GetAll", "/x")).unwrap_err();
        assert_eq!(e.name, ErrorName::UnknownInterface);
        // A method of an any-path interface is found; admit() refuses it.
        let m = find(&call(None, "UpdateActivationEnvironment", "/")).unwrap();
        assert!(m.canonical_path && m.privileged);
        assert!(is_hello(&call(Some(IFACE_DBUS), "Hello", "/")));
    }
}
