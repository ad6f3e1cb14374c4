//! The control commands (`busvisor list`, `status`, `start`, `logs`,
//! `events`, ...): a client of the `org.busvisor.Supervisor1` API
//! (docs/API.md) of a running busvisor; and `check`, which reads definition
//! files without a bus. docs/CLI.md is the user's reference.

mod commands;
mod events;
pub mod json;
pub mod text;

use crate::wire::names;
use std::collections::HashMap;
use std::io;
use std::process::ExitCode;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Map, Value as Json};
use tokio::sync::mpsc;
use zbus::message::{Message, Type as MessageType};
use zbus::{Connection, OwnedObjectPath, OwnedVariant, Structure, Variant};

use crate::cli::{ClientArgs, ClientCommand};
pub use text::Output;

/// The manager's bus name, object path and interface.
pub const SUPERVISOR: &str = names::SUPERVISOR_NAME;
pub const SUPERVISOR_PATH: &str = names::SUPERVISOR_PATH;
/// The interface of each service's object.
pub const SERVICE_IFACE: &str = names::SERVICE_IFACE;
/// The match rule for every lifecycle signal (and `LogLine`) from
/// `owner`, the unique name owning the supervisor's name, plus `extra` keys.
fn events_match(owner: &str, extra: &str) -> String {
    format!(
        "type='signal',sender='{}',interface='{}'{extra}",
        match_escape(owner),
        names::SUPERVISOR_IFACE
    )
}

/// Escape a value for a match rule's quoted string.
fn match_escape(s: &str) -> String {
    s.replace('\'', r"'\''")
}

const DBUS: &str = names::BUS_NAME;
const DBUS_PATH: &str = names::BUS_PATH;
const PROPERTIES: &str = names::IFACE_PROPS;
const ERR_NO_SUCH_SERVICE: &str = names::ErrorName::NoSuchService.as_str();
const ERR_START_FAILED: &str = names::ErrorName::StartFailed.as_str();

/// How long connecting (socket, authentication, Hello) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A service's D-Bus properties as JSON values, by property name.
pub type Props = Map<String, Json>;

/// The `Id` of a service's properties.
pub fn id_of(p: &Props) -> &str {
    p.get("Id").and_then(Json::as_str).unwrap_or("")
}

fn props_to_json(props: &HashMap<String, OwnedVariant>) -> Props {
    props
        .iter()
        .map(|(k, v)| (k.clone(), variant_to_json(v)))
        .collect()
}

/// Why a command did not succeed.
#[derive(Debug)]
pub enum Failure {
    /// Reported on stderr as `busvisor: MESSAGE` (and under `--json` as a
    /// JSON error on stdout); exit status `code`.
    Msg(String, u8),
    /// The output said it all: exit with this status (`is-active`, `status`
    /// of a service that does not run).
    Status(u8),
    /// stdout was closed (e.g. `busvisor events | head -1`): stop quietly.
    BrokenPipe,
}

/// Exit status of `status`, `is-active` for a service that does not run.
pub const EXIT_NOT_RUNNING: u8 = 3;
/// Exit status of `status`, `is-active`, `is-failed` for no such service.
pub const EXIT_NO_SUCH_SERVICE: u8 = 4;

impl Failure {
    fn msg(s: impl Into<String>) -> Failure {
        Failure::Msg(s.into(), 1)
    }
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Failure {
        if e.kind() == io::ErrorKind::BrokenPipe {
            Failure::BrokenPipe
        } else {
            Failure::msg(format!("cannot write the output: {e}"))
        }
    }
}

type Result<T, E = Failure> = std::result::Result<T, E>;

/// Whether the command prints JSON (its errors too).
fn wants_json(cmd: &ClientCommand) -> bool {
    match cmd {
        ClientCommand::List(a) => a.client.json,
        ClientCommand::Status(a) => a.client.json,
        ClientCommand::Show(a) => a.client.json,
        ClientCommand::Cat(a) => a.client.json,
        ClientCommand::Start(a) | ClientCommand::Stop(a) | ClientCommand::Restart(a) => {
            a.client.json
        }
        ClientCommand::IsActive(a) | ClientCommand::IsFailed(a) => a.client.json,
        ClientCommand::Kill(a) => a.client.json,
        ClientCommand::Enable(a) | ClientCommand::Disable(a) => a.client.json,
        ClientCommand::ResetFailed(a) => a.client.json,
        ClientCommand::Logs(a) => a.client.json || a.output == crate::cli::LogFormat::Json,
        ClientCommand::Events(a) => a.client.json,
        ClientCommand::Reload(a) => a.json,
        ClientCommand::Check(a) => a.json,
    }
}

/// Run a control command to completion; the exit code is 0 on success,
/// and otherwise the command's (1 for most failures, whose cause is
/// printed to stderr, and under `--json` to stdout as well).
pub fn main(cmd: ClientCommand) -> ExitCode {
    let json = wants_json(&cmd);
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("busvisor: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let res = rt.block_on(commands::run(cmd));
    // Do not wait for the connection's background tasks.
    rt.shutdown_background();
    match res {
        Ok(()) | Err(Failure::BrokenPipe) => ExitCode::SUCCESS,
        Err(Failure::Status(code)) => ExitCode::from(code),
        Err(Failure::Msg(m, code)) => {
            if json {
                let _ = Output::stdout().json(&json::error(&m));
            }
            eprintln!("busvisor: {m}");
            ExitCode::from(code)
        }
    }
}

// ---------------------------------------------------------------- connection

/// Where a system bus listens when `$DBUS_SYSTEM_BUS_ADDRESS` does not say
/// (the specification's default).
const SYSTEM_BUS_DEFAULT: &str = "unix:path=/run/dbus/system_bus_socket";

/// The bus address: `--address`; with `--system`, `$DBUS_SYSTEM_BUS_ADDRESS`
/// or the system bus's default; else `$DBUS_SESSION_BUS_ADDRESS`, else
/// the user's bus at `$XDG_RUNTIME_DIR/bus` (as sd-bus and GLib find it,
/// and where `busvisor daemon` listens by default).
pub fn bus_address(args: &ClientArgs) -> Result<String> {
    if args.system && args.address.is_none() {
        return Ok(std::env::var("DBUS_SYSTEM_BUS_ADDRESS")
            .ok()
            .filter(|a| !a.is_empty())
            .unwrap_or_else(|| SYSTEM_BUS_DEFAULT.to_owned()));
    }
    if let Some(a) = &args.address {
        if a.is_empty() {
            return Err(Failure::msg("--address: the bus address is empty"));
        }
        return Ok(a.clone());
    }
    match std::env::var("DBUS_SESSION_BUS_ADDRESS") {
        Ok(a) if !a.is_empty() => Ok(a),
        _ => user_bus_address(std::env::var_os("XDG_RUNTIME_DIR")),
    }
}

/// `unix:path=$XDG_RUNTIME_DIR/bus` if a socket is there.
fn user_bus_address(runtime_dir: Option<std::ffi::OsString>) -> Result<String> {
    use std::os::unix::fs::FileTypeExt;
    const HOW: &str = "pass --address ADDRESS, or set DBUS_SESSION_BUS_ADDRESS";
    let Some(dir) = runtime_dir.filter(|d| !d.is_empty()) else {
        return Err(Failure::msg(format!(
            "no bus address: DBUS_SESSION_BUS_ADDRESS and XDG_RUNTIME_DIR are not set ({HOW})"
        )));
    };
    let path = std::path::Path::new(&dir).join("bus");
    match std::fs::metadata(&path) {
        Ok(m) if m.file_type().is_socket() => {
            Ok(crate::config::address::client_address_for_path(&path))
        }
        _ => Err(Failure::msg(format!(
            "no bus address: DBUS_SESSION_BUS_ADDRESS is not set and no user bus listens at {} ({HOW})",
            path.display()
        ))),
    }
}

/// A connection to busvisor's bus.
pub struct Client {
    pub conn: Connection,
    pub address: String,
}

impl Client {
    pub async fn connect(args: &ClientArgs) -> Result<Client> {
        let address = bus_address(args)?;
        let fail = |e: &dyn std::fmt::Display| {
            Failure::msg(format!("cannot connect to the bus at {address}: {e}"))
        };
        let builder = zbus::connection::Builder::address(address.as_str());
        let conn = match tokio::time::timeout(CONNECT_TIMEOUT, builder.build()).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(fail(&e)),
            Err(_) => return Err(fail(&format!("timed out after {CONNECT_TIMEOUT:?}"))),
        };
        Ok(Client { conn, address })
    }

    /// Call a method of the manager object.
    async fn call<B>(&self, method: &str, body: &B) -> zbus::Result<Message>
    where
        B: serde::Serialize + zbus::wire::DynamicType,
    {
        self.conn
            .call_method(
                Some(SUPERVISOR),
                SUPERVISOR_PATH,
                Some(SUPERVISOR),
                method,
                body,
            )
            .await
    }

    /// Call a method of the manager and decode its reply; `name` is the
    /// service the call is about, for error messages.
    async fn call_decode<B, R>(&self, method: &str, body: &B, name: Option<&str>) -> Result<R>
    where
        B: serde::Serialize + zbus::wire::DynamicType,
        R: for<'d> serde::Deserialize<'d> + zbus::wire::Type,
    {
        let reply = self
            .call(method, body)
            .await
            .map_err(|e| self.explain(e, method, name))?;
        reply.body().deserialize::<R>().map_err(|e| {
            Failure::msg(format!(
                "unexpected reply to {method} (signature {}): {e}",
                reply.body().signature()
            ))
        })
    }

    /// Turn a failed call into a message naming the cause.
    fn explain(&self, e: zbus::Error, method: &str, name: Option<&str>) -> Failure {
        let (ename, detail) = match &e {
            zbus::Error::MethodError(n, d, _) => (n.to_string(), d.clone().unwrap_or_default()),
            zbus::Error::FDO(f) => {
                use zbus::DBusError;
                (
                    f.name().to_string(),
                    f.description().unwrap_or_default().to_owned(),
                )
            }
            other => {
                return Failure::msg(format!(
                    "{method}: lost the connection to the bus at {}: {other}",
                    self.address
                ));
            }
        };
        let name = match name {
            Some("") => "\"\"",
            Some(n) => n,
            None => "",
        };
        let msg = match ename.as_str() {
            ERR_NO_SUCH_SERVICE => format!("no such service: {name}"),
            ERR_START_FAILED => {
                let verb = if method == "Restart" {
                    "restart"
                } else {
                    "start"
                };
                if detail.is_empty() {
                    format!("cannot {verb} {name}")
                } else {
                    format!("cannot {verb} {name}: {detail}")
                }
            }
            "org.freedesktop.DBus.Error.UnknownMethod"
            | "org.freedesktop.DBus.Error.UnknownObject"
            | "org.freedesktop.DBus.Error.UnknownInterface"
            | "org.freedesktop.DBus.Error.ServiceUnknown"
            | "org.freedesktop.DBus.Error.NameHasNoOwner" => format!(
                "the bus at {} does not provide busvisor's control API ({SUPERVISOR}): {method}: {ename}: {detail}",
                self.address
            ),
            _ if detail.is_empty() => format!("{method} failed: {ename}"),
            _ => format!("{method} failed: {detail} ({ename})"),
        };
        Failure::msg(msg)
    }

    /// Every service's properties, by D-Bus property name, sorted by id.
    pub async fn all_services(&self) -> Result<Vec<Props>> {
        let all: HashMap<String, HashMap<String, OwnedVariant>> =
            self.call_decode("ListServiceProperties", &(), None).await?;
        let mut v: Vec<Props> = all.values().map(props_to_json).collect();
        v.sort_by(|a, b| id_of(a).cmp(id_of(b)));
        Ok(v)
    }

    /// The object path of a service, by id or bus name.
    pub async fn service_path(&self, name: &str) -> Result<OwnedObjectPath> {
        self.call_decode("GetService", &(name,), Some(name)).await
    }

    /// The id of a service, by id or bus name.
    pub async fn service_id(&self, name: &str) -> Result<String> {
        let path = self.service_path(name).await?;
        path.as_str()
            .strip_prefix(names::SERVICE_PATH_PREFIX)
            .and_then(crate::supervision::lifecycle::unescape_id)
            .ok_or_else(|| Failure::msg(format!("unexpected service path {}", path.as_str())))
    }

    /// Send a call to the manager without asking for a reply (`--no-block`).
    async fn send_no_reply<B>(&self, method: &str, body: &B) -> Result<()>
    where
        B: serde::Serialize + zbus::wire::DynamicType,
    {
        let fail = |e: zbus::Error| Failure::msg(format!("{method}: {e}"));
        let msg = Message::method_call(SUPERVISOR_PATH, method)
            .destination(SUPERVISOR)
            .interface(SUPERVISOR)
            .with_flags(zbus::message::Flags::NO_REPLY_EXPECTED)
            .build(body)
            .map_err(fail)?;
        self.conn.send(&msg).await.map_err(fail)
    }

    /// A round trip to the bus: what was sent before has reached it.
    async fn flush(&self) -> Result<()> {
        self.conn
            .call_method(Some(DBUS), DBUS_PATH, Some(DBUS), "GetId", &())
            .await
            .map(drop)
            .map_err(|e| self.explain(e, "GetId", None))
    }

    /// A service's properties, its processes as they are now.
    pub async fn service(&self, name: &str) -> Result<Props> {
        let path = self.service_path(name).await?;
        let props = self.service_properties(path.as_str(), name).await?;
        Ok(props_to_json(&props))
    }

    /// Every `Service1` property of the object at `path`.
    pub async fn service_properties(
        &self,
        path: &str,
        name: &str,
    ) -> Result<HashMap<String, OwnedVariant>> {
        let reply = self
            .conn
            .call_method(
                Some(SUPERVISOR),
                path,
                Some(PROPERTIES),
                "GetAll",
                &(SERVICE_IFACE,),
            )
            .await
            .map_err(|e| self.explain(e, "GetAll", Some(name)))?;
        reply
            .body()
            .deserialize::<HashMap<String, OwnedVariant>>()
            .map_err(|e| Failure::msg(format!("unexpected reply to GetAll: {e}")))
    }

    /// Receive every signal of the manager interface from the owner of its
    /// name, with the match keys `extra` (`,member='...'`), from before this
    /// returns on. Only that owner is believed: a signal addressed to this
    /// client by anyone else (no match rule is needed for that) is dropped.
    /// The messages are drained from the connection at once (so that they
    /// never hold up replies to method calls) and queued, unbounded, in the
    /// returned channel; it closes with the connection.
    pub async fn subscribe(&self, extra: &str) -> Result<mpsc::UnboundedReceiver<Message>> {
        let owner: String = self
            .conn
            .call_method(
                Some(DBUS),
                DBUS_PATH,
                Some(DBUS),
                "GetNameOwner",
                &(SUPERVISOR,),
            )
            .await
            .and_then(|m| m.body().deserialize())
            .map_err(|e| self.explain(e, "GetNameOwner", None))?;
        let rule = events_match(&owner, extra);
        let mut stream = zbus::MessageStream::from(&self.conn);
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(m) = stream.next().await {
                let Ok(m) = m else { continue };
                if m.message_type() != MessageType::Signal {
                    continue;
                }
                let h = m.header();
                if h.interface().map(|i| i.as_str()) != Some(SUPERVISOR)
                    || h.path().map(|p| p.as_str()) != Some(SUPERVISOR_PATH)
                    || h.sender().map(|s| s.as_str()) != Some(owner.as_str())
                {
                    continue;
                }
                drop(h);
                if tx.send(m).is_err() {
                    break;
                }
            }
        });
        self.conn
            .call_method(
                Some(DBUS),
                DBUS_PATH,
                Some(DBUS),
                "AddMatch",
                &(rule.as_str(),),
            )
            .await
            .map_err(|e| Failure::msg(format!("cannot subscribe to the signals ({rule}): {e}")))?;
        Ok(rx)
    }
}

// ---------------------------------------------------------------- values

/// A JSON value as plain text (strings unquoted).
pub(crate) fn json_plain(v: &Json) -> String {
    match v {
        Json::String(s) => s.clone(),
        Json::Array(a) => a.iter().map(json_plain).collect::<Vec<_>>().join(" "),
        other => other.to_string(),
    }
}

/// A D-Bus value as JSON: numbers, strings (also object paths and
/// signatures), arrays, objects for dictionaries, arrays for structures.
pub fn variant_to_json(v: &Variant<'_>) -> Json {
    match v {
        Variant::U8(x) => serde_json::json!(x),
        Variant::Bool(x) => serde_json::json!(x),
        Variant::I16(x) => serde_json::json!(x),
        Variant::U16(x) => serde_json::json!(x),
        Variant::I32(x) => serde_json::json!(x),
        Variant::U32(x) => serde_json::json!(x),
        Variant::I64(x) => serde_json::json!(x),
        Variant::U64(x) => serde_json::json!(x),
        Variant::F64(x) => serde_json::json!(x),
        Variant::Str(s) => serde_json::json!(s.as_str()),
        Variant::Signature(s) => serde_json::json!(s.to_string()),
        Variant::ObjectPath(p) => serde_json::json!(p.as_str()),
        Variant::Variant(b) => variant_to_json(b),
        Variant::Array(a) => Json::Array(a.inner().iter().map(variant_to_json).collect()),
        Variant::Dict(d) => Json::Object(
            d.iter()
                .map(|(k, v)| (json_plain(&variant_to_json(k)), variant_to_json(v)))
                .collect(),
        ),
        Variant::Structure(s) => Json::Array(s.fields().iter().map(variant_to_json).collect()),
        #[cfg(unix)]
        Variant::Fd(_) => Json::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_is_required() {
        let a = ClientArgs {
            address: Some("unix:path=/x".into()),
            ..Default::default()
        };
        assert_eq!(bus_address(&a).unwrap(), "unix:path=/x");
        let a = ClientArgs {
            address: Some(String::new()),
            ..Default::default()
        };
        assert!(bus_address(&a).is_err());
        // --system: the variable, else the specification's default (the
        // variable is not set in this test's environment by our harness).
        let a = ClientArgs {
            system: true,
            ..Default::default()
        };
        let want = std::env::var("DBUS_SYSTEM_BUS_ADDRESS")
            .ok()
            .filter(|a| !a.is_empty())
            .unwrap_or_else(|| SYSTEM_BUS_DEFAULT.into());
        assert_eq!(bus_address(&a).unwrap(), want);
    }

    #[test]
    fn the_user_bus_is_the_fallback() {
        let text = |r: Result<String>| match r {
            Err(Failure::Msg(m, _)) => m,
            other => panic!("{other:?}"),
        };
        let dir = tempfile::tempdir().unwrap();
        let e = text(user_bus_address(None));
        assert!(e.contains("XDG_RUNTIME_DIR"), "{e}");
        let e = text(user_bus_address(Some(dir.path().into())));
        assert!(e.contains(&format!("{}/bus", dir.path().display())), "{e}");
        // A file that is not a socket is no bus either.
        std::fs::write(dir.path().join("bus"), "").unwrap();
        assert!(user_bus_address(Some(dir.path().into())).is_err());
        std::fs::remove_file(dir.path().join("bus")).unwrap();
        let _l = std::os::unix::net::UnixListener::bind(dir.path().join("bus")).unwrap();
        assert_eq!(
            user_bus_address(Some(dir.path().into())).unwrap(),
            format!("unix:path={}/bus", dir.path().display())
        );
    }
}
