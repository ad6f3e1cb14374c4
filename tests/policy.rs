//! `<policy>` enforced with real clients as another user (`nobody`, through
//! setpriv): who may connect, a denied call's AccessDenied with
//! dbus-daemon's text, an allowed one, RequestName under own rules, and a
//! policy file added then ReloadConfig changing the decision for connected
//! peers. Needs root (setpriv); skips otherwise. Runs against dbus-daemon
//! too (`BUSVISOR_TEST_REFERENCE=1`).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::*;

const NOBODY: &str = "65534";

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A configuration whose default policy is `rules`, including `dir`'s
/// `*.conf` files after it.
fn config(rules: &str, dir: &Path) -> String {
    config_with(
        rules,
        &format!("  <includedir>{}</includedir>\n", dir.display()),
    )
}

/// `dbus-send` as `nobody`; (exit status, stdout + stderr).
fn send_as_nobody(address: &str, args: &[&str]) -> (Option<i32>, String) {
    let address_arg = format!("--bus={address}");
    let mut all = vec![
        "--reuid",
        NOBODY,
        "--regid",
        NOBODY,
        "--clear-groups",
        "dbus-send",
        &address_arg,
        "--print-reply",
    ];
    all.extend_from_slice(args);
    let out = run_tool("setpriv", &all, Duration::from_secs(20));
    (out.status.code(), format!("{}{}", out.stdout, out.stderr))
}

/// GetId as `nobody`: a call any connected peer may make.
const GET_ID: [&str; 3] = [
    "--dest=org.freedesktop.DBus",
    "/org/freedesktop/DBus",
    "org.freedesktop.DBus.GetId",
];

/// A bus whose socket directory `nobody` may enter.
fn open_bus(cfg: &str) -> TestBus {
    let bus = start_bus(Some(cfg));
    let dir = bus.socket.parent().unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    bus
}

#[test]
fn another_user_needs_a_connect_rule() {
    if !is_root() {
        return eprintln!("skipped: needs root for setpriv");
    }
    let inc = tempfile::tempdir().unwrap();
    let allow_all = ALLOW_ALL_RULES;
    let bus = open_bus(&config(allow_all, inc.path()));
    let (code, out) = send_as_nobody(&bus.address, &GET_ID);
    assert_ne!(code, Some(0), "nobody connected without a rule: {out}");

    let with_user = format!("    <allow user=\"*\"/>\n{allow_all}");
    let bus = open_bus(&config(&with_user, inc.path()));
    let (code, out) = send_as_nobody(&bus.address, &GET_ID);
    assert_eq!(code, Some(0), "{out}");
}

#[test]
fn a_denied_call_gets_access_denied_and_a_reload_changes_the_decision() {
    if !is_root() {
        return eprintln!("skipped: needs root for setpriv");
    }
    let inc = tempfile::tempdir().unwrap();
    let rules = r#"    <allow user="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
    <deny send_interface="org.example.Denied"/>
    <deny own="org.example.Forbidden"/>"#;
    let bus = open_bus(&config(rules, inc.path()));
    let denied = [
        "--dest=org.freedesktop.DBus",
        "/org/freedesktop/DBus",
        "org.example.Denied.Call",
    ];
    let (code, out) = send_as_nobody(&bus.address, &denied);
    assert_ne!(code, Some(0), "{out}");
    assert!(
        out.contains("org.freedesktop.DBus.Error.AccessDenied")
            && out.contains("Rejected send message, 2 matched rules; type=\"method_call\"")
            && out.contains("(uid=65534 pid=")
            && out.contains("interface=\"org.example.Denied\" member=\"Call\""),
        "{out}"
    );
    let (code, out) = send_as_nobody(&bus.address, &GET_ID);
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = send_as_nobody(
        &bus.address,
        &[
            "--dest=org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus.RequestName",
            "string:org.example.Forbidden",
            "uint32:0",
        ],
    );
    assert_ne!(code, Some(0), "{out}");
    assert!(
        out.contains("is not allowed to own the service \"org.example.Forbidden\" due to security policies in the configuration file"),
        "{out}"
    );

    // A file in the included directory lifts the deny; ReloadConfig
    // applies it to connections made before and after.
    std::fs::write(
        inc.path().join("lift.conf"),
        r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <policy context="mandatory">
    <allow send_interface="org.example.Denied"/>
  </policy>
</busconfig>
"#,
    )
    .unwrap();
    let reload = run_tool(
        "dbus-send",
        &[
            &format!("--bus={}", bus.address),
            "--print-reply",
            "--dest=org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus.ReloadConfig",
        ],
        Duration::from_secs(20),
    );
    assert!(reload.success(), "{reload:?}");
    let (code, out) = send_as_nobody(&bus.address, &denied);
    // Allowed now: the driver answers UnknownMethod for the made-up call.
    assert!(
        out.contains("UnknownInterface") || out.contains("UnknownMethod"),
        "{code:?} {out}"
    );
}
