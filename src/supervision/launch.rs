//! What a service's process is started with, from its definition: command
//! line, environment, directory, user and cgroup. One derivation, used by
//! the supervisor and by the warden; the warden re-reads the root-owned
//! definition and derives the request itself instead of trusting the
//! router's (a router taken over by a hostile peer could otherwise ask root
//! to run anything as anyone).

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;

use super::procs;
use super::spawner::{Credentials, SpawnRequest};
use crate::activation::definition::{ServiceDef, Source};
use crate::wire::{BusError, ErrorName};

/// Variables a service must not inherit from the bus (dbus-daemon drops these too).
const DROPPED_ENV: &[&str] = &[
    "JOURNAL_STREAM",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "LISTEN_PID",
    "NOTIFY_SOCKET",
    "INVOCATION_ID",
    procs::TOKEN_VAR,
    crate::daemon::FORKED_ENV,
];

/// One start of one service.
pub(crate) struct Launch<'a> {
    pub(crate) def: &'a ServiceDef,
    /// The invocation's token (environment and cgroup).
    pub(crate) token: &'a str,
    /// The bus's address, for `DBUS_STARTER_ADDRESS`.
    pub(crate) address: &'a str,
    /// UpdateActivationEnvironment's variables (none on a system bus).
    pub(crate) activation_env: &'a BTreeMap<String, String>,
    /// System bus: the service runs as its `User=`, in a clean environment.
    pub(crate) system: bool,
}

impl Launch<'_> {
    /// The request, or the error every waiter gets instead of a start.
    pub(crate) fn request(&self) -> Result<SpawnRequest, BusError> {
        let def = self.def;
        // The system bus's rules (a user, a trusted file, the file's name),
        // with dbus-daemon's launch-helper errors. Services that systemd
        // starts never come here.
        if self.system
            && let Some(e) = crate::activation::system::system_bus_refusal(def, false)
        {
            return Err(e);
        }
        let argv = match &def.argv {
            // dbus-daemon execs Exec='s program as given, without a PATH
            // search: a bare name does not run.
            Ok(a) if def.source == Source::DBusService && !a[0].contains('/') => {
                let text = format!(
                    "Failed to execute program {}: No such file or directory",
                    def.names[0]
                );
                return Err(BusError::new(ErrorName::SpawnExecFailed, text));
            }
            Ok(a) => a.clone(),
            Err(e) => return Err(BusError::invalid_args(e.message())),
        };
        let user = match (&def.user, self.system) {
            (Some(name), true) => Some(Credentials::of(name).map_err(|e| {
                tracing::warn!("cannot find user '{name}': {e}");
                BusError::new(
                    ErrorName::SpawnFailedToSetup,
                    "Failed to setup environment correctly",
                )
            })?),
            (None, true) => {
                return Err(BusError::new(
                    ErrorName::SpawnFileInvalid,
                    "Cannot do system-bus activation with no user\n",
                ));
            }
            // A session bus runs everything as its own user, as dbus-daemon.
            (_, false) => None,
        };
        Ok(SpawnRequest {
            argv,
            // busvisor's own PATH, as `exec_path` was found with: the
            // activation environment's PATH is a client's to set.
            search_path: Some(crate::activation::exec::bus_path()),
            env: self.environment(),
            cwd: self.working_dir(),
            capture: true,
            new_session: true,
            cgroup: procs::service_cgroup(self.token),
            user,
            reset_oom: self.system,
        })
    }

    /// Where a service runs: its `working_directory`; else, for busvisor's
    /// own definitions on a session bus, the directory of the definition
    /// file (so that examples can name scripts beside them); else `/` on a
    /// system bus (as the launch helper) and busvisor's own on a session bus.
    fn working_dir(&self) -> Option<std::path::PathBuf> {
        let def = self.def;
        if let Some(d) = &def.working_dir {
            return Some(d.clone());
        }
        if self.system {
            return Some("/".into());
        }
        match def.source {
            Source::Toml => def
                .file
                .parent()
                .map(|p| p.to_path_buf())
                .filter(|p| !p.as_os_str().is_empty()),
            Source::DBusService => None,
        }
    }

    /// A session service: busvisor's environment, minus what must not leak;
    /// the activation environment; the definition's; the bus variables; the
    /// token. A system service: only what dbus-daemon's launch helper gives
    /// (`DBUS_STARTER_ADDRESS`, `DBUS_STARTER_BUS_TYPE`), the definition's
    /// own variables, and the token.
    fn environment(&self) -> HashMap<OsString, OsString> {
        let mut env: HashMap<OsString, OsString> = HashMap::new();
        if !self.system {
            env.extend(std::env::vars_os().filter(|(k, _)| !DROPPED_ENV.iter().any(|d| k == d)));
            for (k, v) in self.activation_env {
                env.insert(k.into(), v.into());
            }
        }
        for (k, v) in &self.def.env {
            env.insert(k.into(), v.into());
        }
        let bus_type = if self.system { "system" } else { "session" };
        env.insert("DBUS_STARTER_ADDRESS".into(), self.address.into());
        env.insert("DBUS_STARTER_BUS_TYPE".into(), bus_type.into());
        if !self.system {
            env.insert("DBUS_SESSION_BUS_ADDRESS".into(), self.address.into());
        }
        env.insert(procs::TOKEN_VAR.into(), self.token.into());
        // What GLib's app launcher sets marks an application for the user
        // (procs::APP_MARKER), never a service, even one of a bus an app
        // launcher started.
        env.remove(std::ffi::OsStr::new(procs::APP_MARKER));
        env.remove(std::ffi::OsStr::new("GIO_LAUNCHED_DESKTOP_FILE"));
        env
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(user: Option<&str>) -> ServiceDef {
        let mut d = ServiceDef::with_defaults(
            "org.example.S".into(),
            vec!["org.example.S".into()],
            Ok(vec!["/bin/true".into()]),
            "/usr/share/dbus-1/system-services/org.example.S.service".into(),
            Source::DBusService,
        );
        d.user = user.map(str::to_owned);
        d
    }

    fn launch(def: &ServiceDef, system: bool) -> Result<SpawnRequest, BusError> {
        Launch {
            def,
            token: "org.example.S-1-1",
            address: "unix:path=/run/dbus/system_bus_socket",
            activation_env: &BTreeMap::from([("FROM_UAE".into(), "1".into())]),
            system,
        }
        .request()
    }

    #[test]
    fn system_services_get_only_the_starter_variables_and_the_token() {
        let req = launch(&def(Some("root")), true).unwrap();
        let mut keys: Vec<_> = req.env.keys().map(|k| k.to_str().unwrap()).collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "BUSVISOR_INVOCATION",
                "DBUS_STARTER_ADDRESS",
                "DBUS_STARTER_BUS_TYPE"
            ]
        );
        assert_eq!(req.env[&OsString::from("DBUS_STARTER_BUS_TYPE")], "system");
        assert_eq!(req.cwd.as_deref(), Some(std::path::Path::new("/")));
        let user = req.user.unwrap();
        assert!(user.uid.is_root());
        assert!(req.reset_oom);
    }

    #[test]
    fn session_services_inherit_and_ignore_user() {
        let req = launch(&def(Some("root")), false).unwrap();
        assert!(req.user.is_none());
        assert_eq!(req.env[&OsString::from("FROM_UAE")], "1");
        assert_eq!(req.env[&OsString::from("DBUS_STARTER_BUS_TYPE")], "session");
        assert!(!req.reset_oom);
    }

    #[test]
    fn a_system_service_needs_a_known_user() {
        // dbus-daemon's launch-helper errors.
        let e = launch(&def(None), true).unwrap_err();
        assert_eq!(e.name, ErrorName::SpawnFileInvalid);
        assert!(e.text.contains("no user"), "{}", e.text);
        // A user that vanished after the definition was read.
        let e = launch(&def(Some("no-such-user-busvisor")), true).unwrap_err();
        assert_eq!(e.name, ErrorName::SpawnFailedToSetup);
    }
}
