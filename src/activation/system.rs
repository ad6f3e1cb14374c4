//! The system bus's rules for service definitions: what dbus-daemon and
//! its launch helper (bus/activation.c, bus/activation-helper.c) demand of
//! a service before they start it, with their error names and texts.
//!
//! - Definitions are read only from root's files in root's directories,
//!   neither writable by group or others (the helper trusts only
//!   root-owned configuration); others are skipped with a warning.
//! - A `[D-BUS Service]` file must have `User=`, else
//!   `Spawn.FileInvalid` "Cannot do system-bus activation with no user"
//!   (dbus-daemon, before it runs the helper); a TOML definition must have
//!   `user`, with the same error.
//! - It must be named `NAME.service`: the helper finds a service's file by
//!   its name, so a file named otherwise loads (its name is activatable,
//!   dbus-daemon warns) but its activation fails with the helper's exit 6,
//!   `Spawn.ServiceNotFound`.
//! - `User=` must name an account: the helper's `switch_user` fails with
//!   exit 4, `Spawn.FailedToSetup`.
//! - `Exec=` must be an absolute path: the helper `execv`s it, exit 9,
//!   `Spawn.ExecFailed`.
//! - A service with `SystemdService=` and `Exec=/bin/false` (bluez,
//!   systemd's own services) only starts through systemd: without
//!   `--systemd-activation` its activation fails. The error keeps the name
//!   dbus-daemon gives it, `Spawn.ChildExited` (its helper execs
//!   /bin/false, which exits 1: "Launch helper exited with unknown return
//!   code 1"), so that clients matching that name still work; only the
//!   text says what is wrong.
//!
//! With `--systemd-activation`, a service with `SystemdService=` is
//! systemd's to start, and none of the rules apply to it (dbus-daemon
//! hands it over before it looks at `User=`).

use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;

use super::definition::{ServiceDef, Source};
use crate::wire::{BusError, ErrorName};

/// dbus-daemon-launch-helper's exit codes (bus/activation-exit-codes.h).
pub(crate) mod exit {
    pub(crate) const NO_MEMORY: i32 = 2;
    pub(crate) const CONFIG_INVALID: i32 = 3;
    pub(crate) const SETUP_FAILED: i32 = 4;
    pub(crate) const NAME_INVALID: i32 = 5;
    pub(crate) const SERVICE_NOT_FOUND: i32 = 6;
    pub(crate) const PERMISSIONS_INVALID: i32 = 7;
    pub(crate) const FILE_INVALID: i32 = 8;
    pub(crate) const EXEC_FAILED: i32 = 9;
    pub(crate) const INVALID_ARGS: i32 = 10;
    pub(crate) const CHILD_SIGNALED: i32 = 11;
}

/// The error dbus-daemon answers a system bus activation with when its
/// launch helper exits with `code` (`handle_servicehelper_exit_error`).
pub(crate) fn launch_helper_error(code: i32) -> BusError {
    let (name, text) = match code {
        exit::CONFIG_INVALID => (
            ErrorName::SpawnConfigInvalid,
            "Invalid configuration (missing or empty <user>?)",
        ),
        exit::NO_MEMORY => (
            ErrorName::NoMemory,
            "Launcher could not run (out of memory)",
        ),
        exit::SETUP_FAILED => (
            ErrorName::SpawnFailedToSetup,
            "Failed to setup environment correctly",
        ),
        exit::NAME_INVALID => (
            ErrorName::SpawnServiceNotValid,
            "Bus name is not valid or missing",
        ),
        exit::SERVICE_NOT_FOUND => (
            ErrorName::SpawnServiceNotFound,
            "Bus name not found in system service directory",
        ),
        exit::PERMISSIONS_INVALID => (
            ErrorName::SpawnPermissionsInvalid,
            "The permission of the setuid helper is not correct",
        ),
        exit::FILE_INVALID => (
            ErrorName::SpawnPermissionsInvalid,
            "The service file is incorrect or does not have all required attributes",
        ),
        exit::EXEC_FAILED => (
            ErrorName::SpawnExecFailed,
            "Cannot launch daemon, file not found or permissions invalid",
        ),
        exit::INVALID_ARGS => (ErrorName::InvalidArgs, "Invalid arguments to command line"),
        exit::CHILD_SIGNALED => (
            ErrorName::SpawnChildSignaled,
            "Launched child was signaled, it probably crashed",
        ),
        _ => {
            return BusError::new(
                ErrorName::SpawnChildExited,
                format!("Launch helper exited with unknown return code {code}"),
            );
        }
    };
    BusError::new(name, text)
}

/// Whether a file or directory may hold system bus definitions: root's,
/// and not writable by group or others.
pub(crate) fn trusted(meta: &Metadata) -> bool {
    meta.uid() == 0 && meta.mode() & 0o022 == 0
}

/// The warning for a directory of definitions that is not [`trusted`].
pub(crate) fn untrusted_dir(dir: &std::path::Path) -> String {
    format!(
        "{}: not owned by root, or writable by group or others: not trusted on the system \
         bus; skipping the definitions in it",
        dir.display()
    )
}

/// The unit a service needs systemd for: it has `SystemdService=` and
/// `Exec=/bin/false`, so nothing but systemd can start it.
pub(crate) fn needs_systemd(def: &ServiceDef) -> Option<&str> {
    let unit = def.systemd_service.as_deref()?;
    let program = def.argv.as_ref().ok()?.first()?;
    matches!(program.as_str(), "/bin/false" | "/usr/bin/false").then_some(unit)
}

/// A `[D-BUS Service]` file not named after its `Name=`.
fn misnamed(def: &ServiceDef) -> bool {
    def.source == Source::DBusService
        && def.file.file_name().and_then(|n| n.to_str()) != Some(&format!("{}.service", def.id))
}

/// What the system bus refuses to start `def` for, before anything is
/// spawned, in the order dbus-daemon and its helper check: `None` when it
/// may start. `systemd_activation`: busvisor runs with
/// `--systemd-activation`.
pub(crate) fn system_bus_refusal(def: &ServiceDef, systemd_activation: bool) -> Option<BusError> {
    if systemd_activation && def.systemd_service.is_some() {
        return None;
    }
    if let Some(unit) = needs_systemd(def) {
        let name = &def.names[0];
        return Some(BusError::new(
            ErrorName::SpawnChildExited,
            format!(
                "{name} needs systemd (unit {unit}) and busvisor was not started with \
                 --systemd-activation"
            ),
        ));
    }
    if def.user.is_none() {
        // The newline is dbus-daemon's.
        return Some(BusError::new(
            ErrorName::SpawnFileInvalid,
            "Cannot do system-bus activation with no user\n",
        ));
    }
    if misnamed(def) {
        return Some(launch_helper_error(exit::SERVICE_NOT_FOUND));
    }
    if def.unknown_user {
        return Some(launch_helper_error(exit::SETUP_FAILED));
    }
    let relative = def
        .argv
        .as_ref()
        .is_ok_and(|a| a.first().is_none_or(|p| !p.starts_with('/')));
    if def.source == Source::DBusService && relative {
        return Some(launch_helper_error(exit::EXEC_FAILED));
    }
    None
}

/// What to say about `def` when it is read on the system bus: one line per
/// reason its activation will fail (nothing for a service systemd starts).
pub(crate) fn load_warnings(def: &ServiceDef, systemd_activation: bool) -> Vec<String> {
    let mut out = Vec::new();
    if systemd_activation && def.systemd_service.is_some() {
        return out;
    }
    let file = def.file.display();
    let name = &def.names[0];
    if let Some(unit) = needs_systemd(def) {
        // One line for the common case (bluez, systemd's own services).
        out.push(format!(
            "{file}: {name} needs systemd (unit {unit}): its Exec= is /bin/false and busvisor \
             was not started with --systemd-activation, so activating it will fail"
        ));
        return out;
    }
    match (&def.user, def.source) {
        (None, Source::DBusService) => out.push(format!(
            "{file}: no User=: system bus activation of {name} will fail"
        )),
        (None, Source::Toml) => out.push(format!(
            "{file}: no `user`: system bus activation of {name} will fail"
        )),
        (Some(user), _) if def.unknown_user => out.push(format!(
            "{file}: user {user} does not exist: activating {name} will fail"
        )),
        _ => {}
    }
    if misnamed(def) {
        // dbus-daemon's text.
        out.push(format!(
            "Service file \"{file}\" should have been named \"{}.service\" and will not work \
             with system bus activation",
            def.id
        ));
    }
    out
}

/// Whether `user` names no account (a user database lookup: only off the
/// lock, when definitions are read).
pub(crate) fn user_unknown(user: &str) -> bool {
    matches!(nix::unistd::User::from_name(user), Ok(None))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::activation::definition::{parse_dbus_service, parse_toml};
    use std::path::Path;

    fn service(file: &str, body: &str) -> ServiceDef {
        let text = format!("[D-BUS Service]\n{body}");
        parse_dbus_service(Path::new(file), &text).unwrap()
    }

    fn refusal(def: &ServiceDef) -> Option<(&'static str, String)> {
        system_bus_refusal(def, false).map(|e| (e.name.as_str(), e.text))
    }

    #[test]
    fn helper_exit_codes_map_as_in_dbus_daemon() {
        let cases: &[(i32, &str, &str)] = &[
            (
                2,
                "org.freedesktop.DBus.Error.NoMemory",
                "Launcher could not run (out of memory)",
            ),
            (
                3,
                "org.freedesktop.DBus.Error.Spawn.ConfigInvalid",
                "Invalid configuration (missing or empty <user>?)",
            ),
            (
                4,
                "org.freedesktop.DBus.Error.Spawn.FailedToSetup",
                "Failed to setup environment correctly",
            ),
            (
                5,
                "org.freedesktop.DBus.Error.Spawn.ServiceNotValid",
                "Bus name is not valid or missing",
            ),
            (
                6,
                "org.freedesktop.DBus.Error.Spawn.ServiceNotFound",
                "Bus name not found in system service directory",
            ),
            (
                7,
                "org.freedesktop.DBus.Error.Spawn.PermissionsInvalid",
                "The permission of the setuid helper is not correct",
            ),
            (
                8,
                "org.freedesktop.DBus.Error.Spawn.PermissionsInvalid",
                "The service file is incorrect or does not have all required attributes",
            ),
            (
                9,
                "org.freedesktop.DBus.Error.Spawn.ExecFailed",
                "Cannot launch daemon, file not found or permissions invalid",
            ),
            (
                10,
                "org.freedesktop.DBus.Error.InvalidArgs",
                "Invalid arguments to command line",
            ),
            (
                11,
                "org.freedesktop.DBus.Error.Spawn.ChildSignaled",
                "Launched child was signaled, it probably crashed",
            ),
            (
                1,
                "org.freedesktop.DBus.Error.Spawn.ChildExited",
                "Launch helper exited with unknown return code 1",
            ),
            (
                42,
                "org.freedesktop.DBus.Error.Spawn.ChildExited",
                "Launch helper exited with unknown return code 42",
            ),
        ];
        for &(code, name, text) in cases {
            let e = launch_helper_error(code);
            assert_eq!((e.name.as_str(), e.text.as_str()), (name, text), "{code}");
        }
    }

    #[test]
    fn refusals_in_dbus_daemons_order() {
        let ok = service(
            "/d/org.a.Ok.service",
            "Name=org.a.Ok\nExec=/usr/bin/ok\nUser=root\n",
        );
        assert_eq!(refusal(&ok), None);

        let no_user = service("/d/org.a.NoUser.service", "Name=org.a.NoUser\nExec=/x\n");
        assert_eq!(
            refusal(&no_user),
            Some((
                "org.freedesktop.DBus.Error.Spawn.FileInvalid",
                "Cannot do system-bus activation with no user\n".into()
            ))
        );

        // The missing user is reported first, as dbus-daemon checks it
        // before the helper looks for the file.
        let both = service("/d/wrong.service", "Name=org.a.Both\nExec=/x\n");
        assert_eq!(
            refusal(&both).unwrap().0,
            "org.freedesktop.DBus.Error.Spawn.FileInvalid"
        );

        let misnamed = service(
            "/d/wrong.service",
            "Name=org.a.Misnamed\nExec=/x\nUser=root\n",
        );
        assert_eq!(
            refusal(&misnamed),
            Some((
                "org.freedesktop.DBus.Error.Spawn.ServiceNotFound",
                "Bus name not found in system service directory".into()
            ))
        );

        let mut unknown = service(
            "/d/org.a.Ghost.service",
            "Name=org.a.Ghost\nExec=/x\nUser=nosuchuser\n",
        );
        unknown.unknown_user = true;
        assert_eq!(
            refusal(&unknown),
            Some((
                "org.freedesktop.DBus.Error.Spawn.FailedToSetup",
                "Failed to setup environment correctly".into()
            ))
        );

        let bare = service(
            "/d/org.a.Bare.service",
            "Name=org.a.Bare\nExec=bare --flag\nUser=root\n",
        );
        assert_eq!(
            refusal(&bare).unwrap().0,
            "org.freedesktop.DBus.Error.Spawn.ExecFailed"
        );
    }

    #[test]
    fn toml_definitions_need_a_user_too() {
        let def = parse_toml(
            Path::new("/d/echo.toml"),
            "name = \"org.a.Echo\"\nexec = [\"echo\"]\n",
        )
        .unwrap();
        assert_eq!(
            refusal(&def).unwrap().0,
            "org.freedesktop.DBus.Error.Spawn.FileInvalid"
        );
        let with_user = parse_toml(
            Path::new("/d/echo.toml"),
            "name = \"org.a.Echo\"\nexec = [\"echo\"]\nuser = \"root\"\n",
        )
        .unwrap();
        // TOML's file names are ids, and a bare exec is looked up in PATH.
        assert_eq!(refusal(&with_user), None);
        assert_eq!(
            load_warnings(&def, false),
            ["/d/echo.toml: no `user`: system bus activation of org.a.Echo will fail"]
        );
        assert!(load_warnings(&with_user, false).is_empty());
    }

    #[test]
    fn bin_false_with_a_systemd_unit_needs_systemd() {
        let bluez = service(
            "/d/org.bluez.service",
            "Name=org.bluez\nExec=/bin/false\nUser=root\nSystemdService=dbus-org.bluez.service\n",
        );
        assert_eq!(needs_systemd(&bluez), Some("dbus-org.bluez.service"));
        assert_eq!(
            refusal(&bluez),
            Some((
                "org.freedesktop.DBus.Error.Spawn.ChildExited",
                "org.bluez needs systemd (unit dbus-org.bluez.service) and busvisor was not \
                 started with --systemd-activation"
                    .into()
            ))
        );
        assert_eq!(
            load_warnings(&bluez, false),
            [
                "/d/org.bluez.service: org.bluez needs systemd (unit dbus-org.bluez.service): \
                 its Exec= is /bin/false and busvisor was not started with \
                 --systemd-activation, so activating it will fail"
            ]
        );
        // With --systemd-activation, systemd starts it, and any service
        // with a unit: no rule applies.
        assert_eq!(system_bus_refusal(&bluez, true), None);
        assert!(load_warnings(&bluez, true).is_empty());
        let no_user_unit = service(
            "/d/x.service",
            "Name=org.a.Unit\nExec=/x\nSystemdService=x.service\n",
        );
        assert_eq!(system_bus_refusal(&no_user_unit, true), None);
        assert!(system_bus_refusal(&no_user_unit, false).is_some());
        // /bin/false alone, or a real program with a unit, is not "needs systemd".
        let polkit = service(
            "/d/org.freedesktop.PolicyKit1.service",
            "Name=org.freedesktop.PolicyKit1\nExec=/usr/lib/polkit-1/polkitd --no-debug\n\
             User=root\nSystemdService=polkit.service\n",
        );
        assert_eq!(needs_systemd(&polkit), None);
        assert_eq!(refusal(&polkit), None);
        let systemd1 = service(
            "/d/org.freedesktop.systemd1.service",
            "Name=org.freedesktop.systemd1\nExec=/bin/false\nUser=root\n",
        );
        assert_eq!(needs_systemd(&systemd1), None);
    }

    #[test]
    fn load_warnings_name_the_file() {
        let misnamed = service("/d/wrong.service", "Name=org.a.M\nExec=/x\nUser=root\n");
        assert_eq!(
            load_warnings(&misnamed, false),
            [
                "Service file \"/d/wrong.service\" should have been named \"org.a.M.service\" \
                 and will not work with system bus activation"
            ]
        );
        let no_user = service("/d/org.a.N.service", "Name=org.a.N\nExec=/x\n");
        assert_eq!(
            load_warnings(&no_user, false),
            ["/d/org.a.N.service: no User=: system bus activation of org.a.N will fail"]
        );
        let mut ghost = service("/d/org.a.G.service", "Name=org.a.G\nExec=/x\nUser=ghost\n");
        ghost.unknown_user = true;
        assert_eq!(
            load_warnings(&ghost, false),
            ["/d/org.a.G.service: user ghost does not exist: activating org.a.G will fail"]
        );
    }

    #[test]
    fn trust_is_root_and_no_group_or_other_write() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, "x").unwrap();
        let set = |mode| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap();
            std::fs::metadata(&f).unwrap()
        };
        let root = nix::unistd::geteuid().is_root();
        assert_eq!(trusted(&set(0o644)), root);
        assert_eq!(trusted(&set(0o600)), root);
        assert!(!trusted(&set(0o664)));
        assert!(!trusted(&set(0o646)));
        assert!(user_unknown("busvisor-no-such-user"));
        assert!(!user_unknown("root"));
    }
}
